// Node-API surface of the transfer core. It validates and converts
// arguments on the JS thread, hands plain C++ structs to the core, and
// settles promises from one thread-safe completion channel. It never moves
// payload bytes itself and worker threads never touch JS values.
#include <napi.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "capacity.h"
#include "crc32c.h"
#include "cuda_backend.h"
#include "file_modes.h"
#include "peers.h"
#include "region.h"
#include "transfer.h"

namespace ucm {
namespace {

constexpr double kMaxSafeInt = 9007199254740991.0;  // 2^53 - 1

// Something that finished off-thread and settles its promise on the JS thread.
struct Pending {
  explicit Pending(Napi::Env env) : deferred(Napi::Promise::Deferred::New(env)) {}
  virtual ~Pending() = default;
  virtual Napi::Value Result(Napi::Env env) = 0;
  Napi::Promise::Deferred deferred;
};

struct PendingTransfer final : Pending {
  using Pending::Pending;
  std::shared_ptr<TransferTask> task;
  int64_t cancel_id = -1;  // key in Engine::cancellable_, when the spec gave one
  Napi::Value Result(Napi::Env env) override {
    const size_t n = task->results.size();
    auto status = Napi::Int32Array::New(env, n);
    auto err = Napi::Int32Array::New(env, n);
    auto what = Napi::Array::New(env, n);
    for (size_t i = 0; i < n; ++i) {
      status[i] = static_cast<int32_t>(task->results[i].status);
      err[i] = task->results[i].err;
      const IoResult& r = task->results[i];
      what.Set(static_cast<uint32_t>(i), Napi::String::New(env, r.detail.empty() ? std::string(r.what) : r.what + std::string(": ") + r.detail));
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
};

// cancel(): "stopped" once no block of the task can write memory any more,
// "finished" when it was not running, "timeout" when a copy outlived the wait.
struct PendingCancel final : Pending {
  using Pending::Pending;
  std::shared_ptr<TransferTask> task;
  const char* outcome = "finished";
  Napi::Value Result(Napi::Env env) override { return Napi::String::New(env, outcome); }
};

// A metadata batch split over the metadata pool; each chunk fills its slice.
struct PendingMeta final : Pending {
  PendingMeta(Napi::Env env, std::vector<std::string> a, std::vector<std::string> b)
      : Pending(env), first(std::move(a)), second(std::move(b)), codes(first.size(), 0) {}
  std::vector<std::string> first;
  std::vector<std::string> second;
  std::vector<int32_t> codes;
  std::atomic<uint32_t> chunks_left{0};
  bool bytes_result = false;  // lookup answers a Uint8Array, others an Int32Array
  Napi::Value Result(Napi::Env env) override {
    if (bytes_result) {
      auto out = Napi::Uint8Array::New(env, codes.size());
      for (size_t i = 0; i < codes.size(); ++i) out[i] = static_cast<uint8_t>(codes[i]);
      return out;
    }
    auto out = Napi::Int32Array::New(env, codes.size());
    for (size_t i = 0; i < codes.size(); ++i) out[i] = codes[i];
    return out;
  }
};

std::vector<std::string> StringArray(const Napi::Value& v, const char* field) {
  if (!v.IsArray()) throw Napi::TypeError::New(v.Env(), std::string(field) + " must be an array of strings");
  auto arr = v.As<Napi::Array>();
  std::vector<std::string> out;
  out.reserve(arr.Length());
  for (uint32_t i = 0; i < arr.Length(); ++i) {
    Napi::Value e = arr.Get(i);
    if (!e.IsString())
      throw Napi::TypeError::New(v.Env(), std::string(field) + "[" + std::to_string(i) + "] must be a string");
    std::string s = e.As<Napi::String>().Utf8Value();
    if (s.empty() || s.find('\0') != std::string::npos)
      throw Napi::TypeError::New(v.Env(), std::string(field) + "[" + std::to_string(i) + "] must be a non-empty path");
    out.push_back(std::move(s));
  }
  return out;
}

template <typename T>
T TypedArrayOf(const Napi::Object& spec, const char* field, napi_typedarray_type type, const char* type_name) {
  Napi::Value v = spec.Get(field);
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != type)
    throw Napi::TypeError::New(spec.Env(), std::string(field) + " must be a " + type_name);
  return v.As<T>();
}

uint64_t SafeUint(Napi::Env env, double d, const std::string& what) {
  if (!(d >= 0) || d > kMaxSafeInt || std::floor(d) != d)
    throw Napi::RangeError::New(env, what + " must be a non-negative integer, got " + std::to_string(d));
  return static_cast<uint64_t>(d);
}

class Engine : public Napi::ObjectWrap<Engine> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "Engine",
                       {InstanceMethod<&Engine::OpenHostRegion>("openHostRegion"),
                        InstanceMethod<&Engine::OpenCudaRegion>("openCudaRegion"),
                        InstanceMethod<&Engine::OpenCudaEvent>("openCudaEvent"),
                        InstanceMethod<&Engine::CloseEvent>("closeEvent"),
                        InstanceMethod<&Engine::Cancel>("cancel"),
                        InstanceMethod<&Engine::CloseRegion>("closeRegion"),
                        InstanceMethod<&Engine::Dump>("dump"),
                        InstanceMethod<&Engine::Load>("load"),
                        InstanceMethod<&Engine::Lookup>("lookup"),
                        InstanceMethod<&Engine::Commit>("commit"),
                        InstanceMethod<&Engine::Remove>("remove"),
                        InstanceMethod<&Engine::Stats>("stats"),
                        InstanceMethod<&Engine::Close>("close")});
  }

  explicit Engine(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Engine>(info) {
    Napi::Env env = info.Env();
    EngineOptions opts;
    if (info.Length() > 0 && !info[0].IsUndefined()) {
      if (!info[0].IsObject()) throw Napi::TypeError::New(env, "options must be an object");
      auto o = info[0].As<Napi::Object>();
      auto num = [&](const char* key, uint64_t lo, uint64_t hi, uint64_t dflt) -> uint64_t {
        Napi::Value v = o.Get(key);
        if (v.IsUndefined()) return dflt;
        if (!v.IsNumber()) throw Napi::TypeError::New(env, std::string("options.") + key + " must be a number");
        uint64_t x = SafeUint(env, v.As<Napi::Number>().DoubleValue(), std::string("options.") + key);
        if (x < lo || x > hi)
          throw Napi::RangeError::New(env, std::string("options.") + key + " must be in [" + std::to_string(lo) +
                                               ", " + std::to_string(hi) + "], got " + std::to_string(x));
        return x;
      };
      auto flag = [&](const char* key, bool dflt) -> bool {
        Napi::Value v = o.Get(key);
        if (v.IsUndefined()) return dflt;
        if (!v.IsBoolean()) throw Napi::TypeError::New(env, std::string("options.") + key + " must be a boolean");
        return v.As<Napi::Boolean>().Value();
      };
      opts.threads = static_cast<uint32_t>(num("threads", 1, 1024, 32));
      opts.meta_threads = static_cast<uint32_t>(num("metaThreads", 1, 64, 4));
      opts.max_block_bytes = num("maxBlockBytes", 1, 1ull << 40, 1ull << 30);
      opts.pinned_staging_bytes = num("pinnedStagingBytes", 4096, 1ull << 44, 2ull << 30);
      opts.cuda_event_timeout_ms = static_cast<uint32_t>(num("cudaEventTimeoutMs", 1, 3600000, 30000));
      Napi::Value copy = o.Get("cudaCopy");
      if (!copy.IsUndefined()) {
        std::string m = copy.IsString() ? copy.As<Napi::String>().Utf8Value() : "";
        if (m != "kernel" && m != "batch") throw Napi::TypeError::New(env, "options.cudaCopy must be \"kernel\" or \"batch\"");
        opts.cuda_copy = m == "batch" ? CudaCopy::kBatch : CudaCopy::kKernel;
      }
      opts.io.odirect = flag("odirect", true);
      opts.io.fsync = flag("fsync", false);
    }
    core_ = std::make_unique<TransferEngine>(opts);
    tsfn_ = Napi::ThreadSafeFunction::New(env, Napi::Function::New(env, [](const Napi::CallbackInfo&) {}),
                                          "ucm-transfer-done", 0, 1);
    tsfn_.Unref(env);
    cleanup_ = env.AddCleanupHook(std::function<void()>([this] {
      hook_ran_ = true;
      Teardown();
    }));
  }

  ~Engine() override {
    // Collected before environment teardown: the hook must not fire on a dead object.
    if (!hook_ran_) cleanup_.Remove(Env());
    Teardown();
  }

 private:
  // ---- regions -------------------------------------------------------------
  Napi::Value OpenHostRegion(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    CheckOpen(env);
    if (info.Length() < 2 || !info[0].IsString() || !info[1].IsNumber() || (info.Length() > 2 && !info[2].IsUndefined() && !info[2].IsNumber()))
      throw Napi::TypeError::New(env, "openHostRegion(source: string, size: number, pid?: number)");
    std::string source = info[0].As<Napi::String>().Utf8Value();
    uint64_t size = SafeUint(env, info[1].As<Napi::Number>().DoubleValue(), "region size");
    // The client's process: the only one whose /proc/<pid>/fd/<n> it may name.
    const int pid = info.Length() > 2 && info[2].IsNumber() ? info[2].As<Napi::Number>().Int32Value() : 0;
    std::string error;
    auto region = HostRegion::Open(source, size, pid, &error);
    if (!region) throw Napi::Error::New(env, error);
    uint32_t id = next_region_++;
    regions_[id] = std::move(region);
    return Napi::Number::New(env, id);
  }

  static std::string Bytes(const Napi::Value& v, const char* what) {
    if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array)
      throw Napi::TypeError::New(v.Env(), std::string(what) + " must be a Uint8Array");
    auto a = v.As<Napi::Uint8Array>();
    return std::string(reinterpret_cast<const char*>(a.Data()), a.ByteLength());
  }

  // Optional PCI bus id argument: "" or undefined means "use the ordinal".
  static std::string BusId(const Napi::CallbackInfo& info, size_t i) {
    if (info.Length() <= i || info[i].IsUndefined() || info[i].IsNull()) return "";
    if (!info[i].IsString()) throw Napi::TypeError::New(info.Env(), "pciBusId must be a string");
    return info[i].As<Napi::String>().Utf8Value();
  }

  // openCudaRegion(device, handle: Uint8Array(64), offset, size, pciBusId?) -> id
  Napi::Value OpenCudaRegion(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    CheckOpen(env);
    if (info.Length() < 4 || !info[0].IsNumber() || !info[2].IsNumber() || !info[3].IsNumber())
      throw Napi::TypeError::New(env, "openCudaRegion(device: number, handle: Uint8Array, offset: number, size: number, pciBusId?: string)");
    const int device = static_cast<int>(SafeUint(env, info[0].As<Napi::Number>().DoubleValue(), "device"));
    std::string error;
    auto region = CudaRegion::Open(device, BusId(info, 4), Bytes(info[1], "handle"),
                                   SafeUint(env, info[2].As<Napi::Number>().DoubleValue(), "offset"),
                                   SafeUint(env, info[3].As<Napi::Number>().DoubleValue(), "region size"), &error);
    if (!region) throw Napi::Error::New(env, error);
    uint32_t id = next_region_++;
    regions_[id] = std::move(region);
    return Napi::Number::New(env, id);
  }

  // openCudaEvent(device, handle: Uint8Array(64), pciBusId?) -> id
  Napi::Value OpenCudaEvent(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    CheckOpen(env);
    if (info.Length() < 2 || !info[0].IsNumber()) throw Napi::TypeError::New(env, "openCudaEvent(device: number, handle: Uint8Array, pciBusId?: string)");
    const int device = static_cast<int>(SafeUint(env, info[0].As<Napi::Number>().DoubleValue(), "device"));
    std::string error;
    auto ev = CudaEvent::Open(device, BusId(info, 2), Bytes(info[1], "handle"), &error);
    if (!ev) throw Napi::Error::New(env, error);
    uint32_t id = next_region_++;
    events_[id] = std::move(ev);
    return Napi::Number::New(env, id);
  }

  Napi::Value CloseEvent(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 1 || !info[0].IsNumber()) throw Napi::TypeError::New(env, "closeEvent(id: number)");
    return Napi::Boolean::New(env, events_.erase(info[0].As<Napi::Number>().Uint32Value()) > 0);
  }

  Napi::Value CloseRegion(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 1 || !info[0].IsNumber()) throw Napi::TypeError::New(env, "closeRegion(id: number)");
    uint32_t id = info[0].As<Napi::Number>().Uint32Value();
    // Tasks in flight hold their own reference; the mapping goes with the last one.
    return Napi::Boolean::New(env, regions_.erase(id) > 0);
  }

  // ---- transfers -----------------------------------------------------------
  Napi::Value Dump(const Napi::CallbackInfo& info) { return Transfer(info, Op::kDump); }
  Napi::Value Load(const Napi::CallbackInfo& info) { return Transfer(info, Op::kLoad); }

  // spec: { paths: string[], layoutDigest: bigint, blockShards: Uint32Array,
  //         shardRegion: Uint32Array, shardOffset: Float64Array, shardLength: Float64Array }
  Napi::Value Transfer(const Napi::CallbackInfo& info, Op op) {
    Napi::Env env = info.Env();
    CheckOpen(env);
    if (info.Length() < 1 || !info[0].IsObject()) throw Napi::TypeError::New(env, "transfer spec must be an object");
    auto spec = info[0].As<Napi::Object>();
    auto task = std::make_shared<TransferTask>();
    task->op = op;
    auto paths = StringArray(spec.Get("paths"), "paths");
    Napi::Value digest = spec.Get("layoutDigest");
    if (!digest.IsBigInt()) throw Napi::TypeError::New(env, "layoutDigest must be a bigint");
    bool lossless = false;
    task->layout_digest = digest.As<Napi::BigInt>().Uint64Value(&lossless);
    if (!lossless) throw Napi::RangeError::New(env, "layoutDigest must fit in 64 unsigned bits");
    auto block_shards = TypedArrayOf<Napi::Uint32Array>(spec, "blockShards", napi_uint32_array, "Uint32Array");
    auto shard_region = TypedArrayOf<Napi::Uint32Array>(spec, "shardRegion", napi_uint32_array, "Uint32Array");
    auto shard_offset = TypedArrayOf<Napi::Float64Array>(spec, "shardOffset", napi_float64_array, "Float64Array");
    auto shard_length = TypedArrayOf<Napi::Float64Array>(spec, "shardLength", napi_float64_array, "Float64Array");
    const size_t nblocks = paths.size();
    const size_t nshards = shard_region.ElementLength();
    if (block_shards.ElementLength() != nblocks)
      throw Napi::RangeError::New(env, "blockShards has " + std::to_string(block_shards.ElementLength()) +
                                           " entries for " + std::to_string(nblocks) + " paths");
    if (shard_offset.ElementLength() != nshards || shard_length.ElementLength() != nshards)
      throw Napi::RangeError::New(env, "shardRegion, shardOffset and shardLength must have the same length");

    task->shards.resize(nshards);
    for (size_t s = 0; s < nshards; ++s) {
      const std::string at = "shard " + std::to_string(s);
      auto it = regions_.find(shard_region[s]);
      if (it == regions_.end())
        throw Napi::RangeError::New(env, at + ": unknown region " + std::to_string(shard_region[s]));
      Shard& sh = task->shards[s];
      sh.region = it->second;
      sh.offset = SafeUint(env, shard_offset[s], at + " offset");
      sh.length = SafeUint(env, shard_length[s], at + " length");
      if (sh.length == 0) throw Napi::RangeError::New(env, at + ": length must be positive");
      if (!sh.region->Contains(sh.offset, sh.length))
        throw Napi::RangeError::New(env, at + ": [" + std::to_string(sh.offset) + ", +" + std::to_string(sh.length) +
                                             ") lies outside region " + std::to_string(shard_region[s]) + " of " +
                                             std::to_string(sh.region->size()) + " bytes");
    }
    task->blocks.resize(nblocks);
    uint64_t next = 0;
    for (size_t b = 0; b < nblocks; ++b) {
      BlockJob& job = task->blocks[b];
      const uint32_t count = block_shards[b];
      if (count == 0) throw Napi::RangeError::New(env, "block " + std::to_string(b) + " has no shards");
      if (next + count > nshards)
        throw Napi::RangeError::New(env, "blockShards counts more shards than shardRegion holds");
      job.path = std::move(paths[b]);
      job.shard_begin = static_cast<uint32_t>(next);
      job.shard_end = static_cast<uint32_t>(next + count);
      for (uint32_t s = job.shard_begin; s < job.shard_end; ++s) job.bytes += task->shards[s].length;
      if (job.bytes > core_->options().max_block_bytes)
        throw Napi::RangeError::New(env, "block " + std::to_string(b) + " is " + std::to_string(job.bytes) +
                                             " bytes, above maxBlockBytes " +
                                             std::to_string(core_->options().max_block_bytes));
      next += count;
    }
    if (next != nshards) throw Napi::RangeError::New(env, "blockShards counts fewer shards than shardRegion holds");

    Napi::Value wait_event = spec.Get("waitEvent");
    if (!wait_event.IsUndefined()) {
      if (!wait_event.IsNumber()) throw Napi::TypeError::New(env, "waitEvent must be an event id");
      auto it = events_.find(wait_event.As<Napi::Number>().Uint32Value());
      if (it == events_.end()) throw Napi::RangeError::New(env, "waitEvent: unknown event " + wait_event.ToString().Utf8Value());
      task->wait_event = it->second;
    }
    Napi::Value max_queue = spec.Get("maxQueueMs");
    if (!max_queue.IsUndefined()) {
      if (!max_queue.IsNumber()) throw Napi::TypeError::New(env, "maxQueueMs must be a number");
      task->max_queue_ns = SafeUint(env, max_queue.As<Napi::Number>().DoubleValue(), "maxQueueMs") * 1000000ull;
    }

    Napi::Value deadline = spec.Get("deadlineMs");
    if (!deadline.IsUndefined()) {
      if (!deadline.IsNumber()) throw Napi::TypeError::New(env, "deadlineMs must be a number");
      // Milliseconds from now; no copy out of or into the client's memory starts later.
      task->deadline_ns = NowNs() + SafeUint(env, deadline.As<Napi::Number>().DoubleValue(), "deadlineMs") * 1000000ull;
    }

    auto pending = std::make_unique<PendingTransfer>(env);
    pending->task = task;
    Napi::Value cancel_id = spec.Get("cancelId");
    if (!cancel_id.IsUndefined()) {
      if (!cancel_id.IsNumber()) throw Napi::TypeError::New(env, "cancelId must be a number");
      const uint32_t id = cancel_id.As<Napi::Number>().Uint32Value();
      if (cancellable_.count(id)) throw Napi::RangeError::New(env, "cancelId " + std::to_string(id) + " is in use");
      cancellable_[id] = task;
      pending->cancel_id = id;
    }
    Napi::Promise promise = pending->deferred.Promise();
    Pending* raw = Track(env, std::move(pending));
    core_->Submit(task, [this, raw](std::shared_ptr<TransferTask>) { Complete(raw); });
    return promise;
  }

  // cancel(cancelId, timeoutMs) -> Promise<"stopped" | "finished" | "timeout">
  Napi::Value Cancel(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    CheckOpen(env);
    if (info.Length() < 2 || !info[0].IsNumber() || !info[1].IsNumber())
      throw Napi::TypeError::New(env, "cancel(cancelId: number, timeoutMs: number)");
    auto p = std::make_unique<PendingCancel>(env);
    Napi::Promise promise = p->deferred.Promise();
    auto it = cancellable_.find(info[0].As<Napi::Number>().Uint32Value());
    PendingCancel* c = p.get();
    Pending* raw = Track(env, std::move(p));
    if (it == cancellable_.end()) {
      Complete(raw);
      return promise;
    }
    c->task = it->second;
    const uint32_t timeout = static_cast<uint32_t>(SafeUint(env, info[1].As<Napi::Number>().DoubleValue(), "timeoutMs"));
    core_->PostMeta([this, c, raw, timeout] {
      c->outcome = TransferEngine::Cancel(*c->task, timeout) ? "stopped" : "timeout";
      Complete(raw);
    });
    return promise;
  }

  // ---- metadata --------------------------------------------------------------
  Napi::Value Lookup(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    CheckOpen(env);
    auto p = std::make_unique<PendingMeta>(env, StringArray(info[0], "paths"), std::vector<std::string>{});
    p->bytes_result = true;
    return RunMeta(env, std::move(p), [](PendingMeta& m, size_t i) { m.codes[i] = BlockExists(m.first[i]); }, true);
  }

  Napi::Value Commit(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    CheckOpen(env);
    auto from = StringArray(info[0], "from");
    auto to = StringArray(info[1], "to");
    if (from.size() != to.size()) throw Napi::RangeError::New(env, "from and to must have the same length");
    auto p = std::make_unique<PendingMeta>(env, std::move(from), std::move(to));
    return RunMeta(env, std::move(p), [](PendingMeta& m, size_t i) { m.codes[i] = CommitFile(m.first[i], m.second[i]); });
  }

  Napi::Value Remove(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    CheckOpen(env);
    auto p = std::make_unique<PendingMeta>(env, StringArray(info[0], "paths"), std::vector<std::string>{});
    return RunMeta(env, std::move(p), [](PendingMeta& m, size_t i) { m.codes[i] = RemoveFile(m.first[i]); });
  }

  template <typename Fn>
  Napi::Value RunMeta(Napi::Env env, std::unique_ptr<PendingMeta> p, Fn fn, bool lookup = false) {
    Napi::Promise promise = p->deferred.Promise();
    PendingMeta* m = p.get();
    Pending* raw = Track(env, std::move(p));
    const size_t n = m->first.size();
    if (n == 0) {
      Complete(raw);
      return promise;
    }
    // Split over the metadata threads; small batches stay in one piece.
    const size_t chunk = std::max<size_t>(32, (n + core_->options().meta_threads - 1) / core_->options().meta_threads);
    const uint32_t chunks = static_cast<uint32_t>((n + chunk - 1) / chunk);
    m->chunks_left.store(chunks);
    for (uint32_t c = 0; c < chunks; ++c) {
      const size_t begin = c * chunk, end = std::min(n, begin + chunk);
      auto job = [this, m, raw, begin, end, fn] {
        for (size_t i = begin; i < end; ++i) fn(*m, i);
        if (m->chunks_left.fetch_sub(1) == 1) Complete(raw);
      };
      if (lookup) core_->PostLookup(std::move(job));
      else core_->PostMeta(std::move(job));
    }
    return promise;
  }

  // ---- misc ------------------------------------------------------------------
  Napi::Value Stats(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto out = Napi::Object::New(env);
    out.Set("threads", core_ ? core_->options().threads : 0);
    out.Set("queuedBlocks", core_ ? core_->queued_blocks() : 0);
    out.Set("queuedLookups", core_ ? core_->queued_lookups() : 0);
    out.Set("stagingBytes", Napi::Number::New(env, core_ ? static_cast<double>(core_->staging_bytes()) : 0));
    out.Set("pinnedBytes", Napi::Number::New(env, core_ ? static_cast<double>(core_->pinned_bytes()) : 0));
    out.Set("inflight", inflight_);
    out.Set("regions", static_cast<double>(regions_.size()));
    out.Set("crc32cHardware", Crc32cHardware());
    return out;
  }

  // Finishes running blocks, cancels queued ones, settles every promise.
  Napi::Value Close(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (core_) {
      core_->Shutdown();
      Drain(env);
      core_.reset();
      regions_.clear();
      events_.clear();
      cancellable_.clear();
      tsfn_.Release();
    }
    return env.Undefined();
  }

  // ---- completion channel ------------------------------------------------------
  Pending* Track(Napi::Env env, std::unique_ptr<Pending> p) {
    Pending* raw = p.get();
    owned_.emplace(raw, std::move(p));
    if (inflight_++ == 0) {
      tsfn_.Ref(env);
      Ref();  // keep this object alive while native work refers to it
    }
    return raw;
  }

  // Any thread. Queues `p` and wakes the JS thread once per batch.
  void Complete(Pending* p) {
    bool wake;
    {
      std::lock_guard<std::mutex> lock(done_mu_);
      wake = done_.empty();
      done_.push_back(p);
    }
    if (wake) tsfn_.NonBlockingCall([this](Napi::Env env, Napi::Function) { Drain(env); });
  }

  // JS thread.
  void Drain(Napi::Env env) {
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
      if (auto* t = dynamic_cast<PendingTransfer*>(own.get()); t && t->cancel_id >= 0)
        cancellable_.erase(static_cast<uint32_t>(t->cancel_id));
      own->deferred.Resolve(own->Result(env));
      if (--inflight_ == 0) {
        if (core_) tsfn_.Unref(env);
        Unref();
      }
    }
  }

  void CheckOpen(Napi::Env env) {
    if (!core_) throw Napi::Error::New(env, "engine is closed");
  }

  // Environment teardown: stop the threads; promises are abandoned with it.
  void Teardown() {
    if (core_) {
      core_->Shutdown();
      core_.reset();
      tsfn_.Abort();
    }
  }

  // Declaration order matters: core_ (threads) is destroyed first, before the
  // maps its callbacks refer to.
  std::unordered_map<uint32_t, std::shared_ptr<Region>> regions_;
  std::unordered_map<uint32_t, std::shared_ptr<CudaEvent>> events_;
  std::unordered_map<uint32_t, std::shared_ptr<TransferTask>> cancellable_;  // running tasks by cancelId
  uint32_t next_region_ = 1;
  std::unordered_map<Pending*, std::unique_ptr<Pending>> owned_;
  std::mutex done_mu_;
  std::vector<Pending*> done_;
  uint32_t inflight_ = 0;
  Napi::ThreadSafeFunction tsfn_;
  Napi::Env::CleanupHook<std::function<void()>> cleanup_;
  bool hook_ran_ = false;
  std::unique_ptr<TransferEngine> core_;
};

Napi::Value Crc32cJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsTypedArray()) throw Napi::TypeError::New(env, "crc32c(data: Uint8Array)");
  auto arr = info[0].As<Napi::TypedArray>();
  const uint8_t* p = static_cast<const uint8_t*>(arr.ArrayBuffer().Data()) + arr.ByteOffset();
  return Napi::Number::New(env, Crc32c(0, p, arr.ByteLength()));
}

// ---- capacity: ledger and eviction, on the libuv pool (rare, may be slow on NFS) --

class UsageWorker final : public Napi::AsyncWorker {
 public:
  UsageWorker(Napi::Env env, std::string dir, int64_t db, int64_t df, int timeout_ms)
      : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)), dir_(std::move(dir)), db_(db), df_(df),
        timeout_ms_(timeout_ms) {}
  Napi::Promise Promise() { return deferred_.Promise(); }
  void Execute() override { rc_ = LedgerAdd(dir_, db_, df_, timeout_ms_, &usage_); }
  void OnOK() override {
    Napi::Env env = Env();
    if (rc_ != 0) {
      deferred_.Reject(Napi::Error::New(env, "usage ledger of " + dir_ + ": " + std::strerror(rc_)).Value());
      return;
    }
    auto out = Napi::Object::New(env);
    out.Set("bytes", Napi::Number::New(env, static_cast<double>(usage_.bytes)));
    out.Set("files", Napi::Number::New(env, static_cast<double>(usage_.files)));
    out.Set("existed", Napi::Boolean::New(env, usage_.existed));
    deferred_.Resolve(out);
  }

 private:
  Napi::Promise::Deferred deferred_;
  std::string dir_;
  int64_t db_, df_;
  int timeout_ms_;
  int rc_ = 0;
  Usage usage_;
};

int64_t SafeInt(Napi::Env env, const Napi::Value& v, const std::string& what) {
  if (!v.IsNumber()) throw Napi::TypeError::New(env, what + " must be a number");
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(std::fabs(d) <= kMaxSafeInt) || std::floor(d) != d)
    throw Napi::RangeError::New(env, what + " must be an integer, got " + std::to_string(d));
  return static_cast<int64_t>(d);
}

// usageAdd(dir, deltaBytes, deltaFiles, timeoutMs) -> Promise<{bytes, files, existed}>
Napi::Value UsageAddJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 4 || !info[0].IsString())
    throw Napi::TypeError::New(env, "usageAdd(dir: string, deltaBytes: number, deltaFiles: number, timeoutMs: number)");
  auto* w = new UsageWorker(env, info[0].As<Napi::String>().Utf8Value(), SafeInt(env, info[1], "deltaBytes"),
                            SafeInt(env, info[2], "deltaFiles"),
                            static_cast<int>(SafeUint(env, info[3].ToNumber().DoubleValue(), "timeoutMs")));
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

class EvictWorker final : public Napi::AsyncWorker {
 public:
  EvictWorker(Napi::Env env, EvictRequest req)
      : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)), req_(std::move(req)) {}
  Napi::Promise Promise() { return deferred_.Promise(); }
  void Execute() override { Evict(req_, &res_); }
  void OnOK() override {
    Napi::Env env = Env();
    auto out = Napi::Object::New(env);
    auto num = [&](const char* k, double v) { out.Set(k, Napi::Number::New(env, v)); };
    out.Set("busy", Napi::Boolean::New(env, res_.busy));
    out.Set("error", res_.err ? Napi::Value(Napi::String::New(env, std::strerror(res_.err))) : env.Null());
    num("scannedBytes", static_cast<double>(res_.scanned_bytes));
    num("scannedFiles", static_cast<double>(res_.scanned_files));
    num("wantedBytes", static_cast<double>(res_.wanted_bytes));
    num("freedBytes", static_cast<double>(res_.freed_bytes));
    num("freedFiles", static_cast<double>(res_.freed_files));
    num("keptRecent", static_cast<double>(res_.kept_recent));
    num("keptPinned", static_cast<double>(res_.kept_pinned));
    num("vanished", static_cast<double>(res_.vanished));
    num("usedBytes", static_cast<double>(res_.usage.bytes));
    num("usedFiles", static_cast<double>(res_.usage.files));
    deferred_.Resolve(out);
  }

 private:
  Napi::Promise::Deferred deferred_;
  EvictRequest req_;
  EvictResult res_;
};

// evict({dir, targetBytes?, extraBytes?, graceMs, pinned: string[], timeoutMs}) -> Promise<result>
Napi::Value EvictJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsObject()) throw Napi::TypeError::New(env, "evict(request: object)");
  auto o = info[0].As<Napi::Object>();
  if (!o.Get("dir").IsString()) throw Napi::TypeError::New(env, "evict: dir must be a string");
  EvictRequest req;
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
  auto* w = new EvictWorker(env, std::move(req));
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

// connectedPeers(socketPath) -> [{fd, inode, pid, uid}]: accepted connections to our ipc socket, from the kernel.
Napi::Value ConnectedPeersJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString()) throw Napi::TypeError::New(env, "connectedPeers(socketPath: string)");
  const auto peers = ConnectedPeers(info[0].As<Napi::String>().Utf8Value());
  auto out = Napi::Array::New(env, peers.size());
  for (size_t i = 0; i < peers.size(); ++i) {
    auto o = Napi::Object::New(env);
    o.Set("fd", peers[i].fd);
    o.Set("inode", static_cast<double>(peers[i].inode));
    o.Set("pid", static_cast<double>(peers[i].pid));
    o.Set("uid", static_cast<double>(peers[i].uid));
    out.Set(static_cast<uint32_t>(i), o);
  }
  return out;
}

// endConnection(socketPath, fd, inode) -> boolean
Napi::Value EndConnectionJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 3 || !info[0].IsString() || !info[1].IsNumber() || !info[2].IsNumber())
    throw Napi::TypeError::New(env, "endConnection(socketPath: string, fd: number, inode: number)");
  return Napi::Boolean::New(env, EndConnection(info[0].As<Napi::String>().Utf8Value(), info[1].As<Napi::Number>().Int32Value(),
                                               static_cast<uint64_t>(info[2].As<Napi::Number>().DoubleValue())));
}

// listenerPause(socketPath, pauseAt, resumeAt): starts the guard of peers.h (StartListenerPause).
Napi::Value ListenerPauseJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 3 || !info[0].IsString() || !info[1].IsNumber() || !info[2].IsNumber())
    throw Napi::TypeError::New(env, "listenerPause(socketPath: string, pauseAt: number, resumeAt: number)");
  StartListenerPause(info[0].As<Napi::String>().Utf8Value(), info[1].As<Napi::Number>().Int32Value(),
                     info[2].As<Napi::Number>().Int32Value());
  return env.Undefined();
}

// listenerPauseStop(): stops it, the socket's name put back.
Napi::Value ListenerPauseStopJs(const Napi::CallbackInfo& info) {
  StopListenerPause();
  return info.Env().Undefined();
}

// listenerPauseState() -> {running, paused, pauses, hiddenPath, error}
Napi::Value ListenerPauseStateJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const ListenerPauseState st = GetListenerPause();
  auto out = Napi::Object::New(env);
  out.Set("running", st.running);
  out.Set("paused", st.paused);
  out.Set("pauses", static_cast<double>(st.pauses));
  out.Set("hiddenPath", st.hidden_path);
  out.Set("error", st.error);
  return out;
}

// setShareWithGroup(share): modes of files and directories the engine makes (see file_modes.h).
Napi::Value SetShareWithGroupJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsBoolean()) throw Napi::TypeError::New(env, "setShareWithGroup(share: boolean)");
  SetShareWithGroup(info[0].As<Napi::Boolean>().Value());
  return env.Undefined();
}

// widenCpuAffinity() -> {before, after}: CPUs this thread may run on (see peers.h).
Napi::Value WidenCpuAffinityJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const auto r = WidenCpuAffinity();
  auto out = Napi::Object::New(env);
  out.Set("before", r.first);
  out.Set("after", r.second);
  return out;
}

// raiseFdLimit() -> {soft, hard}
Napi::Value RaiseFdLimitJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const auto lim = RaiseFdLimit();
  auto out = Napi::Object::New(env);
  out.Set("soft", static_cast<double>(lim.first));
  out.Set("hard", static_cast<double>(lim.second));
  return out;
}

// cudaStatus() -> {built, emulated, usable, batchCopies, devices, runtimeVersion, driverVersion, why}
Napi::Value CudaStatusJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const CudaStatus& st = CudaProbe();
  auto out = Napi::Object::New(env);
  out.Set("built", st.built);
  out.Set("emulated", st.emulated);
  out.Set("usable", st.usable);
  out.Set("batchCopies", st.batch_copies);
  out.Set("devices", st.devices);
  out.Set("runtimeVersion", st.runtime_version);
  out.Set("driverVersion", st.driver_version);
  out.Set("why", st.why);
  return out;
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("Engine", Engine::Define(env));
  exports.Set("crc32c", Napi::Function::New(env, Crc32cJs, "crc32c"));
  exports.Set("usageAdd", Napi::Function::New(env, UsageAddJs, "usageAdd"));
  exports.Set("evict", Napi::Function::New(env, EvictJs, "evict"));
  exports.Set("cudaStatus", Napi::Function::New(env, CudaStatusJs, "cudaStatus"));
  exports.Set("connectedPeers", Napi::Function::New(env, ConnectedPeersJs, "connectedPeers"));
  exports.Set("endConnection", Napi::Function::New(env, EndConnectionJs, "endConnection"));
  exports.Set("raiseFdLimit", Napi::Function::New(env, RaiseFdLimitJs, "raiseFdLimit"));
  exports.Set("widenCpuAffinity", Napi::Function::New(env, WidenCpuAffinityJs, "widenCpuAffinity"));
  exports.Set("listenerPause", Napi::Function::New(env, ListenerPauseJs, "listenerPause"));
  exports.Set("listenerPauseStop", Napi::Function::New(env, ListenerPauseStopJs, "listenerPauseStop"));
  exports.Set("listenerPauseState", Napi::Function::New(env, ListenerPauseStateJs, "listenerPauseState"));
  exports.Set("setShareWithGroup", Napi::Function::New(env, SetShareWithGroupJs, "setShareWithGroup"));
  auto consts = Napi::Object::New(env);
  consts.Set("headerSize", static_cast<double>(kHeaderSize));
  consts.Set("blockAlign", static_cast<double>(kBlockAlign));
  consts.Set("formatVersion", kFormatVersion);
  consts.Set("cuda", CudaProbe().built);
  exports.Set("constants", consts);
  return exports;
}

}  // namespace
}  // namespace ucm

static Napi::Object InitModule(Napi::Env env, Napi::Object exports) { return ucm::Init(env, exports); }
NODE_API_MODULE(ucm_native, InitModule)
