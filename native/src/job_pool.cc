// See job_pool.h.
#include "job_pool.h"

#include <exception>

namespace ucm {

bool JobPool::Post(std::function<void()> fn) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return false;
    if (threads_.empty())
      for (uint32_t i = 0; i < size_; ++i) threads_.emplace_back([this] { Loop(); });
    jobs_.push_back(std::move(fn));
  }
  cv_.notify_one();
  return true;
}

void JobPool::Stop() {
  std::vector<std::thread> threads;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    jobs_.clear();
    threads.swap(threads_);
  }
  cv_.notify_all();
  for (auto& t : threads) t.join();
}

void JobPool::Loop() {
  for (;;) {
    std::function<void()> fn;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stopping_ || !jobs_.empty(); });
      if (stopping_) return;
      fn = std::move(jobs_.front());
      jobs_.pop_front();
    }
    try {
      fn();
    } catch (const std::exception&) {  // NOLINT(bugprone-empty-catch): a job reports its own failure
      // Jobs catch their own errors and settle their promise with them; one
      // that throws anyway must not take the pool's thread with it.
    }
  }
}

}  // namespace ucm
