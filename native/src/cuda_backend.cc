// CUDA backend (see cuda_backend.h): CUDA runtime API calls only. The kernel
// lives in cuda_copy_kernel.cu; tests build this same file against the
// emulated runtime in native/cuda_emu/.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>

#include "block_file.h"
#include "cuda_backend.h"
#include "cuda_copy.h"

// cudaMemcpyBatchAsync arrived in CUDA 12.8 with a failure-index argument
// that CUDA 13.0 dropped; older runtimes have no batched copy at all.
#if CUDART_VERSION >= 13000
#define UCM_BATCH_COPY 13
#elif CUDART_VERSION >= 12080
#define UCM_BATCH_COPY 12
#else
#define UCM_BATCH_COPY 0
#endif

namespace ucm {
namespace {

std::string Err(const std::string& what, cudaError_t e) {
  return what + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
}

std::string Version(int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); }

// The oldest Linux driver a runtime of this version runs on (minor version
// compatibility within a major release).
int MinDriver(int runtime) {
  if (runtime >= 13000) return 580;
  if (runtime >= 12000) return 525;
  return 450;
}

// Opened IPC allocations, shared by every region exporting the same one.
struct Mapping {
  uint8_t* base = nullptr;
  int device = -1;
  int refs = 0;
};
std::mutex g_map_mu;
std::map<std::string, Mapping> g_maps;

std::mutex g_notice_mu;
std::vector<std::string> g_notices;
bool g_batch_notice_given = false;

// Sets the calling thread's device (this creates its context on first use).
bool UseDevice(int device, std::string* error) {
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) {
    *error = Err("cudaSetDevice(" + std::to_string(device) + ")", e);
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
             " device(s); send the GPU's PCI bus id, or check CUDA_VISIBLE_DEVICES of the engine)";
    return false;
  }
  return true;
}

}  // namespace

const CudaStatus& CudaProbe() {
  static const CudaStatus status = [] {
    CudaStatus s;
    s.built = true;
#ifdef UCM_CUDA_EMU
    s.emulated = true;
#endif
    s.batch_copies = UCM_BATCH_COPY != 0;
    cudaRuntimeGetVersion(&s.runtime_version);
    cudaDriverGetVersion(&s.driver_version);
    cudaError_t e = cudaGetDeviceCount(&s.devices);
    if (e != cudaSuccess && s.driver_version > 0 && s.driver_version / 1000 < s.runtime_version / 1000) {
      s.devices = 0;
      s.why = "the NVIDIA driver supports CUDA " + Version(s.driver_version) + ", but this engine was built with CUDA " +
              Version(s.runtime_version) + ", which needs driver " + std::to_string(MinDriver(s.runtime_version)) +
              " or newer: update the driver, or rebuild native/ with a CUDA toolkit the driver supports (" +
              Err("cudaGetDeviceCount", e) + ")";
    } else if (e != cudaSuccess) {
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

bool ResolveDevice(int client_device, const std::string& pci_bus_id, int* device, std::string* error) {
  if (pci_bus_id.empty()) {
    *device = client_device;
    return CheckUsable(client_device, error);
  }
  if (!CheckUsable(0, error)) return false;
  int d = -1;
  cudaError_t e = cudaDeviceGetByPCIBusId(&d, pci_bus_id.c_str());
  if (e != cudaSuccess) {
    cudaGetLastError();
    *error = "no GPU with PCI bus id '" + pci_bus_id + "' is visible to the engine (it sees " +
             std::to_string(CudaProbe().devices) + " device(s); an engine started with CUDA_VISIBLE_DEVICES " +
             "sees only those): " + Err("cudaDeviceGetByPCIBusId", e);
    return false;
  }
  *device = d;
  return true;
}

// Sleeps between polls (50 us doubling to 1 ms): an event that completes at
// once costs one query, one that never completes costs almost no CPU.
bool AwaitCudaEvent(const CudaEvent& ev, uint32_t timeout_ms, const std::function<bool()>& abandon, std::string* error) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  auto nap = std::chrono::microseconds(50);
  if (cudaSetDevice(ev.device()) != cudaSuccess) cudaGetLastError();  // queries run in the event's context
  for (;;) {
    cudaError_t e = cudaEventQuery(static_cast<cudaEvent_t>(ev.raw()));
    if (e == cudaSuccess) return true;
    if (e != cudaErrorNotReady) {
      cudaGetLastError();
      *error = Err("cudaEventQuery(the client's CUDA event)", e);
      return false;
    }
    if (abandon && abandon()) {
      error->clear();
      return false;
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      *error = "the client's CUDA event did not complete within " + std::to_string(timeout_ms) + " ms";
      return false;
    }
    std::this_thread::sleep_for(nap);
    nap = std::min(nap * 2, std::chrono::microseconds(1000));
  }
}

std::vector<std::string> TakeCudaNotices() {
  std::lock_guard<std::mutex> lock(g_notice_mu);
  std::vector<std::string> out;
  out.swap(g_notices);
  return out;
}

std::shared_ptr<CudaRegion> CudaRegion::Open(int client_device, const std::string& pci_bus_id,
                                             const std::string& handle, uint64_t offset, uint64_t size,
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
  int device = -1;
  if (!ResolveDevice(client_device, pci_bus_id, &device, error)) return nullptr;
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
      cudaGetLastError();
      g_maps.erase(key);
      *error = Err("cudaIpcOpenMemHandle", e) + " (is the exporting process alive, on this node, and is the memory " +
               "from cudaMalloc?)";
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

std::shared_ptr<CudaEvent> CudaEvent::Open(int client_device, const std::string& pci_bus_id,
                                           const std::string& handle, std::string* error) {
  if (handle.size() != sizeof(cudaIpcEventHandle_t)) {
    *error = "CUDA IPC event handle must be " + std::to_string(sizeof(cudaIpcEventHandle_t)) + " bytes, got " +
             std::to_string(handle.size());
    return nullptr;
  }
  int device = -1;
  if (!ResolveDevice(client_device, pci_bus_id, &device, error) || !UseDevice(device, error)) return nullptr;
  cudaIpcEventHandle_t h;
  std::memcpy(&h, handle.data(), sizeof h);
  cudaEvent_t ev = nullptr;
  cudaError_t e = cudaIpcOpenEventHandle(&ev, h);
  if (e != cudaSuccess) {
    cudaGetLastError();
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

std::unique_ptr<CudaStager> CudaStager::Create(int device, size_t bytes, CudaCopy method, std::string* error) {
  if (!CheckUsable(device, error) || !UseDevice(device, error)) return nullptr;
  std::unique_ptr<CudaStager> s(new CudaStager());
  s->method_ = method;
  if (UCM_BATCH_COPY == 0 && method == CudaCopy::kBatch) s->method_ = CudaCopy::kKernel;
  void* p = nullptr;
  // Portable: usable from every device's context; mapped: the gather kernel
  // writes it directly (with unified addressing the host pointer is valid on
  // the device). 4 KiB extra so O_DIRECT gets a page-aligned start.
  cudaError_t e = cudaHostAlloc(&p, bytes + kBlockAlign, cudaHostAllocPortable | cudaHostAllocMapped);
  if (e != cudaSuccess) {
    cudaGetLastError();
    *error = Err("cudaHostAlloc(" + std::to_string(bytes) + " bytes of pinned staging)", e);
    return nullptr;
  }
  s->alloc_ = static_cast<uint8_t*>(p);
  s->data_ = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(p) + kBlockAlign - 1) / kBlockAlign * kBlockAlign);
  s->capacity_ = bytes;
  return s;
}

CudaStager::~CudaStager() {
  if (broken_) return;  // a copy may still target this memory: abandon it
  for (size_t d = 0; d < streams_.size(); ++d) {
    if (streams_[d] && cudaSetDevice(static_cast<int>(d)) == cudaSuccess) {
      cudaStreamSynchronize(static_cast<cudaStream_t>(streams_[d]));
      cudaStreamDestroy(static_cast<cudaStream_t>(streams_[d]));
      if (done_[d]) cudaEventDestroy(static_cast<cudaEvent_t>(done_[d]));
    }
  }
  if (table_) cudaFreeHost(table_);
  if (alloc_) cudaFreeHost(alloc_);
}

bool CudaStager::Streams(int device, std::string* error) {
  if (static_cast<size_t>(device) >= streams_.size()) {
    streams_.resize(device + 1, nullptr);
    done_.resize(device + 1, nullptr);
  }
  if (!streams_[device]) {
    cudaStream_t s = nullptr;
    cudaError_t e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
    if (e != cudaSuccess) {
      cudaGetLastError();
      *error = Err("cudaStreamCreateWithFlags", e);
      return false;
    }
    streams_[device] = s;
  }
  if (!done_[device]) {
    // Blocking sync: the waiting thread sleeps until the copy engine or the
    // kernel is done instead of spinning on a core.
    cudaEvent_t ev = nullptr;
    cudaError_t e = cudaEventCreateWithFlags(&ev, cudaEventBlockingSync | cudaEventDisableTiming);
    if (e != cudaSuccess) {
      cudaGetLastError();
      *error = Err("cudaEventCreateWithFlags", e);
      return false;
    }
    done_[device] = ev;
  }
  return true;
}

bool CudaStager::Gather(int device, const std::vector<DeviceCopy>& copies, std::string* error) {
  return Run(device, copies, true, error);
}

bool CudaStager::Scatter(int device, const std::vector<DeviceCopy>& copies, std::string* error) {
  return Run(device, copies, false, error);
}

bool CudaStager::EnqueueBatch(int device, const std::vector<DeviceCopy>& copies, bool to_host, void* stream,
                              std::string* error) {
#if UCM_BATCH_COPY
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
#if UCM_BATCH_COPY == 13
  cudaError_t e = cudaMemcpyBatchAsync(dsts_.data(), srcs_.data(), sizes_.data(), copies.size(), &attr, &attr_idx, 1,
                                       static_cast<cudaStream_t>(stream));
#else
  size_t fail_idx = 0;
  cudaError_t e = cudaMemcpyBatchAsync(dsts_.data(), srcs_.data(), sizes_.data(), copies.size(), &attr, &attr_idx, 1,
                                       &fail_idx, static_cast<cudaStream_t>(stream));
#endif
  if (e == cudaSuccess) return true;
  cudaGetLastError();
  // Only a driver that lacks the call sends us to the kernel; any other
  // error fails this block and is reported with it.
  if (e != cudaErrorNotSupported && e != cudaErrorCallRequiresNewerDriver) {
    *error = Err("cudaMemcpyBatchAsync", e);
    return false;
  }
  method_ = CudaCopy::kKernel;
  {
    std::lock_guard<std::mutex> lock(g_notice_mu);
    if (!g_batch_notice_given) {
      g_batch_notice_given = true;
      g_notices.push_back("cudaMemcpyBatchAsync is not available with this driver (CUDA " +
                          Version(CudaProbe().driver_version) + "; " + Err("cudaMemcpyBatchAsync", e) +
                          "): GPU blocks move with the copy kernel instead");
    }
  }
  return EnqueueKernel(copies, to_host, stream, error);
#else
  (void)device;
  return EnqueueKernel(copies, to_host, stream, error);
#endif
}

bool CudaStager::EnqueueKernel(const std::vector<DeviceCopy>& copies, bool to_host, void* stream, std::string* error) {
  size_t pieces = 0;
  for (const DeviceCopy& c : copies) pieces += (c.len + kCopyPiece - 1) / kCopyPiece;
  if (pieces > table_entries_) {
    if (table_) cudaFreeHost(table_);
    table_ = nullptr;
    table_entries_ = 0;
    cudaError_t e = cudaHostAlloc(&table_, pieces * sizeof(CopyPiece), cudaHostAllocPortable | cudaHostAllocMapped);
    if (e != cudaSuccess) {
      cudaGetLastError();
      table_ = nullptr;
      *error = Err("cudaHostAlloc(copy table)", e);
      return false;
    }
    table_entries_ = pieces;
  }
  CopyPiece* t = static_cast<CopyPiece*>(table_);
  size_t n = 0;
  for (const DeviceCopy& c : copies) {
    for (uint64_t off = 0; off < c.len; off += kCopyPiece) {
      uint8_t* dev = c.dev + off;
      uint8_t* host = data_ + c.host_off + off;
      const uint64_t len = std::min<uint64_t>(kCopyPiece, c.len - off);
      t[n++] = to_host ? CopyPiece{dev, host, len} : CopyPiece{host, dev, len};
    }
  }
  cudaError_t e = LaunchCopyPieces(t, static_cast<int>(n), static_cast<cudaStream_t>(stream));
  if (e != cudaSuccess) {
    cudaGetLastError();
    *error = Err("gather/scatter kernel launch", e);
    return false;
  }
  return true;
}

bool CudaStager::Run(int device, const std::vector<DeviceCopy>& copies, bool to_host, std::string* error) {
  if (broken_) {
    *error = "this transfer thread's staging was abandoned after a copy that did not finish";
    return false;
  }
  if (!CheckUsable(device, error) || !UseDevice(device, error)) return false;
  for (const DeviceCopy& c : copies) {
    if (c.host_off > capacity_ || c.len > capacity_ - c.host_off) {
      *error = "copy outside the pinned staging buffer";
      return false;
    }
  }
  if (!Streams(device, error)) return false;
  void* stream = streams_[device];
  const bool queued = method_ == CudaCopy::kBatch ? EnqueueBatch(device, copies, to_host, stream, error)
                                                  : EnqueueKernel(copies, to_host, stream, error);
  if (!queued) return false;
  auto done = static_cast<cudaEvent_t>(done_[device]);
  cudaError_t e = cudaEventRecord(done, static_cast<cudaStream_t>(stream));
  if (e == cudaSuccess) e = cudaEventSynchronize(done);
  if (e != cudaSuccess) {
    cudaGetLastError();
    // The copy's state is unknown: never reuse this staging for another block.
    broken_ = true;
    *error = Err(to_host ? "waiting for the gather" : "waiting for the scatter", e);
    return false;
  }
  return true;
}

}  // namespace ucm
