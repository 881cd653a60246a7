// usageAdd() and evict(): capacity.h's ledger and eviction from JS.
//
// Both block (file locks with a deadline, a directory scan that an NFS
// server may make slow), so they run on this module's own JobPool and come
// back through a CompletionChannel, like the engine's transfers: never on
// libuv's pool, whose four threads Node's fs calls need. The pool and the
// channel belong to the environment and stop with it.
#include <cstring>
#include <functional>
#include <memory>
#include <string>

#include "bindings.h"
#include "capacity.h"
#include "completion.h"
#include "convert.h"
#include "job_pool.h"

namespace ucm {

namespace {

// Ledger updates of a few directories and an eviction pass at a time.
constexpr uint32_t kCapacityThreads = 4;

struct CapacityWork {
  explicit CapacityWork(Napi::Env env) : pool(kCapacityThreads), channel(env, "ucm-capacity-done", nullptr) {}
  JobPool pool;
  CompletionChannel channel;
};

struct PendingUsage final : Pending {
  using Pending::Pending;
  std::string dir;
  int64_t delta_bytes = 0, delta_files = 0;
  int timeout_ms = 0;
  int rc = 0;
  Usage usage;
  Napi::Value Result(Napi::Env env) override {
    auto out = Napi::Object::New(env);
    out.Set("bytes", Napi::Number::New(env, static_cast<double>(usage.bytes)));
    out.Set("files", Napi::Number::New(env, static_cast<double>(usage.files)));
    out.Set("existed", Napi::Boolean::New(env, usage.existed));
    return out;
  }
  void Settle(Napi::Env env) override {
    if (rc != 0)
      deferred.Reject(ErrnoError(env, rc, "usage ledger of " + dir).Value());
    else
      Pending::Settle(env);
  }
};

struct PendingEvict final : Pending {
  using Pending::Pending;
  EvictRequest req;
  EvictResult res;
  Napi::Value Result(Napi::Env env) override {
    auto out = Napi::Object::New(env);
    auto num = [&](const char* k, uint64_t v) { out.Set(k, Napi::Number::New(env, static_cast<double>(v))); };
    out.Set("busy", Napi::Boolean::New(env, res.busy));
    out.Set("error", res.err ? Napi::Value(Napi::String::New(env, std::strerror(res.err))) : env.Null());
    num("scannedBytes", res.scanned_bytes);
    num("scannedFiles", res.scanned_files);
    num("wantedBytes", res.wanted_bytes);
    num("freedBytes", res.freed_bytes);
    num("freedFiles", res.freed_files);
    num("keptRecent", res.kept_recent);
    num("keptPinned", res.kept_pinned);
    num("vanished", res.vanished);
    num("usedBytes", static_cast<uint64_t>(res.usage.bytes));
    num("usedFiles", static_cast<uint64_t>(res.usage.files));
    return out;
  }
};

// Tracks `p` and runs `work(*p)` on the pool; the promise settles on the JS thread.
template <typename P>
Napi::Value Run(Napi::Env env, CapacityWork* w, std::unique_ptr<P> p, void (*work)(P&)) {
  Napi::Promise promise = p->deferred.Promise();
  P* job = p.get();
  Pending* raw = w->channel.Track(env, std::move(p));
  CompletionChannel* channel = &w->channel;
  // Post fails only once the environment is being torn down: the promise goes with it.
  w->pool.Post([channel, job, raw, work] {
    try {
      work(*job);
    } catch (const std::exception& e) {
      job->thrown = std::string("capacity job failed: ") + e.what();  // never a promise left unsettled
    }
    channel->Complete(raw);
  });
  return promise;
}

// usageAdd(dir, deltaBytes, deltaFiles, timeoutMs) -> Promise<{bytes, files, existed}>
Napi::Value UsageAddJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 4 || !info[0].IsString())
    throw ArgTypeError(env, "usageAdd(dir: string, deltaBytes: number, deltaFiles: number, timeoutMs: number)");
  auto p = std::make_unique<PendingUsage>(env);
  p->dir = info[0].As<Napi::String>().Utf8Value();
  p->delta_bytes = SafeInt(env, info[1], "deltaBytes");
  p->delta_files = SafeInt(env, info[2], "deltaFiles");
  p->timeout_ms = static_cast<int>(SafeUint(env, info[3].ToNumber().DoubleValue(), "timeoutMs"));
  return Run<PendingUsage>(env, static_cast<CapacityWork*>(info.Data()), std::move(p), [](PendingUsage& u) {
    u.rc = LedgerAdd(u.dir, u.delta_bytes, u.delta_files, u.timeout_ms, &u.usage);
  });
}

// evict({dir, targetBytes?, extraBytes?, graceMs, pinned: string[], timeoutMs}) -> Promise<result>
Napi::Value EvictJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsObject()) throw ArgTypeError(env, "evict(request: object)");
  auto o = info[0].As<Napi::Object>();
  if (!o.Get("dir").IsString()) throw ArgTypeError(env, "evict: dir must be a string");
  auto p = std::make_unique<PendingEvict>(env);
  EvictRequest& req = p->req;
  req.dir = o.Get("dir").As<Napi::String>().Utf8Value();
  if (!o.Get("targetBytes").IsUndefined()) {
    req.has_target = true;
    req.target_bytes = SafeUint(env, o.Get("targetBytes").ToNumber().DoubleValue(), "targetBytes");
  }
  if (!o.Get("extraBytes").IsUndefined())
    req.extra_bytes = SafeUint(env, o.Get("extraBytes").ToNumber().DoubleValue(), "extraBytes");
  req.grace_ns = SafeUint(env, o.Get("graceMs").ToNumber().DoubleValue(), "graceMs") * 1000000ull;
  if (!o.Get("timeoutMs").IsUndefined())
    req.timeout_ms = static_cast<int>(SafeUint(env, o.Get("timeoutMs").ToNumber().DoubleValue(), "timeoutMs"));
  if (!o.Get("pinned").IsUndefined())
    for (auto& name : StringArray(o.Get("pinned"), "pinned")) req.pinned.insert(std::move(name));
  return Run<PendingEvict>(env, static_cast<CapacityWork*>(info.Data()), std::move(p),
                           [](PendingEvict& e) { Evict(e.req, &e.res); });
}

}  // namespace

void RegisterCapacity(Napi::Env env, Napi::Object exports) {
  auto* work = new CapacityWork(env);
  // Teardown (a worker thread ending; the main thread's loop only ends with
  // no job in flight, the channel holds it): running jobs finish first, as
  // the engine's metadata jobs do at close, queued ones are dropped, then the
  // channel goes and the unsettled promises with the environment.
  env.AddCleanupHook([work] {
    work->pool.Stop();
    work->channel.Abort();
    delete work;
  });
  exports.Set("usageAdd", Napi::Function::New(env, UsageAddJs, "usageAdd", work));
  exports.Set("evict", Napi::Function::New(env, EvictJs, "evict", work));
}

}  // namespace ucm
