#include "host_tier.h"

#include <sys/mman.h>

#include <cstdlib>
#include <utility>

#include "block_file.h"

namespace ucm {

TierBlock::~TierBlock() { std::free(data); }

namespace {

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14
#endif

// Every page of `p` made present now, so that no transfer pays for it.
void FaultIn(uint8_t* p, uint64_t n) {
  if (madvise(p, n, MADV_POPULATE_WRITE) == 0) return;
  for (uint64_t i = 0; i < n; i += 4096) p[i] = 0;  // an older kernel: one write a page
}

}  // namespace

HostTier::HostTier(uint64_t capacity_bytes, uint32_t ahead) : capacity_(capacity_bytes), ahead_(ahead) {
  counts_.capacity_bytes = capacity_bytes;
  if (enabled() && ahead_ > 0) filler_ = std::thread([this] { FillLoop(); });
}

HostTier::~HostTier() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  fill_cv_.notify_all();
  if (filler_.joinable()) filler_.join();
}

uint32_t HostTier::FreeFitting(uint64_t need) const {
  uint32_t n = 0;
  for (const auto& b : free_)
    if (b->capacity >= need && b->capacity <= 2 * need) ++n;
  return n;
}

void HostTier::FillLoop() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    // Work while the tier has room for another buffer of the size in use
    // and fewer than `ahead_` of them wait.
    fill_cv_.wait(lock, [this] {
      return stopping_ || (last_need_ != 0 && used_ + last_need_ <= capacity_ && FreeFitting(last_need_) < ahead_);
    });
    if (stopping_) return;
    const uint64_t need = last_need_;
    used_ += need;  // claimed before the allocation, which runs unlocked
    lock.unlock();
    auto b = std::make_shared<TierBlock>();
    void* p = nullptr;
    const bool made = posix_memalign(&p, kBlockAlign, need) == 0;
    if (made) {
      b->data = static_cast<uint8_t*>(p);
      b->capacity = need;
      FaultIn(b->data, need);
    }
    lock.lock();
    if (!made) {
      used_ -= need;
      return;  // no memory: the transfers allocate as they need, or go without the tier
    }
    free_.push_back(std::move(b));
  }
}

std::shared_ptr<TierBlock> HostTier::Reserve(uint64_t file_bytes) {
  if (!enabled()) return nullptr;
  const uint64_t need = AlignUp(file_bytes);
  {
    std::lock_guard<std::mutex> lock(mu_);
    last_need_ = need;
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
  return s;
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
