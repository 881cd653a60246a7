// See engine_pending.h.
#include "engine_pending.h"

#include "cuda_backend.h"

namespace ucm {

Napi::Value PendingTransfer::Result(Napi::Env env) {
  const size_t n = task->results.size();
  auto status = Napi::Int32Array::New(env, n);
  auto err = Napi::Int32Array::New(env, n);
  auto what = Napi::Array::New(env, n);
  for (size_t i = 0; i < n; ++i) {
    const IoResult& r = task->results[i];
    status[i] = static_cast<int32_t>(r.status);
    err[i] = r.err;
    what.Set(static_cast<uint32_t>(i),
             Napi::String::New(env, r.detail.empty() ? std::string(r.what) : r.what + std::string(": ") + r.detail));
  }
  auto out = Napi::Object::New(env);
  out.Set("status", status);
  out.Set("errno", err);
  out.Set("what", what);
  out.Set("bytes", Napi::Number::New(env, static_cast<double>(task->bytes_ok.load())));
  out.Set("elapsedNs", Napi::Number::New(env, static_cast<double>(task->finish_ns - task->submit_ns)));
  // Once-only messages from the device backend (a copy method the driver
  // lacks, say), for the engine's log.
  auto notices = TakeCudaNotices();
  if (!notices.empty()) {
    auto arr = Napi::Array::New(env, notices.size());
    for (size_t i = 0; i < notices.size(); ++i) arr.Set(static_cast<uint32_t>(i), notices[i]);
    out.Set("notices", arr);
  }
  return out;
}

void PendingTransfer::Settle(Napi::Env env) {
  if (cancellable) cancellable->erase(cancel_id);
  Pending::Settle(env);
}

Napi::Value PendingMeta::Result(Napi::Env env) {
  if (bytes_result) {
    auto out = Napi::Uint8Array::New(env, codes.size());
    for (size_t i = 0; i < codes.size(); ++i) out[i] = static_cast<uint8_t>(codes[i]);
    return out;
  }
  auto out = Napi::Int32Array::New(env, codes.size());
  for (size_t i = 0; i < codes.size(); ++i) out[i] = codes[i];
  return out;
}

}  // namespace ucm
