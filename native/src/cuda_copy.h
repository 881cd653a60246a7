// The gather/scatter kernel's interface. Kept apart from cuda_backend.cc so
// the backend is plain C++ (compiled by the host compiler against the CUDA
// runtime headers, or against the emulated runtime in native/cuda_emu/), and
// only this kernel needs nvcc. The emulated runtime implements
// LaunchCopyPieces as a host loop doing the same per-piece work.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace ucm {

// One contiguous copy of at most kCopyPiece bytes. Both ends are addresses
// the device can use: device memory, or mapped pinned host memory.
struct CopyPiece {
  const uint8_t* src;
  uint8_t* dst;
  unsigned long long len;
};

// Large copies are cut into pieces of at most this size so a block with few
// big shards (MLA: one per layer) still spreads over many thread blocks.
constexpr uint64_t kCopyPiece = uint64_t{64} * 1024;

// Queues one kernel launch on `stream` that performs every piece of `table`
// (pinned, mapped host memory the caller keeps until the stream synchronized).
cudaError_t LaunchCopyPieces(const CopyPiece* table, int n, cudaStream_t stream);

}  // namespace ucm
