// The addon's one way back from its own threads to JavaScript.
//
// Work that blocks (block I/O, metadata calls, capacity passes) runs on the
// addon's threads, never on the JS thread and never on libuv's pool (four
// threads that Node's own fs calls share; a hung NFS server would stall them).
// Each job is a Pending: created and tracked on the JS thread, filled in by a
// worker, which then calls Complete(). Complete() queues it and wakes the JS
// thread once per batch through one thread-safe function; Drain() settles the
// batch there, so promises are settled in a proper callback scope and worker
// threads never touch JS values.
//
// Invariant: every tracked Pending is completed exactly once, and the channel
// outlives the threads that may complete it (owners join those threads
// before Release() or Abort()).
#pragma once
#include <napi.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace ucm {

// Something that finished off-thread and settles its promise on the JS thread.
struct Pending {
  explicit Pending(Napi::Env env) : deferred(Napi::Promise::Deferred::New(env)) {}
  virtual ~Pending() = default;
  Pending(const Pending&) = delete;
  Pending& operator=(const Pending&) = delete;
  // JS thread: the value the promise resolves with.
  virtual Napi::Value Result(Napi::Env env) = 0;
  // JS thread: resolves with Result(); a job that can fail rejects instead.
  virtual void Settle(Napi::Env env) { deferred.Resolve(Result(env)); }
  Napi::Promise::Deferred deferred;
  // Set by the worker thread when the job threw (an allocation failing, say):
  // the promise is rejected with it instead of settled.
  std::string thrown;
};

class CompletionChannel {
 public:
  // `on_busy(true)` when the first job is tracked, `on_busy(false)` when the
  // last one settled (JS thread): an owner keeps itself alive in between.
  CompletionChannel(Napi::Env env, const char* name, std::function<void(bool busy)> on_busy);
  CompletionChannel(const CompletionChannel&) = delete;
  CompletionChannel& operator=(const CompletionChannel&) = delete;

  // JS thread. The channel owns `p` until it settles; the raw pointer is the
  // job's ticket for Complete().
  Pending* Track(Napi::Env env, std::unique_ptr<Pending> p);
  // Any thread.
  void Complete(Pending* p);
  // JS thread: settles every completed job.
  void Drain(Napi::Env env);
  // JS thread, after the owner joined its threads: settles what completed and
  // closes the channel.
  void Release(Napi::Env env);
  // Environment teardown, after the owner joined its threads: unsettled
  // promises are abandoned with the environment.
  void Abort();
  uint32_t inflight() const { return inflight_; }

 private:
  std::unordered_map<Pending*, std::unique_ptr<Pending>> owned_;
  std::mutex done_mu_;
  std::vector<Pending*> done_;
  uint32_t inflight_ = 0;
  bool open_ = true;
  std::function<void(bool)> on_busy_;
  Napi::ThreadSafeFunction tsfn_;
};

}  // namespace ucm
