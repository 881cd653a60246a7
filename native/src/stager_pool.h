// Pinned staging for device blocks, shared by the transfer workers.
//
// `pinnedStagingBytes` is split into one share per transfer stream, each
// allocated at its first use; a worker borrows a share for one device block
// (gather and write, or read, verify and scatter) and gives it back. There
// are more workers than streams (see io_gate.h); device blocks do not get
// that overlap, because a share is busy until its block's write ends and the
// pinned memory bound stays what the operator set.
//
// Loads come first: a load is on the critical path of a request, a dump is
// not. A dump takes a share only while no load waits for one, and the
// workers pick a device dump only when a share is free for it (Ready), so
// dumps into a slow directory never park every worker and share while loads
// queue behind them.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cuda_backend.h"

namespace ucm {

class StagerPool {
 public:
  // `on_give` runs after a share comes back, outside the pool's lock (the
  // engine wakes workers that left a device dump queued for want of one).
  StagerPool(uint32_t shares, uint64_t share_bytes, CudaCopy method, std::function<void()> on_give = {});
  StagerPool(const StagerPool&) = delete;
  StagerPool& operator=(const StagerPool&) = delete;

  // Waits for a free share (its holders are moving one block each, so one
  // frees up within a block's I/O), allocating it with `device` current if
  // it is new. Null with `error` set when the allocation fails; null with
  // `error` empty when `stop` (asked every 50 ms while waiting) said so.
  // A dump (`load` false) also waits while a load waits.
  std::unique_ptr<CudaStager> Take(int device, bool load, const std::function<bool()>& stop, std::string* error);
  // Whether a dump taking a share now would get one at once.
  bool Ready() const;
  // Returns a share. A broken one (a copy of it never finished) is dropped,
  // its memory abandoned, and the share is allocated afresh when next taken.
  void Give(std::unique_ptr<CudaStager> s);

  uint64_t share_bytes() const { return share_bytes_; }
  uint64_t pinned_bytes() const;  // allocated and not abandoned

 private:
  const uint32_t shares_;
  const uint64_t share_bytes_;
  const CudaCopy method_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::unique_ptr<CudaStager>> idle_;
  const std::function<void()> on_give_;
  uint32_t made_ = 0;           // shares allocated and not abandoned (idle or lent)
  uint32_t waiting_loads_ = 0;  // loads waiting in Take
};

}  // namespace ucm
