// CUDA backend (see cuda_backend.h). Built only when CMake finds nvcc.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>

#include "block_file.h"
#include "cuda_backend.h"

namespace ucm {
namespace {

// Large copies are cut into pieces of at most this size so a block with few
// big shards (MLA: one per layer) still spreads over many thread blocks.
constexpr uint64_t kPiece = 64 * 1024;
constexpr int kThreads = 256;
constexpr int kMaxGrid = 4096;

std::string Err(const char* what, cudaError_t e) {
  return std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
}

struct Piece {
  const uint8_t* src;
  uint8_t* dst;
  unsigned long long len;
};

// One thread block per piece (grid-stride over pieces): 16-byte vectors when
// both ends and the length allow it, bytes otherwise. Staging is mapped
// pinned host memory, so this one launch is the whole gather or scatter.
__global__ void CopyPieces(const Piece* pieces, int n) {
  for (int p = blockIdx.x; p < n; p += gridDim.x) {
    const Piece c = pieces[p];
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

// Opened IPC allocations, shared by every region exporting the same one.
struct Mapping {
  uint8_t* base = nullptr;
  int device = -1;
  int refs = 0;
};
std::mutex g_map_mu;
std::map<std::string, Mapping> g_maps;

// Sets the calling thread's device; false with a message when it cannot.
bool UseDevice(int device, std::string* error) {
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) {
    *error = Err(("cudaSetDevice(" + std::to_string(device) + ")").c_str(), e);
    return false;
  }
  return true;
}

bool CheckUsable(int device, std::string* error) {
  const CudaStatus& st = CudaProbe();
  if (!st.usable) {
    *error = "no usable GPU in the engine process: " + st.why;
    return false;
  }
  if (device < 0 || device >= st.devices) {
    *error = "device " + std::to_string(device) + " does not exist (the engine sees " + std::to_string(st.devices) +
             " device(s); check CUDA_VISIBLE_DEVICES of the engine and of vLLM)";
    return false;
  }
  return true;
}

}  // namespace

const CudaStatus& CudaProbe() {
  static const CudaStatus status = [] {
    CudaStatus s;
    s.built = true;
    cudaRuntimeGetVersion(&s.runtime_version);
    cudaDriverGetVersion(&s.driver_version);
    cudaError_t e = cudaGetDeviceCount(&s.devices);
    if (e != cudaSuccess) {
      s.devices = 0;
      s.why = s.driver_version == 0 ? "no NVIDIA driver (libcuda.so.1) in the engine process; " + Err("cudaGetDeviceCount", e)
                                    : Err("cudaGetDeviceCount", e);
    } else if (s.devices == 0) {
      s.why = "no CUDA device";
    } else {
      s.usable = true;
    }
    return s;
  }();
  return status;
}

std::shared_ptr<CudaRegion> CudaRegion::Open(int device, const std::string& handle, uint64_t offset, uint64_t size,
                                             std::string* error) {
  if (handle.size() != sizeof(cudaIpcMemHandle_t)) {
    *error = "CUDA IPC handle must be " + std::to_string(sizeof(cudaIpcMemHandle_t)) + " bytes, got " +
             std::to_string(handle.size());
    return nullptr;
  }
  if (size == 0) {
    *error = "region size must be positive";
    return nullptr;
  }
  if (!CheckUsable(device, error)) return nullptr;
  const std::string key = std::to_string(device) + ":" + handle;
  std::lock_guard<std::mutex> lock(g_map_mu);
  Mapping& m = g_maps[key];
  if (m.refs == 0) {
    if (!UseDevice(device, error)) {
      g_maps.erase(key);
      return nullptr;
    }
    cudaIpcMemHandle_t h;
    std::memcpy(&h, handle.data(), sizeof h);
    void* p = nullptr;
    cudaError_t e = cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess);
    if (e != cudaSuccess) {
      g_maps.erase(key);
      *error = Err("cudaIpcOpenMemHandle", e) + " (is the exporting process alive, and on this node?)";
      return nullptr;
    }
    m.base = static_cast<uint8_t*>(p);
    m.device = device;
  }
  m.refs++;
  std::shared_ptr<CudaRegion> r(new CudaRegion());
  r->key_ = key;
  r->device_ = device;
  r->device_base_ = m.base + offset;
  r->size_ = size;
  return r;
}

CudaRegion::~CudaRegion() {
  std::lock_guard<std::mutex> lock(g_map_mu);
  auto it = g_maps.find(key_);
  if (it == g_maps.end() || --it->second.refs > 0) return;
  if (cudaSetDevice(it->second.device) == cudaSuccess) cudaIpcCloseMemHandle(it->second.base);
  g_maps.erase(it);
}

std::shared_ptr<CudaEvent> CudaEvent::Open(int device, const std::string& handle, std::string* error) {
  if (handle.size() != sizeof(cudaIpcEventHandle_t)) {
    *error = "CUDA IPC event handle must be " + std::to_string(sizeof(cudaIpcEventHandle_t)) + " bytes, got " +
             std::to_string(handle.size());
    return nullptr;
  }
  if (!CheckUsable(device, error) || !UseDevice(device, error)) return nullptr;
  cudaIpcEventHandle_t h;
  std::memcpy(&h, handle.data(), sizeof h);
  cudaEvent_t ev = nullptr;
  cudaError_t e = cudaIpcOpenEventHandle(&ev, h);
  if (e != cudaSuccess) {
    *error = Err("cudaIpcOpenEventHandle", e);
    return nullptr;
  }
  std::shared_ptr<CudaEvent> out(new CudaEvent());
  out->device_ = device;
  out->event_ = ev;
  return out;
}

CudaEvent::~CudaEvent() {
  if (event_ && cudaSetDevice(device_) == cudaSuccess) cudaEventDestroy(static_cast<cudaEvent_t>(event_));
}

std::unique_ptr<CudaStager> CudaStager::Create(size_t bytes, CudaCopy method, std::string* error) {
  if (!CudaProbe().usable) {
    *error = "no usable GPU in the engine process: " + CudaProbe().why;
    return nullptr;
  }
  std::unique_ptr<CudaStager> s(new CudaStager());
  s->method_ = method;
  void* p = nullptr;
  // Portable: usable from every device's context; mapped: the gather kernel
  // writes it directly (with unified addressing the host pointer is valid on
  // the device). 4 KiB extra so O_DIRECT gets a page-aligned start.
  cudaError_t e = cudaHostAlloc(&p, bytes + kBlockAlign, cudaHostAllocPortable | cudaHostAllocMapped);
  if (e != cudaSuccess) {
    *error = Err(("cudaHostAlloc(" + std::to_string(bytes) + " bytes of pinned staging)").c_str(), e);
    return nullptr;
  }
  s->alloc_ = static_cast<uint8_t*>(p);
  s->data_ = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(p) + kBlockAlign - 1) / kBlockAlign * kBlockAlign);
  s->capacity_ = bytes;
  return s;
}

CudaStager::~CudaStager() {
  for (size_t d = 0; d < streams_.size(); ++d) {
    if (streams_[d] && cudaSetDevice(static_cast<int>(d)) == cudaSuccess) {
      cudaStreamSynchronize(static_cast<cudaStream_t>(streams_[d]));
      cudaStreamDestroy(static_cast<cudaStream_t>(streams_[d]));
    }
  }
  if (table_) cudaFreeHost(table_);
  if (alloc_) cudaFreeHost(alloc_);
}

void* CudaStager::Stream(int device, std::string* error) {
  if (static_cast<size_t>(device) >= streams_.size()) streams_.resize(device + 1, nullptr);
  if (!streams_[device]) {
    cudaStream_t s = nullptr;
    cudaError_t e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
    if (e != cudaSuccess) {
      *error = Err("cudaStreamCreateWithFlags", e);
      return nullptr;
    }
    streams_[device] = s;
  }
  return streams_[device];
}

bool CudaStager::Gather(int device, const std::vector<DeviceCopy>& copies, const CudaEvent* after, std::string* error) {
  return Run(device, copies, true, after, error);
}

bool CudaStager::Scatter(int device, const std::vector<DeviceCopy>& copies, std::string* error) {
  return Run(device, copies, false, nullptr, error);
}

bool CudaStager::Run(int device, const std::vector<DeviceCopy>& copies, bool to_host, const CudaEvent* after,
                     std::string* error) {
  if (!CheckUsable(device, error) || !UseDevice(device, error)) return false;
  for (const DeviceCopy& c : copies) {
    if (c.host_off > capacity_ || c.len > capacity_ - c.host_off) {
      *error = "copy outside the pinned staging buffer";
      return false;
    }
  }
  auto stream = static_cast<cudaStream_t>(Stream(device, error));
  if (!stream) return false;
  cudaError_t e;
  if (after) {
    // The event lives on its own device; a stream may wait on any device's event.
    e = cudaStreamWaitEvent(stream, static_cast<cudaEvent_t>(after->raw()), 0);
    if (e != cudaSuccess) {
      *error = Err("cudaStreamWaitEvent", e);
      return false;
    }
  }
  if (method_ == CudaCopy::kBatch) {
    srcs_.clear();
    dsts_.clear();
    sizes_.clear();
    for (const DeviceCopy& c : copies) {
      void* host = data_ + c.host_off;
      srcs_.push_back(to_host ? static_cast<void*>(c.dev) : host);
      dsts_.push_back(to_host ? host : static_cast<void*>(c.dev));
      sizes_.push_back(c.len);
    }
    cudaMemcpyAttributes attr;
    std::memset(&attr, 0, sizeof attr);
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    attr.srcLocHint.type = to_host ? cudaMemLocationTypeDevice : cudaMemLocationTypeHost;
    attr.srcLocHint.id = to_host ? device : 0;
    attr.dstLocHint.type = to_host ? cudaMemLocationTypeHost : cudaMemLocationTypeDevice;
    attr.dstLocHint.id = to_host ? 0 : device;
    size_t attr_idx = 0;
    e = cudaMemcpyBatchAsync(dsts_.data(), const_cast<const void* const*>(srcs_.data()), sizes_.data(), copies.size(),
                             &attr, &attr_idx, 1, stream);
    if (e != cudaSuccess) {
      // Drivers without batched copies: fall back to the kernel for good.
      cudaGetLastError();
      method_ = CudaCopy::kKernel;
    }
  }
  if (method_ == CudaCopy::kKernel) {
    size_t pieces = 0;
    for (const DeviceCopy& c : copies) pieces += (c.len + kPiece - 1) / kPiece;
    if (pieces > table_entries_) {
      if (table_) cudaFreeHost(table_);
      table_ = nullptr;
      table_entries_ = 0;
      e = cudaHostAlloc(&table_, pieces * sizeof(Piece), cudaHostAllocPortable | cudaHostAllocMapped);
      if (e != cudaSuccess) {
        table_ = nullptr;
        *error = Err("cudaHostAlloc(copy table)", e);
        return false;
      }
      table_entries_ = pieces;
    }
    Piece* t = static_cast<Piece*>(table_);
    size_t n = 0;
    for (const DeviceCopy& c : copies) {
      for (uint64_t off = 0; off < c.len; off += kPiece) {
        uint8_t* dev = c.dev + off;
        uint8_t* host = data_ + c.host_off + off;
        const uint64_t len = std::min<uint64_t>(kPiece, c.len - off);
        t[n++] = to_host ? Piece{dev, host, len} : Piece{host, dev, len};
      }
    }
    const int grid = static_cast<int>(std::min<size_t>(n, kMaxGrid));
    if (grid > 0) CopyPieces<<<grid, kThreads, 0, stream>>>(t, static_cast<int>(n));
    e = cudaGetLastError();
    if (e != cudaSuccess) {
      *error = Err("gather/scatter kernel launch", e);
      return false;
    }
  }
  e = cudaStreamSynchronize(stream);
  if (e != cudaSuccess) {
    *error = Err("cudaStreamSynchronize", e);
    return false;
  }
  return true;
}

}  // namespace ucm
