#include "transfer.h"

#include "background.h"
#include "client_copy.h"

#include <sched.h>
#include <sys/stat.h>
#include <unistd.h>
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace ucm {

bool TransferEngine::Cancel(TransferTask& task, uint32_t timeout_ms) {
  task.cancelled.store(true);
  const uint64_t deadline = NowNs() + static_cast<uint64_t>(timeout_ms) * 1000000ull;
  while (task.copying.load() != 0) {
    if (NowNs() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
  return true;
}

uint64_t NowNs() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

AlignedBuffer::~AlignedBuffer() { std::free(data_); }

bool AlignedBuffer::Reserve(size_t size) {
  if (size <= capacity_) return true;
  void* p = nullptr;
  if (posix_memalign(&p, kBlockAlign, AlignUp(size)) != 0) return false;
  std::free(data_);
  data_ = static_cast<uint8_t*>(p);
  capacity_ = AlignUp(size);
  return true;
}

TransferEngine::TransferEngine(const EngineOptions& opts)
    : opts_(opts),
      gate_(opts.threads),
      stagers_(opts.threads, AlignUp(std::max<uint64_t>(opts.pinned_staging_bytes / opts.threads, kBlockAlign)),
               opts.cuda_copy,
               [this] {
                 // A device dump left queued for want of a share may go now.
                 std::lock_guard<std::mutex> lock(mu_);
                 cv_.notify_all();
               }),
      tier_(opts.host_tier_bytes) {
  const uint32_t n = WorkerCount(opts_.threads);
  workers_.reserve(n);
  for (uint32_t i = 0; i < n; ++i) workers_.emplace_back([this, i] { WorkerLoop(i); });
  for (uint32_t i = 0; i < opts_.meta_threads; ++i) meta_workers_.emplace_back([this] { MetaLoop(meta_); });
  for (uint32_t i = 0; i < opts_.meta_threads; ++i) meta_workers_.emplace_back([this] { MetaLoop(lookups_); });
}

TransferEngine::~TransferEngine() { Shutdown(); }

uint32_t TransferEngine::WorkerCount(uint32_t streams) {
#if defined(UCM_WORKERS_PER_STREAM) && UCM_WORKERS_PER_STREAM == 1
  return streams;
#else
  cpu_set_t set;
  CPU_ZERO(&set);
  uint32_t cpus = sched_getaffinity(0, sizeof set, &set) == 0 ? static_cast<uint32_t>(CPU_COUNT(&set))
                                                              : std::thread::hardware_concurrency();
  return streams + std::min(streams, std::max(cpus, 1u));
#endif
}

void TransferEngine::Shutdown() {
  std::deque<Item> cancelled;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return;
    stopping_ = true;
    for (auto& it : loads_) cancelled.push_back(std::move(it));
    for (auto& it : dumps_) cancelled.push_back(std::move(it));
    loads_.clear();
    dumps_.clear();
  }
  cv_.notify_all();
  meta_.cv.notify_all();
  lookups_.cv.notify_all();
  for (auto& it : cancelled) Finish(it, IoResult{BlockStatus::kCancelled, ECANCELED, "shutdown"});
  for (auto& t : workers_) t.join();
  for (auto& t : meta_workers_) t.join();
}

void TransferEngine::Submit(const std::shared_ptr<TransferTask>& task, TaskDone done) {
  auto shared_done = std::make_shared<TaskDone>(std::move(done));
  const uint32_t n = static_cast<uint32_t>(task->blocks.size());
  task->results.assign(n, IoResult{});
  task->released_block.assign(n, 0);
  task->released.store(0);
  task->remaining.store(n == 0 ? 1 : n);
  task->submit_ns = NowNs();
  if (n == 0) {
    task->finish_ns = task->submit_ns;
    (*shared_done)(task);
    return;
  }
  bool rejected = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) {
      rejected = true;
    } else {
      auto& q = task->op == Op::kLoad ? loads_ : dumps_;
      for (uint32_t b = 0; b < n; ++b) q.push_back(Item{task, shared_done, b});
    }
  }
  if (rejected) {
    for (uint32_t b = 0; b < n; ++b)
      Finish(Item{task, shared_done, b}, IoResult{BlockStatus::kCancelled, ECANCELED, "shutdown"});
    return;
  }
  if (n == 1)
    cv_.notify_one();
  else
    cv_.notify_all();
}

void TransferEngine::PostMeta(std::function<void()> fn) { Post(meta_, std::move(fn)); }

void TransferEngine::PostLookup(std::function<void()> fn) { Post(lookups_, std::move(fn)); }

uint32_t TransferEngine::queued_lookups() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<uint32_t>(lookups_.jobs.size());
}

void TransferEngine::Post(JobQueue& q, std::function<void()> fn) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!stopping_) {
      q.jobs.push_back(std::move(fn));
      q.cv.notify_one();
      return;
    }
  }
  fn();  // after shutdown: run inline so the caller's promise still settles
}

uint32_t TransferEngine::queued_blocks() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<uint32_t>(loads_.size() + dumps_.size());
}

bool TransferEngine::IsDeviceBlock(const Item& item) {
  const TransferTask& task = *item.task;
  return task.shards[task.blocks[item.block].shard_begin].region->medium() == Medium::kCuda;
}

void TransferEngine::WorkerLoop(uint32_t index) {
  MarkBulkThread();
  // The first `threads` workers are the streams' own: with writes behind
  // waiting, they take those before dumps, so the directory is written while
  // a burst of dumps is still being copied into the tier by the others.
  const bool stream_worker = index < opts_.threads;
  Worker w;  // this worker's only staging buffers, reused for every block
  for (;;) {
    Item item;
    {
      std::unique_lock<std::mutex> lock(mu_);
      // Loads first. A dump of GPU blocks is picked only when a pinned share
      // is free for it: waiting in StagerPool::Take it would hold a worker
      // that a load arriving meanwhile needs (stager_pool.h).
      auto dump_ready = [this] { return !dumps_.empty() && (!IsDeviceBlock(dumps_.front()) || stagers_.Ready()); };
      cv_.wait(lock, [&] { return stopping_ || !loads_.empty() || dump_ready() || WriteReady(); });
      if (stopping_ && loads_.empty() && dumps_.empty()) break;
      if (loads_.empty() && (!dump_ready() || (stream_worker && WriteReady()))) {
        // Nothing else waits: a block written behind (after a stop, none is
        // taken any more; what is left stays unwritten).
        if (stopping_) continue;
        std::shared_ptr<TierBlock> block;
        std::shared_ptr<TierWrite> write = tier_.TakeWrite(&block);
        if (!write) continue;
        ++writers_;
        lock.unlock();
        RunWrite(write, block);
        block.reset();
        lock.lock();
        --writers_;
        continue;
      }
      auto& q = !loads_.empty() ? loads_ : dumps_;
      item = std::move(q.front());
      q.pop_front();
    }
    // An allocation failing here (a huge task under memory pressure) fails
    // this block, never the process.
    try {
      RunBlock(item, w);
    } catch (const std::exception& e) {
      IoResult r{BlockStatus::kIoError, ENOMEM, "engine"};
      r.detail = e.what();
      Finish(item, r);
    }
  }
  staging_bytes_.fetch_sub(w.staging.capacity());
}

bool TransferEngine::WriteReady() { return opts_.write_behind && writers_ < opts_.threads && tier_.HasWrite(); }

void TransferEngine::QueueWrite(std::shared_ptr<TierBlock> slot, const TransferTask& task, const BlockJob& job) {
  slot->payload_bytes = job.bytes;
  slot->layout_digest = task.layout_digest;
  slot->shard_count = job.shard_end - job.shard_begin;
  tier_.AddUnwritten(job.path, std::move(slot));
  // Taken and dropped so that a worker deciding to sleep has done so before
  // the notice (it checked for writes under mu_).
  {
    std::lock_guard<std::mutex> lock(mu_);
  }
  cv_.notify_one();
}

void TransferEngine::RunWrite(const std::shared_ptr<TierWrite>& w, const std::shared_ptr<TierBlock>& block) {
  IoResult r = WriteBlockFile(w->temp, block->data, block->payload_bytes, block->layout_digest, block->shard_count,
                              opts_.io, &gate_);
  switch (tier_.WriteDone(w, r.status == BlockStatus::kOk)) {
    case AfterWrite::kRename:
      if (CommitFile(opts_.io.roots, w->temp, w->final) != 0) {
        tier_.RenameFailed();
        RemoveFile(opts_.io.roots, w->temp);
      }
      break;
    case AfterWrite::kRemove:
      RemoveFile(opts_.io.roots, w->temp);
      break;
    case AfterWrite::kKeep:
      break;
  }
}

void TransferEngine::MetaLoop(JobQueue& q) {
  for (;;) {
    std::function<void()> fn;
    {
      std::unique_lock<std::mutex> lock(mu_);
      q.cv.wait(lock, [this, &q] { return stopping_ || !q.jobs.empty(); });
      if (q.jobs.empty()) break;  // stopping and drained
      fn = std::move(q.jobs.front());
      q.jobs.pop_front();
    }
    try {
      fn();
    } catch (const std::exception&) {  // NOLINT(bugprone-empty-catch): see below
      // Metadata jobs write into memory allocated before they were posted and
      // are not expected to throw; if one ever does, the thread lives on.
    }
  }
}

void TransferEngine::RunBlock(const Item& item, Worker& w) {
  TransferTask& task = *item.task;
  const BlockJob& job = task.blocks[item.block];
  if (task.cancelled.load()) {
    Finish(item, IoResult{BlockStatus::kCancelled, ECANCELED, "cancelled"});
    return;
  }
  if (task.deadline_ns != 0 && NowNs() >= task.deadline_ns) {
    Finish(item, IoResult{BlockStatus::kCancelled, ETIMEDOUT, "past the client's deadline"});
    return;
  }
  if (task.op == Op::kDump && task.max_queue_ns > 0 && NowNs() - task.submit_ns > task.max_queue_ns) {
    Finish(item, IoResult{BlockStatus::kDropped, 0, "queued too long"});
    return;
  }
  // A block lives in one kind of memory: all host, or all on one GPU.
  const Region& first = *task.shards[job.shard_begin].region;
  for (uint32_t s = job.shard_begin + 1; s < job.shard_end; ++s) {
    const Region& r = *task.shards[s].region;
    if (r.medium() != first.medium() || r.device() != first.device()) {
      Finish(item,
             IoResult{BlockStatus::kIoError, EINVAL, "a block's shards must be all host memory or all on one GPU"});
      return;
    }
  }
  if (first.medium() == Medium::kCuda) {
    Finish(item, RunDeviceBlock(item));
    return;
  }
  if (task.op == Op::kLoad && LoadFromTier(item)) return;
  const size_t need = FileSizeFor(job.bytes);
  const uint32_t shard_count = job.shard_end - job.shard_begin;
  // The block's file image: in a tier buffer when the tier has room (the
  // block then stays there without another copy), else in this worker's staging.
  std::shared_ptr<TierBlock> slot = tier_.Reserve(need);
  uint8_t* image = nullptr;
  if (slot) {
    image = slot->data;
  } else {
    AlignedBuffer& staging = w.staging;
    const size_t before = staging.capacity();
    if (!staging.Reserve(need)) {
      Finish(item, IoResult{BlockStatus::kIoError, ENOMEM, "staging allocation"});
      return;
    }
    staging_bytes_.fetch_add(staging.capacity() - before);
    image = staging.data();
  }
  uint8_t* payload = image + kHeaderSize;

  // The block's shards, as copies between the client's memory and staging.
  std::vector<CopyRange>& copies = w.copies;
  copies.clear();
  uint64_t pos = 0;
  for (uint32_t s = job.shard_begin; s < job.shard_end; ++s) {
    const Shard& sh = task.shards[s];
    uint8_t* client = sh.region->host_base() + sh.offset;
    copies.push_back(task.op == Op::kDump ? CopyRange{payload + pos, client, sh.length}
                                          : CopyRange{client, payload + pos, sh.length});
    pos += sh.length;
  }

  IoResult r;
  if (task.op == Op::kDump) {
    {
      CopyGuard guard(task);
      if (!guard.Stopped(&r)) r = CopyChunked(guard, copies);
      if (r.status != BlockStatus::kOk) {
        tier_.Return(std::move(slot));
        Finish(item, r);
        return;
      }
    }
    Release(item);  // in staging now: the client's memory is not read again
    if (slot && opts_.write_behind) {
      QueueWrite(std::move(slot), task, job);
      Finish(item, IoResult{});
      return;
    }
    r = WriteBlockFile(job.path, image, job.bytes, task.layout_digest, shard_count, opts_.io, &gate_);
    // Written under its temporary name: served from the tier once committed;
    // a failed write gives the buffer back.
    if (slot && r.status == BlockStatus::kOk)
      KeepInTier(std::move(slot), task, job, /*pending=*/true);
    else
      tier_.Return(std::move(slot));
  } else {
    r = ReadBlockFile(job.path, image, job.bytes, task.layout_digest, shard_count, opts_.io, &gate_);
    if (r.status == BlockStatus::kOk) {
      // Verified: the tier may serve it. This worker's reference keeps the
      // buffer from being reused by an eviction while it is copied below.
      if (slot) KeepInTier(slot, task, job, /*pending=*/false);
      // Only verified bytes ever reach the destination memory.
      CopyGuard guard(task);
      if (!guard.Stopped(&r)) r = CopyChunked(guard, copies);
    } else {
      tier_.Return(std::move(slot));  // a block that did not verify stays out
    }
  }
  Finish(item, r);
}

bool TransferEngine::LoadFromTier(const Item& item) {
  TransferTask& task = *item.task;
  const BlockJob& job = task.blocks[item.block];
  std::shared_ptr<const TierBlock> hit =
      tier_.Find(job.path, job.bytes, task.layout_digest, job.shard_end - job.shard_begin);
  if (!hit) return false;
  std::vector<CopyRange> copies;
  copies.reserve(job.shard_end - job.shard_begin);
  uint64_t pos = kHeaderSize;
  for (uint32_t s = job.shard_begin; s < job.shard_end; ++s) {
    const Shard& sh = task.shards[s];
    copies.push_back(CopyRange{sh.region->host_base() + sh.offset, hit->data + pos, sh.length});
    pos += sh.length;
  }
  IoResult r;
  CopyGuard guard(task);
  if (!guard.Stopped(&r)) r = CopyChunked(guard, copies);
  Finish(item, r);
  return true;
}

void TransferEngine::CopyToTier(const uint8_t* image, const TransferTask& task, const BlockJob& job, bool pending) {
  std::shared_ptr<TierBlock> slot = tier_.Reserve(FileSizeFor(job.bytes));
  if (!slot) return;
  std::memcpy(slot->data + kHeaderSize, image + kHeaderSize, job.bytes);
  KeepInTier(std::move(slot), task, job, pending);
}

void TransferEngine::KeepInTier(std::shared_ptr<TierBlock> slot, const TransferTask& task, const BlockJob& job,
                                bool pending) {
  slot->payload_bytes = job.bytes;
  slot->layout_digest = task.layout_digest;
  slot->shard_count = job.shard_end - job.shard_begin;
  if (pending)
    tier_.AddPending(job.path, std::move(slot));
  else
    tier_.Insert(job.path, std::move(slot));
}

// Device blocks: gather from GPU memory into pinned staging and write; or
// read and verify in pinned staging and scatter to the GPU. Bytes reach the
// KV cache only after the file verified, as on the host path.
IoResult TransferEngine::RunDeviceBlock(const Item& item) {
  TransferTask& task = *item.task;
  const BlockJob& job = task.blocks[item.block];
  const int device = task.shards[job.shard_begin].region->device();
  std::string error;
  auto fail = [&](int err, const char* what) {
    IoResult r{BlockStatus::kIoError, err, what};
    r.detail = error;
    return r;
  };
  if (FileSizeFor(job.bytes) > stagers_.share_bytes()) {
    error = "block of " + std::to_string(job.bytes) +
            " bytes does not fit the pinned staging of one transfer stream (" + std::to_string(stagers_.share_bytes()) +
            " bytes = pinnedStagingBytes / transferStreamNumber)";
    return fail(EFBIG, "pinned staging");
  }
  std::vector<DeviceCopy> copies;
  copies.reserve(job.shard_end - job.shard_begin);
  uint64_t pos = kHeaderSize;
  for (uint32_t s = job.shard_begin; s < job.shard_end; ++s) {
    const Shard& sh = task.shards[s];
    copies.push_back(DeviceCopy{sh.region->device_base() + sh.offset, pos, sh.length});
    pos += sh.length;
  }
  const uint32_t shard_count = job.shard_end - job.shard_begin;
  // A cancel or the client's deadline ends either wait below (nothing has
  // been read or written yet); CopyGuard says which of the two it was.
  auto stop = [&task] { return task.cancelled.load() || (task.deadline_ns != 0 && NowNs() >= task.deadline_ns); };
  auto stopped = [&task] {
    CopyGuard guard(task);
    IoResult why{BlockStatus::kCancelled, ECANCELED, "cancelled"};
    guard.Stopped(&why);
    return why;
  };
  // A dump waits for the forward pass that wrote its blocks before it takes
  // pinned staging, so blocks waiting on a slow step hold no share that a
  // load could use.
  if (task.op == Op::kDump && task.wait_event) {
    if (!AwaitCudaEvent(*task.wait_event, opts_.cuda_event_timeout_ms, stop, &error)) {
      if (error.empty()) return stopped();
      return fail(ETIMEDOUT, "waiting for the client's CUDA event");
    }
  }
  // A share for this block, given back on every way out; one whose copy
  // never finished is dropped there and allocated afresh next time.
  struct Lease {
    StagerPool& pool;
    std::unique_ptr<CudaStager> s;
    ~Lease() { pool.Give(std::move(s)); }
  } lease{stagers_, stagers_.Take(device, task.op == Op::kLoad, stop, &error)};
  if (!lease.s) return error.empty() ? stopped() : fail(ENODEV, "pinned staging");
  CudaStager& stager = *lease.s;
  IoResult why;
  // Cache stage buffers, page-locked at their first GPU use (HostTier::Pin),
  // take the place of the staging share: a block moves between the GPU and
  // the tier in one DMA, without a copy through staging. The share's stream
  // and event still run the copy. A buffer that cannot be locked goes the
  // staging way.
  auto span = [](const TierBlock& b) { return HostSpan{b.data, b.capacity}; };
  if (task.op == Op::kDump) {
    // With write-behind the block is answered from the tier: gathered there directly when it has room.
    std::shared_ptr<TierBlock> slot = opts_.write_behind ? tier_.Reserve(FileSizeFor(job.bytes)) : nullptr;
    const bool direct = slot && tier_.Pin(*slot);
    {
      CopyGuard guard(task);
      if (guard.Stopped(&why)) {
        tier_.Return(std::move(slot));
        return why;
      }
      if (!stager.Gather(device, copies, opts_.cuda_event_timeout_ms, &error, direct ? span(*slot) : HostSpan{})) {
        // A copy that did not finish may still land in the buffer: never reused.
        if (direct && stager.broken())
          tier_.Abandon("", std::move(slot));
        else
          tier_.Return(std::move(slot));
        return fail(EIO, "gather");
      }
      // Gathered after the deadline: maybe bytes the client wrote since.
      why = guard.Ended();
      if (why.status != BlockStatus::kOk) {
        tier_.Return(std::move(slot));
        return why;
      }
    }
    Release(item);  // in host memory now: the GPU memory is not read again
    if (slot) {
      // In a tier buffer (the share goes back at once); the file comes later.
      if (!direct) std::memcpy(slot->data + kHeaderSize, stager.data() + kHeaderSize, job.bytes);
      QueueWrite(std::move(slot), task, job);
      return IoResult{};
    }
    IoResult w = WriteBlockFile(job.path, stager.data(), job.bytes, task.layout_digest, shard_count, opts_.io, &gate_);
    if (w.status == BlockStatus::kOk) CopyToTier(stager.data(), task, job, /*pending=*/true);
    return w;
  }
  // From the tier when it holds the block (no read, no checksum pass: it
  // verified when it entered), else from the file; the scatter reads the
  // tier buffer itself when it is page-locked, else the pinned share.
  IoResult r;
  std::shared_ptr<const TierBlock> from;  // the tier buffer the scatter reads, if any
  if (std::shared_ptr<const TierBlock> hit = tier_.Find(job.path, job.bytes, task.layout_digest, shard_count)) {
    if (tier_.Pin(*hit))
      from = std::move(hit);
    else
      std::memcpy(stager.data() + kHeaderSize, hit->data + kHeaderSize, job.bytes);
  } else if (std::shared_ptr<TierBlock> slot = tier_.Reserve(FileSizeFor(job.bytes)); slot && tier_.Pin(*slot)) {
    // Read into a tier buffer, verified there, and kept (this reference
    // holds it while the scatter reads it, evicted or not).
    r = ReadBlockFile(job.path, slot->data, job.bytes, task.layout_digest, shard_count, opts_.io, &gate_);
    if (r.status != BlockStatus::kOk) {
      tier_.Return(std::move(slot));
      return r;
    }
    KeepInTier(slot, task, job, /*pending=*/false);
    from = std::move(slot);
  } else {
    tier_.Return(std::move(slot));
    r = ReadBlockFile(job.path, stager.data(), job.bytes, task.layout_digest, shard_count, opts_.io, &gate_);
    if (r.status != BlockStatus::kOk) return r;
    CopyToTier(stager.data(), task, job, /*pending=*/false);
  }
  // A load's bytes land only after the work the client queued on its stream
  // before the load (vLLM zeroing new blocks, a step still reading them) has
  // run: that work could otherwise overwrite the loaded KV after the scatter.
  if (task.wait_event && !AwaitCudaEvent(*task.wait_event, opts_.cuda_event_timeout_ms, stop, &error)) {
    if (error.empty()) return stopped();
    return fail(ETIMEDOUT, "waiting for the client's CUDA event");
  }
  CopyGuard guard(task);
  if (guard.Stopped(&why)) return why;
  if (!stager.Scatter(device, copies, opts_.cuda_event_timeout_ms, &error, from ? span(*from) : HostSpan{})) {
    // A copy that did not finish may still read the buffer: it must never hold another block.
    if (from && stager.broken()) tier_.Abandon(job.path, std::move(from));
    return fail(EIO, "scatter");
  }
  return guard.Ended();
}

void TransferEngine::Release(const Item& item) {
  TransferTask& task = *item.task;
  if (task.released_block[item.block] != 0) return;
  task.released_block[item.block] = 1;
  task.released.fetch_add(1, std::memory_order_release);
}

void TransferEngine::Finish(const Item& item, const IoResult& r) {
  Release(item);
  TransferTask& task = *item.task;
  task.results[item.block] = r;
  if (r.status == BlockStatus::kOk) task.bytes_ok.fetch_add(task.blocks[item.block].bytes);
  if (task.remaining.fetch_sub(1) == 1) {
    task.finish_ns = NowNs();
    (*item.done)(item.task);
  }
}

}  // namespace ucm
