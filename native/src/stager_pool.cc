#include "stager_pool.h"

#include <chrono>

namespace ucm {

StagerPool::StagerPool(uint32_t shares, uint64_t share_bytes, CudaCopy method)
    : shares_(shares), share_bytes_(share_bytes), method_(method) {}

std::unique_ptr<CudaStager> StagerPool::Take(int device, const std::function<bool()>& stop, std::string* error) {
  {
    std::unique_lock<std::mutex> lock(mu_);
    while (!cv_.wait_for(lock, std::chrono::milliseconds(50), [this] { return !idle_.empty() || made_ < shares_; }))
      if (stop()) return nullptr;
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
    cv_.notify_one();
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
  cv_.notify_one();
}

uint64_t StagerPool::pinned_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<uint64_t>(made_) * share_bytes_;
}

}  // namespace ucm
