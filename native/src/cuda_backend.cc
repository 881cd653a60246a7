// CUDA backend (see cuda_backend.h): the probe, device selection, IPC
// regions and events, and the notices for the log. The copy paths are in
// cuda_stager.cc, the kernel in cuda_copy_kernel.cu. CUDA runtime API calls
// only; tests build these same files against the emulated runtime in
// native/cuda_emu/.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>

#include "cuda_backend.h"
#include "cuda_internal.h"

namespace ucm {
namespace {

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

}  // namespace

std::string CudaErr(const std::string& what, cudaError_t e) {
  return what + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
}

std::string CudaVersionText(int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); }

void AddCudaNotice(bool* once, const std::string& message) {
  std::lock_guard<std::mutex> lock(g_notice_mu);
  if (*once) return;
  *once = true;
  g_notices.push_back(message);
}

bool UseDevice(int device, std::string* error) {
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) {
    *error = CudaErr("cudaSetDevice(" + std::to_string(device) + ")", e);
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
      s.why = "the NVIDIA driver supports CUDA " + CudaVersionText(s.driver_version) +
              ", but this engine was built with CUDA " + CudaVersionText(s.runtime_version) + ", which needs driver " +
              std::to_string(MinDriver(s.runtime_version)) +
              " or newer: update the driver, or rebuild native/ with a CUDA toolkit the driver supports (" +
              CudaErr("cudaGetDeviceCount", e) + ")";
    } else if (e != cudaSuccess) {
      s.devices = 0;
      s.why = s.driver_version == 0
                  ? "no NVIDIA driver (libcuda.so.1) in the engine process; " + CudaErr("cudaGetDeviceCount", e)
                  : CudaErr("cudaGetDeviceCount", e);
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
             "sees only those): " + CudaErr("cudaDeviceGetByPCIBusId", e);
    return false;
  }
  *device = d;
  return true;
}

// Sleeps between polls (50 us doubling to 1 ms): an event that completes at
// once costs one query, one that never completes costs almost no CPU.
bool AwaitCudaEvent(const CudaEvent& ev, uint32_t timeout_ms, const std::function<bool()>& abandon,
                    std::string* error) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  auto nap = std::chrono::microseconds(50);
  if (cudaSetDevice(ev.device()) != cudaSuccess) cudaGetLastError();  // queries run in the event's context
  for (;;) {
    cudaError_t e = cudaEventQuery(static_cast<cudaEvent_t>(ev.raw()));
    if (e == cudaSuccess) return true;
    if (e != cudaErrorNotReady) {
      cudaGetLastError();
      *error = CudaErr("cudaEventQuery(the client's CUDA event)", e);
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
      *error = CudaErr("cudaIpcOpenMemHandle", e) +
               " (is the exporting process alive, on this node, and is the memory " + "from cudaMalloc?)";
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

std::shared_ptr<CudaEvent> CudaEvent::Open(int client_device, const std::string& pci_bus_id, const std::string& handle,
                                           std::string* error) {
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
    *error = CudaErr("cudaIpcOpenEventHandle", e);
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

}  // namespace ucm
