#include "stager_pool.h"

#include <chrono>

namespace ucm {

StagerPool::StagerPool(uint32_t shares, uint64_t share_bytes, CudaCopy method, std::function<void()> on_give)
    : shares_(shares), share_bytes_(share_bytes), method_(method), on_give_(std::move(on_give)) {}

bool StagerPool::Ready() const {
  std::lock_guard<std::mutex> lock(mu_);
  return waiting_loads_ == 0 && (!idle_.empty() || made_ < shares_);
}

std::unique_ptr<CudaStager> StagerPool::Take(int device, bool load, const std::function<bool()>& stop,
                                             std::string* error) {
  {
    std::unique_lock<std::mutex> lock(mu_);
    auto free = [this, load] { return (load || waiting_loads_ == 0) && (!idle_.empty() || made_ < shares_); };
    if (load) ++waiting_loads_;
    bool stopped = false;
    while (!cv_.wait_for(lock, std::chrono::milliseconds(50), free)) {
      if (stop()) {
        stopped = true;
        break;
      }
    }
    if (load && --waiting_loads_ == 0) cv_.notify_all();  // dumps held back for this load may go
    if (stopped) return nullptr;
    if (!idle_.empty()) {
      std::unique_ptr<CudaStager> s = std::move(idle_.back());
      idle_.pop_back();
      return s;
    }
    ++made_;  // reserved: allocate outside the lock
  }
  std::unique_ptr<CudaStager> s = CudaStager::Create(device, share_bytes_, method_, error);
  if (!s) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      --made_;
    }
    cv_.notify_all();
    if (on_give_) on_give_();
  }
  return s;
}

void StagerPool::Give(std::unique_ptr<CudaStager> s) {
  if (!s) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (s->broken()) {
      --made_;
      s.reset();  // abandons the memory (see ~CudaStager)
    } else {
      idle_.push_back(std::move(s));
    }
  }
  // Every waiter looks: a waiting load must get this share, not a dump that
  // happened to be woken first.
  cv_.notify_all();
  if (on_give_) on_give_();
}

uint64_t StagerPool::pinned_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<uint64_t>(made_) * share_bytes_;
}

}  // namespace ucm
