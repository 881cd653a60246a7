// Pinned staging for device blocks, shared by the transfer workers.
//
// `pinnedStagingBytes` is split into one share per transfer stream, each
// allocated at its first use; a worker borrows a share for one device block
// (gather and write, or read, verify and scatter) and gives it back. There
// are more workers than streams (see io_gate.h); device blocks do not get
// that overlap, because a share is busy until its block's write ends and the
// pinned memory bound stays what the operator set.
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
  StagerPool(uint32_t shares, uint64_t share_bytes, CudaCopy method);
  StagerPool(const StagerPool&) = delete;
  StagerPool& operator=(const StagerPool&) = delete;

  // Waits for a free share (its holders are moving one block each, so one
  // frees up within a block's I/O), allocating it with `device` current if
  // it is new. Null with `error` set when the allocation fails; null with
  // `error` empty when `stop` (asked every 50 ms while waiting) said so.
  std::unique_ptr<CudaStager> Take(int device, const std::function<bool()>& stop, std::string* error);
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
  uint32_t made_ = 0;  // shares allocated and not abandoned (idle or lent)
};

}  // namespace ucm
