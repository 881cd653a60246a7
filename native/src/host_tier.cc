#include "host_tier.h"

#include <sys/mman.h>

#include <algorithm>
#include <fstream>
#include <string>

#include <chrono>
#include <cstdlib>
#include <utility>

#include "background.h"
#include "block_file.h"
#include "cuda_backend.h"

namespace ucm {

TierBlock::~TierBlock() {
  if (pinned) UnpinHostMemory(data);
  std::free(data);
}

namespace {

uint64_t SteadyNs() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

// Every page of `p` made present now, so that no transfer pays for it.
void FaultIn(uint8_t* p, uint64_t n) {
  if (PopulateWrite(p, n)) return;
  for (uint64_t i = 0; i < n; i += 4096) p[i] = 0;  // an older kernel: one write a page
}

// Whether `bytes` more can be taken and the host still have an eighth of its
// memory (at least 1 GiB) available. Unknown (no /proc/meminfo): yes.
bool HostHasRoomFor(uint64_t bytes) {
  std::ifstream in("/proc/meminfo");
  uint64_t total_kb = 0, available_kb = 0;
  std::string key;
  uint64_t value = 0;
  std::string unit;
  while (in >> key >> value >> unit) {
    if (key == "MemTotal:") total_kb = value;
    if (key == "MemAvailable:") available_kb = value;
  }
  if (total_kb == 0 || available_kb == 0) return true;
  const uint64_t floor = std::max<uint64_t>(total_kb * 1024 / 8, 1ull << 30);
  return available_kb * 1024 >= floor + bytes;
}

}  // namespace

HostTier::HostTier(uint64_t capacity_bytes) : capacity_(capacity_bytes) {
  counts_.capacity_bytes = capacity_bytes;
  if (enabled()) filler_ = std::thread([this] { FillLoop(); });
}

HostTier::~HostTier() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  fill_cv_.notify_all();
  filled_cv_.notify_all();
  if (filler_.joinable()) filler_.join();
}

void HostTier::FillLoop() {
  MarkBulkThread();
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    // Work while the tier has room for another buffer of the size in use.
    fill_cv_.wait(
        lock, [this] { return stopping_ || (!fill_paused_ && last_need_ != 0 && used_ + last_need_ <= capacity_); });
    if (stopping_) return;
    const uint64_t need = last_need_;
    used_ += need;  // claimed before the allocation, which runs unlocked
    filling_ = need;
    lock.unlock();
    if (!HostHasRoomFor(need)) {
      lock.lock();
      used_ -= need;
      filling_ = 0;
      filled_cv_.notify_all();
      fill_paused_ = true;  // the transfers make buffers as they need; the next Reserve looks again
      continue;
    }
    auto b = std::make_shared<TierBlock>();
    void* p = nullptr;
    const bool made = posix_memalign(&p, kBlockAlign, need) == 0;
    if (made) {
      b->data = static_cast<uint8_t*>(p);
      b->capacity = need;
      FaultIn(b->data, need);
    }
    lock.lock();
    filling_ = 0;
    filled_cv_.notify_all();
    if (!made) {
      used_ -= need;
      return;  // no memory: the transfers allocate as they need, or go without the tier
    }
    free_.push_back(std::move(b));
  }
}

bool HostTier::Prepare(uint64_t file_bytes) {
  if (!enabled() || file_bytes == 0) return false;
  std::lock_guard<std::mutex> lock(mu_);
  if (last_need_ != 0) return false;
  last_need_ = AlignUp(file_bytes);
  fill_cv_.notify_one();
  return true;
}

std::shared_ptr<TierBlock> HostTier::Reserve(uint64_t file_bytes) {
  if (!enabled()) return nullptr;
  const uint64_t need = AlignUp(file_bytes);
  {
    std::unique_lock<std::mutex> lock(mu_);
    last_need_ = need;
    fill_paused_ = false;
    fill_cv_.notify_one();  // one buffer fewer ahead (or a new size): the filling thread makes another
    for (;;) {
      // A kept buffer of about this size: blocks of one model all have one.
      for (size_t i = 0; i < free_.size(); ++i) {
        if (free_[i]->capacity >= need && free_[i]->capacity <= 2 * need) {
          std::shared_ptr<TierBlock> b = std::move(free_[i]);
          free_[i] = std::move(free_.back());
          free_.pop_back();
          return b;
        }
      }
      if (used_ + need <= capacity_) break;
      if (!free_.empty()) {
        // Kept buffers of another size make way first.
        used_ -= free_.back()->capacity;
        free_.pop_back();
      } else if (!lru_.empty()) {
        Drop(committed_.find(lru_.back()));
        ++counts_.evicted;
      } else if (filling_ != 0 && !stopping_) {
        // The room is the buffer the filling thread is making: it is one
        // allocation and fault-in away (milliseconds), so wait for it rather
        // than send this block around the tier.
        filled_cv_.wait(lock);
      } else {
        ++counts_.refused;  // everything held is pending or lent
        return nullptr;
      }
    }
    used_ += need;  // claimed before the allocation, which runs unlocked
  }
  auto b = std::make_shared<TierBlock>();
  void* p = nullptr;
  if (posix_memalign(&p, kBlockAlign, need) != 0) {
    std::lock_guard<std::mutex> lock(mu_);
    used_ -= need;
    ++counts_.refused;
    return nullptr;
  }
  b->data = static_cast<uint8_t*>(p);
  b->capacity = need;
  return b;
}

void HostTier::Return(std::shared_ptr<TierBlock> b) {
  if (!b) return;
  std::lock_guard<std::mutex> lock(mu_);
  Recycle(std::move(b));
}

std::shared_ptr<const TierBlock> HostTier::Find(const std::string& path, uint64_t payload_bytes, uint64_t layout_digest,
                                                uint32_t shard_count) {
  if (!enabled()) return nullptr;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = committed_.find(path);
  if (it == committed_.end()) {
    ++counts_.misses;
    return nullptr;
  }
  const TierBlock& b = *it->second.block;
  // Another request's view of the block (a mismatch): the file's reader says so.
  if (b.payload_bytes != payload_bytes || b.layout_digest != layout_digest || b.shard_count != shard_count) {
    ++counts_.misses;
    return nullptr;
  }
  lru_.splice(lru_.begin(), lru_, it->second.lru);
  ++counts_.hits;
  counts_.hit_bytes += payload_bytes;
  return it->second.block;
}

bool HostTier::Contains(const std::string& path) {
  if (!enabled()) return false;
  std::lock_guard<std::mutex> lock(mu_);
  return committed_.count(path) != 0;
}

bool HostTier::Pin(const TierBlock& b) {
  bool fresh = false;
  std::call_once(b.pin_once, [&] {
    std::string error;  // said once as a CUDA notice (PinHostMemory)
    b.pinned = PinHostMemory(b.data, b.capacity, &error);
    fresh = b.pinned;
  });
  if (fresh) {
    std::lock_guard<std::mutex> lock(mu_);
    ++counts_.pinned;
    counts_.pinned_bytes += b.capacity;
  }
  return b.pinned;
}

void HostTier::Abandon(const std::string& path, std::shared_ptr<const TierBlock> b) {
  if (!b) return;
  std::lock_guard<std::mutex> lock(mu_);
  ++counts_.abandoned;
  if (path.empty()) {
    used_ -= std::min(used_, b->capacity);  // reserved: counted until now
  } else {
    // Still held there: dropped (Recycle takes it off the count, as `b`
    // holds it too). Evicted already: it went off the count then.
    auto it = committed_.find(path);
    if (it != committed_.end() && it->second.block.get() == b.get()) Drop(it);
  }
  abandoned_.push_back(std::move(b));
}

void HostTier::Insert(const std::string& path, std::shared_ptr<TierBlock> b) {
  std::lock_guard<std::mutex> lock(mu_);
  Put(path, std::move(b));
}

void HostTier::AddPending(const std::string& temp, std::shared_ptr<TierBlock> b) {
  std::lock_guard<std::mutex> lock(mu_);
  auto [it, added] = pending_.try_emplace(temp, b);
  if (!added) {
    Recycle(std::move(it->second));
    it->second = std::move(b);
  }
}

void HostTier::Commit(const std::string& temp, const std::string& final) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = pending_.find(temp);
  if (it == pending_.end()) return;
  std::shared_ptr<TierBlock> b = std::move(it->second);
  pending_.erase(it);
  Put(final, std::move(b));
}

void HostTier::Forget(const std::string& path) {
  std::lock_guard<std::mutex> lock(mu_);
  // Its write first, so that the entry's removal below does not count it as shed.
  std::shared_ptr<TierWrite> w;
  auto u = unwritten_.find(path);
  if (u != unwritten_.end()) {
    w = u->second;
  } else {
    auto f = unwritten_final_.find(path);
    if (f != unwritten_final_.end()) w = f->second;
  }
  if (w) {
    if (w->writing)
      w->discarded = true;  // the worker removes the file once written
    else
      Unqueue(w, false);
  }
  auto p = pending_.find(path);
  if (p != pending_.end()) {
    Recycle(std::move(p->second));
    pending_.erase(p);
  }
  auto c = committed_.find(path);
  if (c != committed_.end()) Drop(c);
}

TierStats HostTier::stats() {
  std::lock_guard<std::mutex> lock(mu_);
  TierStats s = counts_;
  s.used_bytes = used_;
  s.blocks = committed_.size();
  s.pending = pending_.size();
  s.unwritten = unwritten_.size();
  s.unwritten_bytes = unwritten_bytes_;
  while (!writes_.empty() && writes_.front()->dropped) writes_.pop_front();
  if (!writes_.empty()) s.lag_ms = (SteadyNs() - writes_.front()->queued_ns) / 1000000;
  return s;
}

// ---- write-behind ----

void HostTier::AddUnwritten(const std::string& temp, std::shared_ptr<TierBlock> b) {
  auto w = std::make_shared<TierWrite>();
  w->temp = temp;
  w->block = b;
  w->queued_ns = SteadyNs();
  std::lock_guard<std::mutex> lock(mu_);
  auto [it, added] = pending_.try_emplace(temp, b);
  if (!added) {  // a temporary name is never dumped twice; kept whole if it were
    Recycle(std::move(it->second));
    it->second = b;
  }
  auto old = unwritten_.find(temp);
  if (old != unwritten_.end()) Unqueue(old->second, false);
  b->unwritten = w.get();
  unwritten_bytes_ += b->payload_bytes;
  unwritten_.emplace(temp, w);
  writes_.push_back(std::move(w));
}

bool HostTier::CommitUnwritten(const std::string& temp, const std::string& final) {
  std::lock_guard<std::mutex> lock(mu_);
  auto u = unwritten_.find(temp);
  if (u == unwritten_.end() || u->second->discarded) return false;
  std::shared_ptr<TierWrite> w = u->second;
  w->final = final;
  unwritten_final_[final] = w;
  auto p = pending_.find(temp);
  if (p != pending_.end()) {
    std::shared_ptr<TierBlock> b = std::move(p->second);
    pending_.erase(p);
    Put(final, std::move(b));
  }
  return true;
}

bool HostTier::HasWrite() {
  std::lock_guard<std::mutex> lock(mu_);
  while (!writes_.empty() && writes_.front()->dropped) writes_.pop_front();
  return !writes_.empty();
}

std::shared_ptr<TierWrite> HostTier::TakeWrite(std::shared_ptr<TierBlock>* block) {
  std::lock_guard<std::mutex> lock(mu_);
  while (!writes_.empty()) {
    std::shared_ptr<TierWrite> w = std::move(writes_.front());
    writes_.pop_front();
    if (w->dropped) continue;
    w->writing = true;
    *block = w->block;
    return w;
  }
  return nullptr;
}

AfterWrite HostTier::WriteDone(const std::shared_ptr<TierWrite>& w, bool ok) {
  std::lock_guard<std::mutex> lock(mu_);
  w->writing = false;
  AfterWrite next = AfterWrite::kKeep;
  if (w->discarded)
    next = AfterWrite::kRemove;
  else if (!ok)
    ++counts_.write_failed;  // the block stays in memory only (if committed), its file never comes
  else if (!w->final.empty())
    next = AfterWrite::kRename;
  if (ok) ++counts_.written;
  Unqueue(w, false);
  return next;
}

void HostTier::RenameFailed() {
  std::lock_guard<std::mutex> lock(mu_);
  ++counts_.write_failed;
}

uint64_t HostTier::WaitWritten(uint32_t timeout_ms) {
  std::unique_lock<std::mutex> lock(mu_);
  written_cv_.wait_for(lock, std::chrono::milliseconds(timeout_ms), [this] { return unwritten_.empty(); });
  return unwritten_.size();
}

void HostTier::Unqueue(const std::shared_ptr<TierWrite>& w, bool shed) {
  if (!w->writing) w->dropped = true;  // skipped if still in writes_
  auto u = unwritten_.find(w->temp);
  if (u != unwritten_.end() && u->second == w) unwritten_.erase(u);
  if (!w->final.empty()) {
    auto f = unwritten_final_.find(w->final);
    if (f != unwritten_final_.end() && f->second == w) unwritten_final_.erase(f);
  }
  if (w->block) {
    unwritten_bytes_ -= w->block->payload_bytes;
    w->block->unwritten = nullptr;
    w->block.reset();
  }
  if (shed) ++counts_.shed;
  written_cv_.notify_all();
}

void HostTier::Put(const std::string& path, std::shared_ptr<TierBlock> b) {
  auto it = committed_.find(path);
  if (it != committed_.end()) Drop(it);  // the newer image of the block replaces the older
  lru_.push_front(path);
  counts_.block_bytes += b->payload_bytes;
  committed_.emplace(path, Entry{std::move(b), lru_.begin()});
  ++counts_.inserted;
}

void HostTier::Drop(std::unordered_map<std::string, Entry>::iterator it) {
  lru_.erase(it->second.lru);
  std::shared_ptr<TierBlock> b = std::move(it->second.block);
  // Evicted before a worker took its write: shed (a write under way goes on).
  if (b->unwritten != nullptr && !b->unwritten->writing) {
    auto u = unwritten_.find(b->unwritten->temp);
    if (u != unwritten_.end()) Unqueue(std::shared_ptr<TierWrite>(u->second), true);
  }
  counts_.block_bytes -= b->payload_bytes;
  committed_.erase(it);
  Recycle(std::move(b));
}

void HostTier::Recycle(std::shared_ptr<TierBlock> b) {
  if (!b) return;
  if (b.use_count() == 1) {
    free_.push_back(std::move(b));  // still counted: kept for the next block
  } else {
    // A load still copies from it: it is freed when that load lets go, and
    // no longer counts here.
    used_ -= b->capacity;
  }
}

}  // namespace ucm
