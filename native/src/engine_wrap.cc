// See engine_wrap.h. Argument checks and conversions live in convert.h and
// engine_args.h; this file only wires JS calls to the core and its channel.
#include "engine_wrap.h"

#include <algorithm>
#include <string>
#include <vector>

#include "convert.h"
#include "crc32c.h"
#include "cuda_backend.h"
#include "engine_args.h"

namespace ucm {

Napi::Function EngineWrap::Define(Napi::Env env) {
  return DefineClass(
      env, "Engine",
      {InstanceMethod<&EngineWrap::OpenHostRegion>("openHostRegion"),
       InstanceMethod<&EngineWrap::OpenCudaRegion>("openCudaRegion"),
       InstanceMethod<&EngineWrap::OpenCudaEvent>("openCudaEvent"),
       InstanceMethod<&EngineWrap::CloseEvent>("closeEvent"), InstanceMethod<&EngineWrap::Cancel>("cancel"),
       InstanceMethod<&EngineWrap::Released>("released"), InstanceMethod<&EngineWrap::CloseRegion>("closeRegion"),
       InstanceMethod<&EngineWrap::Dump>("dump"), InstanceMethod<&EngineWrap::Load>("load"),
       InstanceMethod<&EngineWrap::Lookup>("lookup"), InstanceMethod<&EngineWrap::Commit>("commit"),
       InstanceMethod<&EngineWrap::Remove>("remove"), InstanceMethod<&EngineWrap::Stats>("stats"),
       InstanceMethod<&EngineWrap::TierStatsOf>("tierStats"), InstanceMethod<&EngineWrap::DrainWrites>("drainWrites"),
       InstanceMethod<&EngineWrap::PrepareTier>("prepareTier"), InstanceMethod<&EngineWrap::Close>("close")});
}

EngineWrap::EngineWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<EngineWrap>(info) {
  Napi::Env env = info.Env();
  const EngineOptions opts = ParseEngineOptions(info[0]);
  core_ = std::make_unique<TransferEngine>(opts);
  // Keeps this object alive while native work refers to it.
  channel_ = std::make_unique<CompletionChannel>(env, "ucm-transfer-done", [this](bool busy) {
    if (busy)
      Ref();
    else
      Unref();
  });
  cleanup_ = env.AddCleanupHook(std::function<void()>([this] {
    hook_ran_ = true;
    Teardown();
  }));
}

EngineWrap::~EngineWrap() {
  // Collected before environment teardown: the hook must not fire on a dead object.
  if (!hook_ran_) cleanup_.Remove(Env());
  Teardown();
}

// ---- regions -----------------------------------------------------------------

Napi::Value EngineWrap::OpenHostRegion(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  CheckOpen(env);
  if (info.Length() < 2 || !info[0].IsString() || !info[1].IsNumber() ||
      (info.Length() > 2 && !info[2].IsUndefined() && !info[2].IsNumber()))
    throw ArgTypeError(env, "openHostRegion(source: string, size: number, pid?: number)");
  std::string source = info[0].As<Napi::String>().Utf8Value();
  uint64_t size = SafeUint(env, info[1].As<Napi::Number>().DoubleValue(), "region size");
  // The client's process: the only one whose /proc/<pid>/fd/<n> it may name.
  const int pid = info.Length() > 2 && info[2].IsNumber() ? info[2].As<Napi::Number>().Int32Value() : 0;
  std::string error;
  return Keep(env, regions_, HostRegion::Open(source, size, pid, &error), "region_refused", error);
}

// openCudaRegion(device, handle: Uint8Array(64), offset, size, pciBusId?) -> id
Napi::Value EngineWrap::OpenCudaRegion(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  CheckOpen(env);
  if (info.Length() < 4 || !info[0].IsNumber() || !info[2].IsNumber() || !info[3].IsNumber())
    throw ArgTypeError(
        env, "openCudaRegion(device: number, handle: Uint8Array, offset: number, size: number, pciBusId?: string)");
  const int device = static_cast<int>(SafeUint(env, info[0].As<Napi::Number>().DoubleValue(), "device"));
  std::string error;
  std::shared_ptr<Region> region =
      CudaRegion::Open(device, OptionalBusId(info, 4), Bytes(info[1], "handle"),
                       SafeUint(env, info[2].As<Napi::Number>().DoubleValue(), "offset"),
                       SafeUint(env, info[3].As<Napi::Number>().DoubleValue(), "region size"), &error);
  return Keep(env, regions_, std::move(region), "cuda_refused", error);
}

// openCudaEvent(device, handle: Uint8Array(64), pciBusId?) -> id
Napi::Value EngineWrap::OpenCudaEvent(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  CheckOpen(env);
  if (info.Length() < 2 || !info[0].IsNumber())
    throw ArgTypeError(env, "openCudaEvent(device: number, handle: Uint8Array, pciBusId?: string)");
  const int device = static_cast<int>(SafeUint(env, info[0].As<Napi::Number>().DoubleValue(), "device"));
  std::string error;
  return Keep(env, events_, CudaEvent::Open(device, OptionalBusId(info, 2), Bytes(info[1], "handle"), &error),
              "cuda_refused", error);
}

Napi::Value EngineWrap::CloseEvent(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsNumber()) throw ArgTypeError(env, "closeEvent(id: number)");
  return Napi::Boolean::New(env, events_.erase(info[0].As<Napi::Number>().Uint32Value()) > 0);
}

Napi::Value EngineWrap::CloseRegion(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsNumber()) throw ArgTypeError(env, "closeRegion(id: number)");
  // Tasks in flight hold their own reference; the mapping goes with the last one.
  return Napi::Boolean::New(env, regions_.erase(info[0].As<Napi::Number>().Uint32Value()) > 0);
}

// ---- transfers ---------------------------------------------------------------

Napi::Value EngineWrap::Transfer(const Napi::CallbackInfo& info, Op op) {
  Napi::Env env = info.Env();
  CheckOpen(env);
  if (info.Length() < 1 || !info[0].IsObject()) throw ArgTypeError(env, "transfer spec must be an object");
  auto spec = info[0].As<Napi::Object>();
  auto task = ParseTransferSpec(spec, op, regions_, events_, core_->options().max_block_bytes);
  auto pending = std::make_unique<PendingTransfer>(env);
  pending->task = task;
  Napi::Value cancel_id = spec.Get("cancelId");
  if (!cancel_id.IsUndefined()) {
    if (!cancel_id.IsNumber()) throw ArgTypeError(env, "cancelId must be a number");
    const uint32_t id = cancel_id.As<Napi::Number>().Uint32Value();
    if (cancellable_.count(id))
      throw CodedRangeError(env, "cancel_id_in_use", "cancelId " + std::to_string(id) + " is in use");
    cancellable_[id] = task;
    pending->cancellable = &cancellable_;
    pending->cancel_id = id;
  }
  Napi::Promise promise = pending->deferred.Promise();
  Pending* raw = channel_->Track(env, std::move(pending));
  CompletionChannel* channel = channel_.get();
  core_->Submit(task, [channel, raw](const std::shared_ptr<TransferTask>&) { channel->Complete(raw); });
  return promise;
}

// cancel(cancelId, timeoutMs) -> Promise<"stopped" | "finished" | "timeout">
Napi::Value EngineWrap::Cancel(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  CheckOpen(env);
  if (info.Length() < 2 || !info[0].IsNumber() || !info[1].IsNumber())
    throw ArgTypeError(env, "cancel(cancelId: number, timeoutMs: number)");
  auto p = std::make_unique<PendingCancel>(env);
  Napi::Promise promise = p->deferred.Promise();
  auto it = cancellable_.find(info[0].As<Napi::Number>().Uint32Value());
  PendingCancel* c = p.get();
  Pending* raw = channel_->Track(env, std::move(p));
  if (it == cancellable_.end()) {
    channel_->Complete(raw);
    return promise;
  }
  c->task = it->second;
  const uint32_t timeout = static_cast<uint32_t>(SafeUint(env, info[1].As<Napi::Number>().DoubleValue(), "timeoutMs"));
  CompletionChannel* channel = channel_.get();
  core_->PostMeta([channel, c, raw, timeout] {
    c->outcome = TransferEngine::Cancel(*c->task, timeout) ? "stopped" : "timeout";
    channel->Complete(raw);
  });
  return promise;
}

// released(cancelId) -> blocks of the running task done with the client's
// memory (TransferTask::released), or -1 when no task runs under that id
// (finished: all of them are).
Napi::Value EngineWrap::Released(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  CheckOpen(env);
  if (info.Length() < 1 || !info[0].IsNumber()) throw ArgTypeError(env, "released(cancelId: number)");
  auto it = cancellable_.find(info[0].As<Napi::Number>().Uint32Value());
  if (it == cancellable_.end()) return Napi::Number::New(env, -1);
  return Napi::Number::New(env, it->second->released.load(std::memory_order_acquire));
}

// ---- metadata ----------------------------------------------------------------

Napi::Value EngineWrap::Lookup(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  CheckOpen(env);
  auto p = std::make_unique<PendingMeta>(env, StringArray(info[0], "paths"), std::vector<std::string>{});
  p->bytes_result = true;
  return RunMeta(
      env, std::move(p),
      [](PendingMeta& m, size_t i) {
        // A block the tier holds is found without a stat: a load of it is served from there.
        m.codes[i] = m.tier->Contains(m.first[i]) ? 1 : BlockExists(m.roots, m.first[i]);
      },
      true);
}

Napi::Value EngineWrap::Commit(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  CheckOpen(env);
  auto from = StringArray(info[0], "from");
  auto to = StringArray(info[1], "to");
  if (from.size() != to.size()) throw ArgRangeError(env, "from and to must have the same length");
  auto p = std::make_unique<PendingMeta>(env, std::move(from), std::move(to));
  return RunMeta(
      env, std::move(p),
      [](PendingMeta& m, size_t i) {
        // Stored meanwhile by another client or engine (or held by the tier):
        // that copy stays, as a rename would replace it and the ledger would
        // count the key twice; EEXIST tells the caller to delete this one.
        // Checked here, on the thread that renames, not by a lookup first.
        if (m.tier->Contains(m.second[i]) || BlockExists(m.roots, m.second[i]) != 0) {
          m.codes[i] = EEXIST;
          return;
        }
        // Not written yet (write-behind): committed in the tier now, renamed once written.
        if (m.tier->CommitUnwritten(m.first[i], m.second[i])) {
          m.codes[i] = 0;
          return;
        }
        m.codes[i] = CommitFile(m.roots, m.first[i], m.second[i]);
        if (m.codes[i] == 0) m.tier->Commit(m.first[i], m.second[i]);  // visible in the directory, so in the tier
      },
      false);
}

Napi::Value EngineWrap::Remove(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  CheckOpen(env);
  auto p = std::make_unique<PendingMeta>(env, StringArray(info[0], "paths"), std::vector<std::string>{});
  return RunMeta(
      env, std::move(p),
      [](PendingMeta& m, size_t i) {
        m.tier->Forget(m.first[i]);  // first: a load must not be served a block its file no longer backs
        m.codes[i] = RemoveFile(m.roots, m.first[i]);
      },
      false);
}

Napi::Value EngineWrap::RunMeta(Napi::Env env, std::unique_ptr<PendingMeta> p, void (*fn)(PendingMeta&, size_t),
                                bool lookup) {
  p->roots = core_->options().io.roots;
  p->tier = &core_->tier();
  Napi::Promise promise = p->deferred.Promise();
  PendingMeta* m = p.get();
  Pending* raw = channel_->Track(env, std::move(p));
  const size_t n = m->first.size();
  if (n == 0) {
    channel_->Complete(raw);
    return promise;
  }
  // Split over the metadata threads; small batches stay in one piece.
  const uint32_t threads = core_->options().meta_threads;
  const size_t chunk = std::max<size_t>(32, (n + threads - 1) / threads);
  const uint32_t chunks = static_cast<uint32_t>((n + chunk - 1) / chunk);
  m->chunks_left.store(chunks);
  CompletionChannel* channel = channel_.get();
  for (uint32_t c = 0; c < chunks; ++c) {
    const size_t begin = c * chunk, end = std::min(n, begin + chunk);
    auto job = [channel, m, raw, begin, end, fn] {
      for (size_t i = begin; i < end; ++i) fn(*m, i);
      if (m->chunks_left.fetch_sub(1) == 1) channel->Complete(raw);
    };
    if (lookup)
      core_->PostLookup(std::move(job));
    else
      core_->PostMeta(std::move(job));
  }
  return promise;
}

// ---- misc --------------------------------------------------------------------

// tierStats() -> the Cache stage's figures (host_tier.h), or undefined once
// closed. Apart from stats(), which the lookup path reads for one field: the
// tier's figures take its lock.
Napi::Value EngineWrap::TierStatsOf(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!core_) return env.Undefined();
  const TierStats t = core_->tier().stats();
  auto tier = Napi::Object::New(env);
  auto num = [&](const char* k, uint64_t v) { tier.Set(k, Napi::Number::New(env, static_cast<double>(v))); };
  num("capacityBytes", t.capacity_bytes);
  num("usedBytes", t.used_bytes);
  num("blocks", t.blocks);
  num("blockBytes", t.block_bytes);
  num("pending", t.pending);
  num("hits", t.hits);
  num("hitBytes", t.hit_bytes);
  num("misses", t.misses);
  num("inserted", t.inserted);
  num("evicted", t.evicted);
  num("refused", t.refused);
  num("unwritten", t.unwritten);
  num("unwrittenBytes", t.unwritten_bytes);
  num("written", t.written);
  num("writeFailed", t.write_failed);
  num("shed", t.shed);
  num("lagMs", t.lag_ms);
  num("pinned", t.pinned);
  num("pinnedBytes", t.pinned_bytes);
  num("abandoned", t.abandoned);
  return tier;
}

// drainWrites(timeoutMs) -> Promise<number>: waits (on a metadata thread)
// until every block written behind is written, or the time is up; resolves
// with how many are not.
Napi::Value EngineWrap::DrainWrites(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  CheckOpen(env);
  if (info.Length() < 1 || !info[0].IsNumber()) throw ArgTypeError(env, "drainWrites(timeoutMs: number)");
  const uint32_t timeout = static_cast<uint32_t>(SafeUint(env, info[0].As<Napi::Number>().DoubleValue(), "timeoutMs"));
  auto p = std::make_unique<PendingDrain>(env);
  Napi::Promise promise = p->deferred.Promise();
  PendingDrain* d = p.get();
  Pending* raw = channel_->Track(env, std::move(p));
  CompletionChannel* channel = channel_.get();
  TransferEngine* core = core_.get();
  core_->PostMeta([channel, d, raw, core, timeout] {
    d->left = core->DrainWrites(timeout);
    channel->Complete(raw);
  });
  return promise;
}

// prepareTier(payloadBytes): the Cache stage prepares its memory for blocks
// of that payload (the filling thread does the work; this returns at once).
// False when there is no stage or it knows a block size already.
Napi::Value EngineWrap::PrepareTier(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  CheckOpen(env);
  if (info.Length() < 1 || !info[0].IsNumber()) throw ArgTypeError(env, "prepareTier(payloadBytes: number)");
  const uint64_t bytes = SafeUint(env, info[0].As<Napi::Number>().DoubleValue(), "payloadBytes");
  if (bytes > core_->options().max_block_bytes)
    throw ArgRangeError(env, "payloadBytes " + std::to_string(bytes) + " is above maxBlockBytes " +
                                 std::to_string(core_->options().max_block_bytes));
  return Napi::Boolean::New(env, core_->PrepareTier(bytes));
}

Napi::Value EngineWrap::Stats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto out = Napi::Object::New(env);
  out.Set("threads", core_ ? core_->options().threads : 0);
  out.Set("workers", core_ ? core_->workers() : 0);
  out.Set("queuedBlocks", core_ ? core_->queued_blocks() : 0);
  out.Set("queuedLookups", core_ ? core_->queued_lookups() : 0);
  out.Set("stagingBytes", Napi::Number::New(env, core_ ? static_cast<double>(core_->staging_bytes()) : 0));
  out.Set("pinnedBytes", Napi::Number::New(env, core_ ? static_cast<double>(core_->pinned_bytes()) : 0));
  out.Set("storageBusyNs", Napi::Number::New(env, core_ ? static_cast<double>(core_->storage_busy_ns()) : 0));
  out.Set("storageWaitNs", Napi::Number::New(env, core_ ? static_cast<double>(core_->storage_wait_ns()) : 0));
  out.Set("inflight", channel_->inflight());
  out.Set("regions", static_cast<double>(regions_.size()));
  out.Set("crc32cHardware", Crc32cHardware());
  return out;
}

// Finishes running blocks, cancels queued ones, settles every promise.
Napi::Value EngineWrap::Close(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (core_) {
    core_->Shutdown();
    channel_->Release(env);
    core_.reset();
    regions_.clear();
    events_.clear();
    cancellable_.clear();
  }
  return env.Undefined();
}

void EngineWrap::CheckOpen(Napi::Env env) {
  if (!core_) throw CodedError(env, "closed", "engine is closed");
}

void EngineWrap::Teardown() {
  if (core_) {
    core_->Shutdown();
    core_.reset();
    channel_->Abort();
  }
}

}  // namespace ucm
