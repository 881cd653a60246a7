// A few plain threads for blocking jobs that belong to no engine (capacity
// ledger updates and eviction passes). Started at the first job, so loading
// the addon costs no threads. Jobs must not throw; one that does is dropped
// and its thread lives on.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace ucm {

class JobPool {
 public:
  explicit JobPool(uint32_t threads) : size_(threads) {}
  ~JobPool() { Stop(); }
  JobPool(const JobPool&) = delete;
  JobPool& operator=(const JobPool&) = delete;

  // Queues `fn`; false after Stop() (nothing queued).
  bool Post(std::function<void()> fn);
  // Drops queued jobs, waits for running ones, joins the threads. Idempotent.
  void Stop();

 private:
  void Loop();

  const uint32_t size_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> jobs_;
  bool stopping_ = false;
  std::vector<std::thread> threads_;  // last: joined before the queue goes
};

}  // namespace ucm
