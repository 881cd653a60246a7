// How many block reads and writes reach storage at once.
//
// The transfer pool runs a second worker for each transfer stream (while
// there are CPUs for them, TransferEngine::WorkerCount). A worker prepares
// its block off the gate (a dump: gather the shards, checksum them, create
// the file; a load: open it) and finishes it off the gate (a load: verify the
// checksum, scatter into the client's memory), and holds a pass only for the
// read or write itself. So while one worker waits on the device, another
// does the CPU work of the next block, and storage sees at most
// `transferStreamNumber` transfers in flight, as fio sees its numjobs. With
// one worker a stream, each stream left storage idle for the gather, checksum
// and file creation of every block (on a 16-vCPU machine, 4 MiB dumps at 8
// streams reached 73-84 % of fio's 8-job writes).
//
// A waiting load goes before any waiting dump: loads are on the critical path.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>

namespace ucm {

class IoGate {
 public:
  explicit IoGate(uint32_t passes) : free_(passes) {}
  IoGate(const IoGate&) = delete;
  IoGate& operator=(const IoGate&) = delete;

  // Held for the duration of one read or write; a null gate admits everyone.
  class Pass {
   public:
    Pass(IoGate* gate, bool load) : gate_(gate) {
      if (!gate_) return;
      const uint64_t asked = Now();
      const bool waited = gate_->Enter(load);
      since_ = Now();
      if (waited) gate_->wait_ns_.fetch_add(since_ - asked, std::memory_order_relaxed);
    }
    ~Pass() { Leave(); }
    Pass(const Pass&) = delete;
    Pass& operator=(const Pass&) = delete;
    // Gives the pass back early (before the slow part that needs none).
    void Leave() {
      if (!gate_) return;
      gate_->busy_ns_.fetch_add(Now() - since_, std::memory_order_relaxed);
      gate_->Leave();
      gate_ = nullptr;
    }

   private:
    IoGate* gate_;
    uint64_t since_ = 0;
  };

  // Nanoseconds passes were held, summed over passes: divided by the wall
  // time and the number of passes, how busy the streams kept storage.
  uint64_t busy_ns() const { return busy_ns_.load(std::memory_order_relaxed); }
  // Nanoseconds workers waited for a pass, summed: a block ready to go while
  // every stream was busy with storage.
  uint64_t wait_ns() const { return wait_ns_.load(std::memory_order_relaxed); }

 private:
  static uint64_t Now() {
    return static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
            .count());
  }
  // True when the caller had to wait for its pass.
  bool Enter(bool load) {
    std::unique_lock<std::mutex> lock(mu_);
    bool waited = false;
    if (load) {
      ++loads_waiting_;
      waited = free_ == 0;
      cv_.wait(lock, [this] { return free_ > 0; });
      --loads_waiting_;
    } else {
      waited = free_ == 0 || loads_waiting_ > 0;
      cv_.wait(lock, [this] { return free_ > 0 && loads_waiting_ == 0; });
    }
    --free_;
    return waited;
  }
  void Leave() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++free_;
    }
    cv_.notify_all();  // a freed pass may go to a load or, with none waiting, a dump
  }

  std::mutex mu_;
  std::condition_variable cv_;
  uint32_t free_;
  uint32_t loads_waiting_ = 0;
  std::atomic<uint64_t> busy_ns_{0};
  std::atomic<uint64_t> wait_ns_{0};
};

}  // namespace ucm
