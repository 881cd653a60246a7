// The transfer core: a pool of native workers moving KV blocks between
// memory regions and block files, up to two for each of the `threads`
// transfer streams (one reads or writes storage while another prepares or
// finishes a block; io_gate.h keeps storage at `threads` transfers in
// flight at most), plus
// a small pool for metadata calls (stat, rename, unlink) so lookups never
// queue behind bulk I/O.
//
// A task is a batch of blocks; each block is a list of shards (region,
// offset, length) concatenated into one payload. Blocks of a task run in
// parallel on the workers; the completion callback fires once, on a worker
// thread, after the last block finished. Loads are served before dumps.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "block_file.h"
#include "cuda_backend.h"
#include "guarded_copy.h"
#include "host_tier.h"
#include "io_gate.h"
#include "region.h"
#include "stager_pool.h"

namespace ucm {

struct Shard {
  std::shared_ptr<Region> region;  // keeps the mapping alive while in flight
  uint64_t offset = 0;
  uint64_t length = 0;
};

struct BlockJob {
  std::string path;          // dump: temporary file to create; load: file to read
  uint32_t shard_begin = 0;  // [shard_begin, shard_end) in TransferTask::shards
  uint32_t shard_end = 0;
  uint64_t bytes = 0;  // sum of the shard lengths
};

enum class Op { kDump = 0, kLoad = 1 };

struct TransferTask {
  Op op = Op::kDump;
  uint64_t layout_digest = 0;
  std::vector<BlockJob> blocks;
  std::vector<Shard> shards;
  std::vector<IoResult> results;  // one per block, written by the worker that ran it
  std::atomic<uint32_t> remaining{0};
  std::atomic<uint64_t> bytes_ok{0};
  uint64_t submit_ns = 0;
  uint64_t finish_ns = 0;
  // Dumps only: a block still queued this long after submit is dropped
  // (kDropped) instead of written; 0 = never. A cache must not fall behind.
  uint64_t max_queue_ns = 0;
  // Dumps of device memory: the interprocess event recorded after the
  // forward pass that wrote the blocks; workers wait on it before reading.
  std::shared_ptr<CudaEvent> wait_event;
  // Cancel (TransferEngine::Cancel): blocks not yet copied out of (dump) or
  // into (load) the client's memory finish as kCancelled. `copying` counts
  // blocks between their check of `cancelled` and the end of their copy, so
  // Cancel can wait for them: after it returns, no byte of this task is read
  // from or written to that memory any more.
  std::atomic<bool> cancelled{false};
  std::atomic<uint32_t> copying{0};
  // The client's deadline (steady clock ns; 0 = none): no copy out of or
  // into its memory starts later, and one that ends later counts for
  // nothing (client_copy.h). A client that gave up may already have reused
  // that memory; a late read would store wrong bytes under a good key, a
  // late write would overwrite what it recomputed.
  uint64_t deadline_ns = 0;
  // Dumps: blocks whose use of the client's memory is over (copied out, or
  // failed or finished without a copy). Once every block is, the client may
  // reuse that memory though writes go on: the vLLM connector hands a
  // finished request's KV blocks back to vLLM then, not after the writes.
  // Each block is counted once, by the one worker that runs it.
  std::atomic<uint32_t> released{0};
  std::vector<uint8_t> released_block;
};

// Owns page-aligned memory; move-only.
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  ~AlignedBuffer();
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  // Makes room for `size` bytes; keeps the buffer if it is large enough.
  bool Reserve(size_t size);
  uint8_t* data() const { return data_; }
  size_t capacity() const { return capacity_; }

 private:
  uint8_t* data_ = nullptr;
  size_t capacity_ = 0;
};

// Every field is set by whoever builds the engine (the binding: from the
// options JS passed, whose defaults live in core/config.ts); the zeros here
// are no defaults, an engine must not run on them.
struct EngineOptions {
  uint32_t threads = 0;  // transferStreamNumber: storage transfers in flight
  uint32_t meta_threads = 0;
  uint64_t max_block_bytes = 0;
  // Pinned host staging for device blocks, all workers together: one share
  // (pinned_staging_bytes / threads) a stream, each allocated once, at its
  // first use (stager_pool.h). A device block must fit in one share.
  uint64_t pinned_staging_bytes = 0;
  CudaCopy cuda_copy = CudaCopy::kBatch;
  // How long a device dump waits for the client's CUDA event before the
  // block fails (a client that recorded it and died, say).
  uint32_t cuda_event_timeout_ms = 0;
  // Host memory of the Cache stage (host_tier.h); 0: no tier.
  uint64_t host_tier_bytes = 0;
  // Write-behind (host_tier.h): a dump that has a tier buffer is answered
  // once its bytes are there; its file is written by a worker after. At most
  // `threads` workers write behind at once, so loads always find one.
  bool write_behind = false;
  IoOptions io;
};

uint64_t NowNs();

class TransferEngine {
 public:
  using TaskDone = std::function<void(std::shared_ptr<TransferTask>)>;

  explicit TransferEngine(const EngineOptions& opts);
  ~TransferEngine();  // cancels queued work, joins every thread
  TransferEngine(const TransferEngine&) = delete;
  TransferEngine& operator=(const TransferEngine&) = delete;

  const EngineOptions& options() const { return opts_; }

  // Queues every block of `task`. `done` runs on a worker thread once.
  void Submit(const std::shared_ptr<TransferTask>& task, TaskDone done);
  // Cancels `task`: queued blocks and loads not yet copied into memory end
  // as kCancelled. Returns once no block of it can write the destination
  // memory any more (true), or false if a copy still ran after timeout_ms.
  // Blocks the caller for at most the copy of one block: run it off the JS thread.
  static bool Cancel(TransferTask& task, uint32_t timeout_ms);
  // Runs `fn` on the metadata pool.
  void PostMeta(std::function<void()> fn);
  // Runs `fn` on the lookup pool: lookups stat files, which on a hung NFS
  // server never return; kept apart so commits and removals still run.
  void PostLookup(std::function<void()> fn);
  // Lookup jobs waiting for a thread (a hung filesystem makes this grow).
  uint32_t queued_lookups() const;
  // Stops accepting work: queued blocks complete as kCancelled, running ones
  // finish. Joins all threads. Idempotent.
  void Shutdown();

  uint32_t queued_blocks() const;
  uint64_t staging_bytes() const { return staging_bytes_.load(); }
  uint64_t pinned_bytes() const { return stagers_.pinned_bytes(); }
  uint64_t storage_busy_ns() const { return gate_.busy_ns(); }
  uint64_t storage_wait_ns() const { return gate_.wait_ns(); }
  HostTier& tier() { return tier_; }
  // Waits up to `timeout_ms` for every block written behind to be written;
  // returns how many are not. Blocks the caller: run it off the JS thread.
  uint64_t DrainWrites(uint32_t timeout_ms) { return tier_.WaitWritten(timeout_ms); }
  // A client's word that its blocks hold `payload` bytes: the Cache stage
  // prepares its memory for them before the first one arrives.
  bool PrepareTier(uint64_t payload) { return tier_.Prepare(FileSizeFor(payload)); }
  // Worker threads for `streams` transfer streams: one a stream, and a
  // second one a stream (see the top of this file) as long as there are CPUs
  // for them: on a host with fewer CPUs than streams, more threads preparing
  // blocks at once than CPUs only take turns. A build for an A/B measurement
  // may leave the second ones out (cmake-js ... --CDUCM_WORKERS_PER_STREAM=1):
  // each worker then prepares, moves and finishes its blocks in turn, as the
  // engine did before 2026-11-26 (bench/RESULTS.md compares the two).
  static uint32_t WorkerCount(uint32_t streams);
  uint32_t workers() const { return static_cast<uint32_t>(workers_.size()); }

 private:
  struct Item {
    std::shared_ptr<TransferTask> task;
    std::shared_ptr<TaskDone> done;
    uint32_t block;
  };
  // Whether a queued block lives in GPU memory (it moves through a pinned share).
  static bool IsDeviceBlock(const Item& item);
  // What a worker owns: its host staging (device blocks borrow pinned
  // staging from stagers_).
  struct Worker {
    AlignedBuffer staging;
    std::vector<CopyRange> copies;  // a host block's shard copies, reused
  };
  void WorkerLoop(uint32_t index);
  struct JobQueue {
    std::deque<std::function<void()>> jobs;
    std::condition_variable cv;
  };
  void MetaLoop(JobQueue& q);
  void Post(JobQueue& q, std::function<void()> fn);
  void RunBlock(const Item& item, Worker& w);
  IoResult RunDeviceBlock(const Item& item);
  // A host block's load served from the tier when it holds the block (true: finished).
  bool LoadFromTier(const Item& item);
  // Hands a block's image to the tier: under its temporary path (a dump,
  // served once committed) or its final one (a verified load).
  void KeepInTier(std::shared_ptr<TierBlock> slot, const TransferTask& task, const BlockJob& job, bool pending);
  // The same for a device block's image in pinned staging: copied into a
  // tier buffer (the share goes back to the pool), when the tier has room.
  void CopyToTier(const uint8_t* image, const TransferTask& task, const BlockJob& job, bool pending);
  void Finish(const Item& item, const IoResult& r);
  // Write-behind: `slot` (the block's image, gathered) queued for its write;
  // the dump is answered without waiting for it.
  void QueueWrite(std::shared_ptr<TierBlock> slot, const TransferTask& task, const BlockJob& job);
  // Whether a worker may take a write now. Caller holds mu_.
  bool WriteReady();
  // Writes a block behind and renames or removes its file as the tier says.
  void RunWrite(const std::shared_ptr<TierWrite>& w, const std::shared_ptr<TierBlock>& block);
  // Counts the item's block as done with the client's memory (once).
  static void Release(const Item& item);

  EngineOptions opts_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Item> loads_;  // served first: a load is on the critical path
  std::deque<Item> dumps_;
  JobQueue meta_;
  JobQueue lookups_;
  bool stopping_ = false;
  uint32_t writers_ = 0;  // workers writing behind now; guarded by mu_
  std::atomic<uint64_t> staging_bytes_{0};
  IoGate gate_;
  StagerPool stagers_;
  HostTier tier_;
  std::vector<std::thread> workers_;       // declared last: joined before the queues die
  std::vector<std::thread> meta_workers_;  // the metadata and lookup pools' threads
};

}  // namespace ucm
