// The gather/scatter kernel (see cuda_copy.h). Built by nvcc only.
#include "cuda_copy.h"

#include <algorithm>

namespace ucm {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxGrid = 4096;

// One thread block per piece (grid-stride over pieces): 16-byte vectors when
// both ends and the length allow it, bytes otherwise. Staging is mapped
// pinned host memory, so this one launch is the whole gather or scatter.
__global__ void CopyPieces(const CopyPiece* pieces, int n) {
  for (int p = blockIdx.x; p < n; p += gridDim.x) {
    const CopyPiece c = pieces[p];
    const uintptr_t mix = reinterpret_cast<uintptr_t>(c.src) | reinterpret_cast<uintptr_t>(c.dst) | c.len;
    if ((mix & 15) == 0) {
      const uint4* s = reinterpret_cast<const uint4*>(c.src);
      uint4* d = reinterpret_cast<uint4*>(c.dst);
      const unsigned long long m = c.len / 16;
      for (unsigned long long i = threadIdx.x; i < m; i += blockDim.x) d[i] = s[i];
    } else {
      for (unsigned long long i = threadIdx.x; i < c.len; i += blockDim.x) c.dst[i] = c.src[i];
    }
  }
}

}  // namespace

cudaError_t LaunchCopyPieces(const CopyPiece* table, int n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const int grid = std::min(n, kMaxGrid);
  CopyPieces<<<grid, kThreads, 0, stream>>>(table, n);
  return cudaGetLastError();
}

}  // namespace ucm
