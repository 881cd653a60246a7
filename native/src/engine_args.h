// The engine's structured arguments, checked and converted on the JS thread:
// the constructor's options and a transfer spec. Everything a worker will
// read is copied into plain C++ structs here.
//
// No defaults live here: core/config.ts owns them and core/native.ts passes
// every option, so the engine never runs with a value nobody chose. A
// missing option is a TypeError naming it; the ranges are config.ts's.
#pragma once
#include <napi.h>

#include <cstdint>
#include <memory>
#include <unordered_map>

#include "cuda_backend.h"
#include "region.h"
#include "transfer.h"

namespace ucm {

// options: { threads, metaThreads, maxBlockBytes, pinnedStagingBytes,
//            cudaEventTimeoutMs, cudaCopy, odirect, fsync }, all required.
EngineOptions ParseEngineOptions(const Napi::Value& options);

// spec: { paths: string[], layoutDigest: bigint, blockShards: Uint32Array,
//         shardRegion: Uint32Array, shardOffset: BigUint64Array, shardLength: BigUint64Array,
//         waitEvent?, maxQueueMs?, deadlineMs? } (cancelId is the engine's).
// Shards resolve against `regions`, waitEvent against `events`.
std::shared_ptr<TransferTask> ParseTransferSpec(const Napi::Object& spec, Op op,
                                                const std::unordered_map<uint32_t, std::shared_ptr<Region>>& regions,
                                                const std::unordered_map<uint32_t, std::shared_ptr<CudaEvent>>& events,
                                                uint64_t max_block_bytes);

}  // namespace ucm
