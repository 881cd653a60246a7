// See engine_args.h.
#include "engine_args.h"

#include <string>

#include "convert.h"

namespace ucm {

namespace {

uint64_t RequiredUint(const Napi::Object& o, const char* key, uint64_t lo, uint64_t hi) {
  Napi::Env env = o.Env();
  const std::string name = std::string("options.") + key;
  const std::string range = "[" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
  Napi::Value v = o.Get(key);
  if (v.IsUndefined()) throw ArgTypeError(env, name + " is missing (a number in " + range + ")");
  if (!v.IsNumber()) throw ArgTypeError(env, name + " must be a number");
  uint64_t x = SafeUint(env, v.As<Napi::Number>().DoubleValue(), name);
  if (x < lo || x > hi) throw ArgRangeError(env, name + " must be in " + range + ", got " + std::to_string(x));
  return x;
}

bool RequiredFlag(const Napi::Object& o, const char* key) {
  const std::string name = std::string("options.") + key;
  Napi::Value v = o.Get(key);
  if (v.IsUndefined()) throw ArgTypeError(o.Env(), name + " is missing (a boolean)");
  if (!v.IsBoolean()) throw ArgTypeError(o.Env(), name + " must be a boolean");
  return v.As<Napi::Boolean>().Value();
}

// options.storeRoots: the storage directories, absolute; trailing '/' dropped.
StoreRoots StoreRootsOf(const Napi::Object& o) {
  Napi::Env env = o.Env();
  Napi::Value v = o.Get("storeRoots");
  if (v.IsUndefined())
    throw ArgTypeError(env, "options.storeRoots is missing (the storage directories: an array of absolute paths)");
  StoreRoots roots;
  for (std::string& r : StringArray(v, "options.storeRoots")) {
    if (r[0] != '/') throw ArgRangeError(env, "options.storeRoots: " + r + " is not an absolute path");
    while (r.size() > 1 && r.back() == '/') r.pop_back();
    roots.push_back(std::move(r));
  }
  return roots;
}

// An optional number of milliseconds in the spec, as nanoseconds; 0 when absent.
uint64_t OptionalMsAsNs(const Napi::Object& spec, const char* key) {
  Napi::Value v = spec.Get(key);
  if (v.IsUndefined()) return 0;
  if (!v.IsNumber()) throw ArgTypeError(spec.Env(), std::string(key) + " must be a number");
  return SafeUint(spec.Env(), v.As<Napi::Number>().DoubleValue(), key) * 1000000ull;
}

void ParseShards(Napi::Env env, TransferTask& task, const Napi::Uint32Array& shard_region,
                 const Napi::BigUint64Array& shard_offset, const Napi::BigUint64Array& shard_length,
                 const std::unordered_map<uint32_t, std::shared_ptr<Region>>& regions) {
  const size_t nshards = shard_region.ElementLength();
  task.shards.resize(nshards);
  for (size_t s = 0; s < nshards; ++s) {
    const std::string at = "shard " + std::to_string(s);
    auto it = regions.find(shard_region[s]);
    if (it == regions.end())
      throw CodedRangeError(env, "unknown_region", at + ": unknown region " + std::to_string(shard_region[s]));
    Shard& sh = task.shards[s];
    sh.region = it->second;
    sh.offset = shard_offset[s];
    sh.length = shard_length[s];
    if (sh.length == 0) throw ArgRangeError(env, at + ": length must be positive");
    if (!sh.region->Contains(sh.offset, sh.length))
      throw CodedRangeError(env, "out_of_bounds",
                            at + ": [" + std::to_string(sh.offset) + ", +" + std::to_string(sh.length) +
                                ") lies outside region " + std::to_string(shard_region[s]) + " of " +
                                std::to_string(sh.region->size()) + " bytes");
  }
}

void ParseBlocks(Napi::Env env, TransferTask& task, std::vector<std::string> paths,
                 const Napi::Uint32Array& block_shards, uint64_t max_block_bytes) {
  const size_t nblocks = paths.size(), nshards = task.shards.size();
  task.blocks.resize(nblocks);
  uint64_t next = 0;
  for (size_t b = 0; b < nblocks; ++b) {
    BlockJob& job = task.blocks[b];
    const uint32_t count = block_shards[b];
    if (count == 0) throw ArgRangeError(env, "block " + std::to_string(b) + " has no shards");
    if (next + count > nshards) throw ArgRangeError(env, "blockShards counts more shards than shardRegion holds");
    job.path = std::move(paths[b]);
    job.shard_begin = static_cast<uint32_t>(next);
    job.shard_end = static_cast<uint32_t>(next + count);
    for (uint32_t s = job.shard_begin; s < job.shard_end; ++s) job.bytes += task.shards[s].length;
    if (job.bytes > max_block_bytes)
      throw CodedRangeError(env, "too_large",
                            "block " + std::to_string(b) + " is " + std::to_string(job.bytes) +
                                " bytes, above maxBlockBytes " + std::to_string(max_block_bytes));
    next += count;
  }
  if (next != nshards) throw ArgRangeError(env, "blockShards counts fewer shards than shardRegion holds");
}

}  // namespace

EngineOptions ParseEngineOptions(const Napi::Value& options) {
  Napi::Env env = options.Env();
  if (!options.IsObject()) throw ArgTypeError(env, "options must be an object");
  auto o = options.As<Napi::Object>();
  EngineOptions opts;
  opts.threads = static_cast<uint32_t>(RequiredUint(o, "threads", 1, 1024));
  opts.meta_threads = static_cast<uint32_t>(RequiredUint(o, "metaThreads", 1, 64));
  opts.max_block_bytes = RequiredUint(o, "maxBlockBytes", 4096, 1ull << 40);
  opts.pinned_staging_bytes = RequiredUint(o, "pinnedStagingBytes", 1ull << 20, 1ull << 44);
  opts.cuda_event_timeout_ms = static_cast<uint32_t>(RequiredUint(o, "cudaEventTimeoutMs", 1, 3600000));
  opts.host_tier_bytes = RequiredUint(o, "hostTierBytes", 0, 1ull << 50);
  Napi::Value copy = o.Get("cudaCopy");
  if (copy.IsUndefined()) throw ArgTypeError(env, "options.cudaCopy is missing (\"kernel\" or \"batch\")");
  const std::string m = copy.IsString() ? copy.As<Napi::String>().Utf8Value() : "";
  if (m != "kernel" && m != "batch") throw ArgTypeError(env, "options.cudaCopy must be \"kernel\" or \"batch\"");
  opts.cuda_copy = m == "batch" ? CudaCopy::kBatch : CudaCopy::kKernel;
  opts.io.roots = StoreRootsOf(o);
  opts.io.odirect = RequiredFlag(o, "odirect");
  opts.io.fsync = RequiredFlag(o, "fsync");
  opts.write_behind = RequiredFlag(o, "writeBehind");
  return opts;
}

std::shared_ptr<TransferTask> ParseTransferSpec(const Napi::Object& spec, Op op,
                                                const std::unordered_map<uint32_t, std::shared_ptr<Region>>& regions,
                                                const std::unordered_map<uint32_t, std::shared_ptr<CudaEvent>>& events,
                                                uint64_t max_block_bytes) {
  Napi::Env env = spec.Env();
  auto task = std::make_shared<TransferTask>();
  task->op = op;
  auto paths = StringArray(spec.Get("paths"), "paths");
  Napi::Value digest = spec.Get("layoutDigest");
  if (!digest.IsBigInt()) throw ArgTypeError(env, "layoutDigest must be a bigint");
  bool lossless = false;
  task->layout_digest = digest.As<Napi::BigInt>().Uint64Value(&lossless);
  if (!lossless) throw ArgRangeError(env, "layoutDigest must fit in 64 unsigned bits");
  auto block_shards = TypedArrayOf<Napi::Uint32Array>(spec, "blockShards", napi_uint32_array, "Uint32Array");
  auto shard_region = TypedArrayOf<Napi::Uint32Array>(spec, "shardRegion", napi_uint32_array, "Uint32Array");
  auto shard_offset = TypedArrayOf<Napi::BigUint64Array>(spec, "shardOffset", napi_biguint64_array, "BigUint64Array");
  auto shard_length = TypedArrayOf<Napi::BigUint64Array>(spec, "shardLength", napi_biguint64_array, "BigUint64Array");
  const size_t nshards = shard_region.ElementLength();
  if (block_shards.ElementLength() != paths.size())
    throw ArgRangeError(env, "blockShards has " + std::to_string(block_shards.ElementLength()) + " entries for " +
                                 std::to_string(paths.size()) + " paths");
  if (shard_offset.ElementLength() != nshards || shard_length.ElementLength() != nshards)
    throw ArgRangeError(env, "shardRegion, shardOffset and shardLength must have the same length");
  ParseShards(env, *task, shard_region, shard_offset, shard_length, regions);
  ParseBlocks(env, *task, std::move(paths), block_shards, max_block_bytes);

  Napi::Value wait_event = spec.Get("waitEvent");
  if (!wait_event.IsUndefined()) {
    if (!wait_event.IsNumber()) throw ArgTypeError(env, "waitEvent must be an event id");
    auto it = events.find(wait_event.As<Napi::Number>().Uint32Value());
    if (it == events.end())
      throw CodedRangeError(env, "unknown_event", "waitEvent: unknown event " + wait_event.ToString().Utf8Value());
    task->wait_event = it->second;
  }
  task->max_queue_ns = OptionalMsAsNs(spec, "maxQueueMs");
  // Milliseconds from now; no copy out of or into the client's memory starts later.
  if (!spec.Get("deadlineMs").IsUndefined()) task->deadline_ns = NowNs() + OptionalMsAsNs(spec, "deadlineMs");
  return task;
}

}  // namespace ucm
