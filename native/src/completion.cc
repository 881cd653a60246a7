// See completion.h.
#include "completion.h"

namespace ucm {

CompletionChannel::CompletionChannel(Napi::Env env, const char* name, std::function<void(bool)> on_busy)
    : on_busy_(std::move(on_busy)) {
  tsfn_ = Napi::ThreadSafeFunction::New(env, Napi::Function::New(env, [](const Napi::CallbackInfo&) {}), name, 0, 1);
  // An idle channel does not keep the event loop alive; one with jobs does.
  tsfn_.Unref(env);
}

Pending* CompletionChannel::Track(Napi::Env env, std::unique_ptr<Pending> p) {
  Pending* raw = p.get();
  owned_.emplace(raw, std::move(p));
  if (inflight_++ == 0) {
    tsfn_.Ref(env);
    if (on_busy_) on_busy_(true);
  }
  return raw;
}

void CompletionChannel::Complete(Pending* p) {
  bool wake;
  {
    std::lock_guard<std::mutex> lock(done_mu_);
    wake = done_.empty();
    done_.push_back(p);
  }
  if (wake) tsfn_.NonBlockingCall([this](Napi::Env env, Napi::Function) { Drain(env); });
}

void CompletionChannel::Drain(Napi::Env env) {
  std::vector<Pending*> batch;
  {
    std::lock_guard<std::mutex> lock(done_mu_);
    batch.swap(done_);
  }
  for (Pending* p : batch) {
    auto it = owned_.find(p);
    if (it == owned_.end()) continue;
    std::unique_ptr<Pending> own = std::move(it->second);
    owned_.erase(it);
    Napi::HandleScope scope(env);
    if (own->thrown.empty())
      own->Settle(env);
    else
      own->deferred.Reject(Napi::Error::New(env, own->thrown).Value());
    if (--inflight_ == 0) {
      if (open_) tsfn_.Unref(env);
      if (on_busy_) on_busy_(false);
    }
  }
}

void CompletionChannel::Release(Napi::Env env) {
  if (!open_) return;
  Drain(env);
  open_ = false;
  tsfn_.Release();
}

void CompletionChannel::Abort() {
  if (!open_) return;
  open_ = false;
  tsfn_.Abort();
}

}  // namespace ucm
