// The emulated CUDA runtime (see cuda_runtime.h): GPUs are entries of
// UCM_CUDA_EMU_DEVICES, device allocations are POSIX shared memory objects,
// interprocess events are counters in shared memory, and a stream is a queue
// of operations that runs, in order, when someone waits for it.
//
// It follows CUDA where our code depends on it:
// - CUDA_VISIBLE_DEVICES selects and renumbers GPUs per process;
// - cudaSetDevice, and any allocation, stream, event or IPC open on the
//   current device, create that device's context (traced); with no device
//   set, a thread uses device 0;
// - waits spin on the CPU unless the event was created with
//   cudaEventBlockingSync or the device's flags ask for blocking sync;
// - a stream waiting on an event waits for the records issued before the
//   cudaStreamWaitEvent call;
// - a CUDA 13 runtime refuses a driver older than 13.0, and batched copies
//   need a driver of 12.8 or newer;
// - the copy kernel reads its piece table when it runs, not when launched.
// Stricter than CUDA, so mistakes show: opening a memory handle while
// another GPU is current fails with cudaErrorInvalidDevice (CUDA would map
// it over peer access, slowly, or fail), and every copy must lie inside
// memory the process opened or allocated (cudaErrorIllegalAddress); the copy
// kernel reaches host memory only when it is pinned (cudaHostAlloc, or
// cudaHostRegister of the process's own memory).
#include "cuda_runtime.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cuda_copy.h"

namespace {

struct ErrorName {
  cudaError_t code;
  const char* name;
  const char* text;
};
const ErrorName kErrors[] = {
    {cudaSuccess, "cudaSuccess", "no error"},
    {cudaErrorInvalidValue, "cudaErrorInvalidValue", "invalid argument"},
    {cudaErrorMemoryAllocation, "cudaErrorMemoryAllocation", "out of memory"},
    {cudaErrorInitializationError, "cudaErrorInitializationError", "initialization error"},
    {cudaErrorInsufficientDriver, "cudaErrorInsufficientDriver",
     "CUDA driver version is insufficient for CUDA runtime version"},
    {cudaErrorCallRequiresNewerDriver, "cudaErrorCallRequiresNewerDriver",
     "API call is not supported in the installed CUDA driver"},
    {cudaErrorNoDevice, "cudaErrorNoDevice", "no CUDA-capable device is detected"},
    {cudaErrorInvalidDevice, "cudaErrorInvalidDevice", "invalid device ordinal"},
    {cudaErrorMapBufferObjectFailed, "cudaErrorMapBufferObjectFailed", "mapping of buffer object failed"},
    {cudaErrorAlreadyMapped, "cudaErrorAlreadyMapped", "resource already mapped"},
    {cudaErrorInvalidResourceHandle, "cudaErrorInvalidResourceHandle", "invalid resource handle"},
    {cudaErrorNotReady, "cudaErrorNotReady", "device not ready"},
    {cudaErrorIllegalAddress, "cudaErrorIllegalAddress", "an illegal memory access was encountered"},
    {cudaErrorSetOnActiveProcess, "cudaErrorSetOnActiveProcess", "cannot set while device is active in this process"},
    {cudaErrorHostMemoryAlreadyRegistered, "cudaErrorHostMemoryAlreadyRegistered",
     "part or all of the requested memory range is already mapped"},
    {cudaErrorHostMemoryNotRegistered, "cudaErrorHostMemoryNotRegistered",
     "pointer does not correspond to a registered memory region"},
    {cudaErrorLaunchFailure, "cudaErrorLaunchFailure", "unspecified launch failure"},
    {cudaErrorNotSupported, "cudaErrorNotSupported", "operation not supported"},
    {cudaErrorUnknown, "cudaErrorUnknown", "unknown error"},
};

struct Device {
  std::string bus_id;  // normalized "dddd:bb:dd.f", lower case
  bool context = false;
  unsigned flags = cudaDeviceScheduleAuto;
};

struct Allocation {
  size_t size;
  int device;               // -1: pinned host memory
  std::string name;         // shared memory object (device allocations)
  bool registered = false;  // host memory of the process's own, page-locked by cudaHostRegister
};

// Reads one hex field of a bus id that ends at `sep` ('\0': the end of the
// string) and moves p past the separator; false when the field is not hex.
bool HexField(const char*& p, char sep, unsigned& out) {
  char* end = nullptr;
  unsigned long v = std::strtoul(p, &end, 16);
  if (end == p || *end != sep) return false;
  out = static_cast<unsigned>(v);
  p = sep ? end + 1 : end;
  return true;
}

// Parses "[domain:]bus:device.function" (hex) into a normalized string; ""
// when it is not one.
std::string NormalizeBusId(const std::string& s) {
  unsigned dom = 0, bus = 0, dev = 0, fn = 0;
  const char* p = s.c_str();
  bool with_domain = std::count(s.begin(), s.end(), ':') == 2;
  if ((with_domain && !HexField(p, ':', dom)) || !HexField(p, ':', bus) || !HexField(p, '.', dev) ||
      !HexField(p, '\0', fn)) {
    return "";
  }
  char out[32];
  std::snprintf(out, sizeof out, "%04x:%02x:%02x.%x", dom & 0xffff, bus & 0xff, dev & 0xff, fn & 0x7);
  return out;
}

struct Runtime {
  std::mutex mu;
  std::vector<Device> devices;  // as this process sees them (after CUDA_VISIBLE_DEVICES)
  int driver = 13000;
  std::map<std::string, cudaError_t> faults;
  std::string trace;
  std::map<uintptr_t, Allocation> allocations;  // by start address
  std::map<std::string, void*> opened;          // shared memory name -> address (one mapping per process)

  Runtime() {
    std::vector<std::string> all;
    if (const char* d = std::getenv("UCM_CUDA_EMU_DEVICES")) {
      std::string s = d;
      size_t pos = 0;
      while (pos <= s.size() && !s.empty()) {
        size_t comma = s.find(',', pos);
        std::string item = s.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
        std::string id = NormalizeBusId(item);
        if (!id.empty()) all.push_back(id);
        if (comma == std::string::npos) break;
        pos = comma + 1;
      }
    }
    const char* visible = std::getenv("CUDA_VISIBLE_DEVICES");
    if (visible == nullptr) {
      for (auto& id : all) devices.push_back(Device{id});
    } else {
      // As CUDA does: indices up to the first invalid one.
      std::string s = visible;
      size_t pos = 0;
      while (pos < s.size()) {
        size_t comma = s.find(',', pos);
        std::string item = s.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
        char* end = nullptr;
        long i = std::strtol(item.c_str(), &end, 10);
        if (item.empty() || *end != '\0' || i < 0 || i >= static_cast<long>(all.size())) break;
        devices.push_back(Device{all[i]});
        if (comma == std::string::npos) break;
        pos = comma + 1;
      }
    }
    if (const char* v = std::getenv("UCM_CUDA_EMU_DRIVER")) driver = static_cast<int>(std::strtol(v, nullptr, 10));
    if (const char* t = std::getenv("UCM_CUDA_EMU_TRACE")) trace = t;
    if (const char* f = std::getenv("UCM_CUDA_EMU_FAIL")) {
      std::string s = f;
      size_t pos = 0;
      while (pos < s.size()) {
        size_t comma = s.find(',', pos);
        std::string item = s.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
        size_t eq = item.find('=');
        if (eq != std::string::npos) {
          std::string err = item.substr(eq + 1);
          for (const auto& e : kErrors)
            if (err == e.name) faults[item.substr(0, eq)] = e.code;
        }
        if (comma == std::string::npos) break;
        pos = comma + 1;
      }
    }
  }

  void Trace(const std::string& line) {
    if (trace.empty()) return;
    int fd = open(trace.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (fd < 0) return;
    std::string l = line + "\n";
    if (write(fd, l.data(), l.size()) < 0) {
    }
    close(fd);
  }

  // The device's primary context, created on first use (caller holds mu).
  void Touch(int d) {
    if (!devices[d].context) {
      devices[d].context = true;
      Trace("context " + std::to_string(d) + " " + devices[d].bus_id);
    }
  }

  // The allocation holding [p, p + n), or null.
  const Allocation* Find(const void* p, size_t n) {
    auto a = reinterpret_cast<uintptr_t>(p);
    auto it = allocations.upper_bound(a);
    if (it == allocations.begin()) return nullptr;
    --it;
    if (a < it->first || n > it->second.size || a - it->first > it->second.size - n) return nullptr;
    return &it->second;
  }
};

Runtime& R() {
  static Runtime* r = new Runtime();  // never destroyed: worker threads may outlive static teardown
  return *r;
}

thread_local int t_device = -1;
thread_local cudaError_t t_last = cudaSuccess;

cudaError_t Fail(cudaError_t e) {
  if (e != cudaSuccess && e != cudaErrorNotReady) t_last = e;
  return e;
}

// The configured fault for `call`, if any.
cudaError_t Fault(const char* call) {
  auto& r = R();
  auto it = r.faults.find(call);
  return it == r.faults.end() ? cudaSuccess : it->second;
}

#define UCM_EMU_FAULT(name)                            \
  do {                                                 \
    if (cudaError_t f_ = Fault(name)) return Fail(f_); \
  } while (0)

int Current() { return t_device < 0 ? 0 : t_device; }

// Blocks until *completed >= target: sleeping between checks, or spinning.
void WaitCounter(const uint64_t* counters, uint64_t target, bool blocking) {
  for (;;) {
    if (__atomic_load_n(&counters[1], __ATOMIC_ACQUIRE) >= target) return;
    if (blocking) {
      struct timespec ts = {0, 100000};  // 100 us
      nanosleep(&ts, nullptr);
    } else {
#if defined(__x86_64__)
      __builtin_ia32_pause();
#endif
    }
  }
}

}  // namespace

struct CUevent_st {
  unsigned flags = 0;
  int device = 0;
  uint64_t* counters = nullptr;  // interprocess: {recorded, completed} in shared memory
  std::string name;
  CUstream_st* stream = nullptr;  // local: the stream of the last record
};

// UCM_CUDA_EMU_STALL_COPIES: whether the next copy is held back for good
// (every copy, or every one after the first N: "after:N"). Counts the copies
// it lets run.
bool Stalled() {
  const char* v = std::getenv("UCM_CUDA_EMU_STALL_COPIES");
  if (!v) return false;
  if (std::strncmp(v, "after:", 6) != 0) return true;
  static std::atomic<long> ran{0};
  char* end = nullptr;
  const long first = std::strtol(v + 6, &end, 10);
  if (end == v + 6 || *end != '\0') return true;  // not a count: every copy, as for any other value
  return ran.fetch_add(1) >= first;
}

struct CUstream_st {
  struct Op {
    enum Kind { kWait, kCopy, kPieces } kind;
    const uint64_t* counters = nullptr;  // kWait
    uint64_t target = 0;
    const void* src = nullptr;  // kCopy
    void* dst = nullptr;
    size_t len = 0;
    const ucm::CopyPiece* table = nullptr;  // kPieces
    int n = 0;
  };
  int device = 0;
  std::mutex mu;
  std::vector<Op> ops;

  // Runs every queued operation in order; the first failure is the result.
  cudaError_t Drain(bool blocking) {
    std::lock_guard<std::mutex> lock(mu);
    cudaError_t result = cudaSuccess;
    for (const Op& op : ops) {
      if (result != cudaSuccess) break;
      if (op.kind == Op::kWait)
        WaitCounter(op.counters, op.target, blocking);
      else
        result = Run(op);
    }
    ops.clear();
    return result;
  }

  // The GPU as a poll sees it (cudaEventQuery): the queued operations run in
  // order up to one that waits for an event not completed yet; NotReady while
  // any is left. With UCM_CUDA_EMU_STALL_COPIES set, copies never run: a hung
  // copy engine, for the tests of the engine's bounded waits; set to "after:N",
  // the first N copies of the process run and none after them.
  cudaError_t Advance() {
    std::lock_guard<std::mutex> lock(mu);
    size_t i = 0;
    cudaError_t result = cudaSuccess;
    for (; i < ops.size() && result == cudaSuccess; ++i) {
      const Op& op = ops[i];
      if (op.kind == Op::kWait) {
        if (__atomic_load_n(&op.counters[1], __ATOMIC_ACQUIRE) < op.target) break;
        continue;
      }
      if (Stalled()) break;
      result = Run(op);
    }
    ops.erase(ops.begin(), ops.begin() + static_cast<std::ptrdiff_t>(i));
    if (result != cudaSuccess) return result;
    return ops.empty() ? cudaSuccess : cudaErrorNotReady;
  }

  // One queued copy (a memcpy, or the kernel's table of pieces).
  cudaError_t Run(const Op& op) {
    if (op.kind == Op::kCopy) return Copy(op.dst, op.src, op.len, false);
    // The kernel reads its table from mapped pinned memory.
    {
      std::lock_guard<std::mutex> rl(R().mu);
      const Allocation* t = R().Find(op.table, sizeof(ucm::CopyPiece) * op.n);
      if (!t || t->device >= 0) return cudaErrorIllegalAddress;
    }
    // Each piece as one thread block would do it.
    cudaError_t result = cudaSuccess;
    for (int i = 0; i < op.n && result == cudaSuccess; ++i)
      result = Copy(op.table[i].dst, op.table[i].src, op.table[i].len, true);
    return result;
  }

  // One copy, checked: device memory must be this stream's GPU's; for the
  // kernel, host memory must be pinned (mapped) memory.
  cudaError_t Copy(void* dst, const void* src, size_t len, bool kernel) {
    auto& r = R();
    {
      std::lock_guard<std::mutex> lock(r.mu);
      const Allocation* a = r.Find(src, len);
      const Allocation* b = r.Find(dst, len);
      bool src_dev = a && a->device >= 0, dst_dev = b && b->device >= 0;
      if ((src_dev && a->device != device) || (dst_dev && b->device != device)) return cudaErrorIllegalAddress;
      if (!src_dev && !dst_dev) return cudaErrorInvalidValue;    // host to host is no GPU copy
      if (kernel && (!a || !b)) return cudaErrorIllegalAddress;  // a kernel reaches only mapped memory
    }
    std::memcpy(dst, src, len);
    return cudaSuccess;
  }
};

const char* cudaGetErrorName(cudaError_t e) {
  for (const auto& x : kErrors)
    if (x.code == e) return x.name;
  return "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t e) {
  for (const auto& x : kErrors)
    if (x.code == e) return x.text;
  return "unknown error";
}

cudaError_t cudaGetLastError() {
  cudaError_t e = t_last;
  t_last = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() { return t_last; }

cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = CUDART_VERSION;
  return cudaSuccess;
}

cudaError_t cudaDriverGetVersion(int* v) {
  *v = R().driver;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceCount(int* n) {
  auto& r = R();
  *n = 0;
  UCM_EMU_FAULT("cudaGetDeviceCount");
  if (r.driver / 1000 < CUDART_VERSION / 1000) return Fail(cudaErrorInsufficientDriver);
  if (r.devices.empty()) return Fail(cudaErrorNoDevice);
  *n = static_cast<int>(r.devices.size());
  return cudaSuccess;
}

namespace {
// Checks the device ordinal and the driver (as every call that needs a GPU).
cudaError_t Usable(int d) {
  auto& r = R();
  if (r.driver / 1000 < CUDART_VERSION / 1000) return cudaErrorInsufficientDriver;
  if (r.devices.empty()) return cudaErrorNoDevice;
  if (d < 0 || d >= static_cast<int>(r.devices.size())) return cudaErrorInvalidDevice;
  return cudaSuccess;
}
}  // namespace

cudaError_t cudaSetDevice(int device) {
  UCM_EMU_FAULT("cudaSetDevice");
  if (cudaError_t e = Usable(device)) return Fail(e);
  auto& r = R();
  std::lock_guard<std::mutex> lock(r.mu);
  t_device = device;
  r.Touch(device);  // CUDA 12 and later initialize the context here
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = Current();
  return cudaSuccess;
}

cudaError_t cudaSetDeviceFlags(unsigned int flags) {
  UCM_EMU_FAULT("cudaSetDeviceFlags");
  const int d = Current();
  if (cudaError_t e = Usable(d)) return Fail(e);
  auto& r = R();
  std::lock_guard<std::mutex> lock(r.mu);
  if (r.devices[d].context && r.devices[d].flags != flags) return Fail(cudaErrorSetOnActiveProcess);
  r.devices[d].flags = flags;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetByPCIBusId(int* device, const char* pci_bus_id) {
  UCM_EMU_FAULT("cudaDeviceGetByPCIBusId");
  auto& r = R();
  if (r.driver / 1000 < CUDART_VERSION / 1000) return Fail(cudaErrorInsufficientDriver);
  const std::string want = NormalizeBusId(pci_bus_id ? pci_bus_id : "");
  if (want.empty()) return Fail(cudaErrorInvalidValue);
  for (size_t i = 0; i < r.devices.size(); ++i) {
    if (r.devices[i].bus_id == want) {
      *device = static_cast<int>(i);
      return cudaSuccess;
    }
  }
  return Fail(cudaErrorInvalidDevice);
}

cudaError_t cudaDeviceGetPCIBusId(char* pci_bus_id, int len, int device) {
  if (cudaError_t e = Usable(device)) return Fail(e);
  std::snprintf(pci_bus_id, static_cast<size_t>(len), "%s", R().devices[device].bus_id.c_str());
  return cudaSuccess;
}

namespace {
// Splits an emulated handle: magic (8), bus id (16), shared memory name (40).
bool ParseHandle(const char* h, const char* magic, std::string* bus, std::string* name) {
  if (std::memcmp(h, magic, 8) != 0) return false;
  *bus = NormalizeBusId(std::string(h + 8, strnlen(h + 8, 16)));
  *name = std::string(h + 24, strnlen(h + 24, 40));
  return !bus->empty() && name->size() > 1 && (*name)[0] == '/';
}

void* MapShm(const std::string& name, size_t* size) {
  int fd = shm_open(name.c_str(), O_RDWR, 0);
  if (fd < 0) return nullptr;
  struct stat st;
  void* p = MAP_FAILED;
  if (fstat(fd, &st) == 0 && st.st_size > 0) {
    *size = static_cast<size_t>(st.st_size);
    p = mmap(nullptr, *size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  }
  close(fd);
  return p == MAP_FAILED ? nullptr : p;
}
}  // namespace

cudaError_t cudaIpcOpenMemHandle(void** dev_ptr, cudaIpcMemHandle_t handle, unsigned int) {
  UCM_EMU_FAULT("cudaIpcOpenMemHandle");
  const int d = Current();
  if (cudaError_t e = Usable(d)) return Fail(e);
  std::string bus, name;
  if (!ParseHandle(handle.reserved, "UCMEMU-M", &bus, &name)) return Fail(cudaErrorInvalidValue);
  auto& r = R();
  std::lock_guard<std::mutex> lock(r.mu);
  r.Touch(d);
  if (bus != r.devices[d].bus_id) return Fail(cudaErrorInvalidDevice);
  if (r.opened.count(name)) return Fail(cudaErrorAlreadyMapped);  // one mapping per allocation per process
  size_t size = 0;
  void* p = MapShm(name, &size);
  if (!p) return Fail(cudaErrorMapBufferObjectFailed);
  r.opened[name] = p;
  r.allocations[reinterpret_cast<uintptr_t>(p)] = Allocation{size, d, name};
  *dev_ptr = p;
  return cudaSuccess;
}

cudaError_t cudaIpcCloseMemHandle(void* dev_ptr) {
  auto& r = R();
  std::lock_guard<std::mutex> lock(r.mu);
  auto it = r.allocations.find(reinterpret_cast<uintptr_t>(dev_ptr));
  if (it == r.allocations.end() || it->second.device < 0) return Fail(cudaErrorInvalidValue);
  munmap(dev_ptr, it->second.size);
  r.opened.erase(it->second.name);
  r.allocations.erase(it);
  return cudaSuccess;
}

cudaError_t cudaIpcOpenEventHandle(cudaEvent_t* event, cudaIpcEventHandle_t handle) {
  UCM_EMU_FAULT("cudaIpcOpenEventHandle");
  const int d = Current();
  if (cudaError_t e = Usable(d)) return Fail(e);
  std::string bus, name;
  if (!ParseHandle(handle.reserved, "UCMEMU-E", &bus, &name)) return Fail(cudaErrorInvalidValue);
  size_t size = 0;
  void* p = MapShm(name, &size);
  if (!p) return Fail(cudaErrorInvalidResourceHandle);
  if (size < 16) {
    munmap(p, size);
    return Fail(cudaErrorInvalidResourceHandle);
  }
  {
    std::lock_guard<std::mutex> lock(R().mu);
    R().Touch(d);
  }
  auto* ev = new CUevent_st();
  ev->flags = cudaEventInterprocess | cudaEventDisableTiming;
  ev->device = d;
  ev->counters = static_cast<uint64_t*>(p);
  ev->name = name;
  *event = ev;
  return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int flags) {
  UCM_EMU_FAULT("cudaEventCreateWithFlags");
  const int d = Current();
  if (cudaError_t e = Usable(d)) return Fail(e);
  {
    std::lock_guard<std::mutex> lock(R().mu);
    R().Touch(d);
  }
  auto* ev = new CUevent_st();
  ev->flags = flags;
  ev->device = d;
  *event = ev;
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  UCM_EMU_FAULT("cudaEventRecord");
  if (!event || !stream || event->counters) return Fail(cudaErrorInvalidResourceHandle);
  event->stream = stream;
  return cudaSuccess;
}

cudaError_t cudaEventQuery(cudaEvent_t event) {
  UCM_EMU_FAULT("cudaEventQuery");
  if (!event) return Fail(cudaErrorInvalidResourceHandle);
  if (event->counters) {
    const uint64_t recorded = __atomic_load_n(&event->counters[0], __ATOMIC_ACQUIRE);
    return __atomic_load_n(&event->counters[1], __ATOMIC_ACQUIRE) >= recorded ? cudaSuccess : cudaErrorNotReady;
  }
  if (!event->stream) return cudaSuccess;
  return Fail(event->stream->Advance());
}

cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  UCM_EMU_FAULT("cudaEventSynchronize");
  if (!event) return Fail(cudaErrorInvalidResourceHandle);
  if (event->counters) {
    const uint64_t target = __atomic_load_n(&event->counters[0], __ATOMIC_ACQUIRE);
    WaitCounter(event->counters, target, (event->flags & cudaEventBlockingSync) != 0);
    return cudaSuccess;
  }
  if (!event->stream) return cudaSuccess;
  bool blocking = (event->flags & cudaEventBlockingSync) != 0;
  {
    std::lock_guard<std::mutex> lock(R().mu);
    blocking = blocking || (R().devices[event->stream->device].flags & cudaDeviceScheduleBlockingSync);
  }
  return Fail(event->stream->Drain(blocking));
}

cudaError_t cudaEventDestroy(cudaEvent_t event) {
  if (!event) return Fail(cudaErrorInvalidResourceHandle);
  if (event->counters) munmap(event->counters, 16);
  delete event;
  return cudaSuccess;
}

cudaError_t cudaHostAlloc(void** ptr, size_t size, unsigned int) {
  UCM_EMU_FAULT("cudaHostAlloc");
  const int d = Current();
  if (cudaError_t e = Usable(d)) return Fail(e);
  void* p = nullptr;
  if (size == 0 || posix_memalign(&p, 4096, size) != 0) return Fail(cudaErrorMemoryAllocation);
  auto& r = R();
  std::lock_guard<std::mutex> lock(r.mu);
  r.Touch(d);  // pinned memory belongs to a context: the current device's
  r.allocations[reinterpret_cast<uintptr_t>(p)] = Allocation{size, -1, ""};
  *ptr = p;
  return cudaSuccess;
}

cudaError_t cudaFreeHost(void* ptr) {
  auto& r = R();
  std::lock_guard<std::mutex> lock(r.mu);
  auto it = r.allocations.find(reinterpret_cast<uintptr_t>(ptr));
  if (it == r.allocations.end() || it->second.device >= 0 || it->second.registered) return Fail(cudaErrorInvalidValue);
  r.allocations.erase(it);
  std::free(ptr);
  return cudaSuccess;
}

// Page-locks memory the process allocated itself: from then on it counts as
// pinned (mapped) host memory, which the copy kernel may reach. A range that
// overlaps one already pinned is refused, as CUDA does.
cudaError_t cudaHostRegister(void* ptr, size_t size, unsigned int) {
  UCM_EMU_FAULT("cudaHostRegister");
  const int d = Current();
  if (cudaError_t e = Usable(d)) return Fail(e);
  if (!ptr || size == 0) return Fail(cudaErrorInvalidValue);
  auto& r = R();
  std::lock_guard<std::mutex> lock(r.mu);
  const auto a = reinterpret_cast<uintptr_t>(ptr);
  auto next = r.allocations.lower_bound(a);
  if (next != r.allocations.end() && next->first < a + size) return Fail(cudaErrorHostMemoryAlreadyRegistered);
  if (next != r.allocations.begin() && std::prev(next)->first + std::prev(next)->second.size > a)
    return Fail(cudaErrorHostMemoryAlreadyRegistered);
  r.Touch(d);
  r.allocations[a] = Allocation{size, -1, "", true};
  return cudaSuccess;
}

cudaError_t cudaHostUnregister(void* ptr) {
  auto& r = R();
  std::lock_guard<std::mutex> lock(r.mu);
  auto it = r.allocations.find(reinterpret_cast<uintptr_t>(ptr));
  if (it == r.allocations.end() || !it->second.registered) return Fail(cudaErrorHostMemoryNotRegistered);
  r.allocations.erase(it);
  return cudaSuccess;
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int) {
  UCM_EMU_FAULT("cudaStreamCreateWithFlags");
  const int d = Current();
  if (cudaError_t e = Usable(d)) return Fail(e);
  {
    std::lock_guard<std::mutex> lock(R().mu);
    R().Touch(d);
  }
  auto* s = new CUstream_st();
  s->device = d;
  *stream = s;
  return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  if (!stream) return Fail(cudaErrorInvalidResourceHandle);
  delete stream;
  return cudaSuccess;
}

cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int) {
  UCM_EMU_FAULT("cudaStreamWaitEvent");
  if (!stream || !event) return Fail(cudaErrorInvalidResourceHandle);
  if (!event->counters) return cudaSuccess;  // a local event: ordered by the stream already
  CUstream_st::Op op{CUstream_st::Op::kWait};
  op.counters = event->counters;
  op.target = __atomic_load_n(&event->counters[0], __ATOMIC_ACQUIRE);
  std::lock_guard<std::mutex> lock(stream->mu);
  stream->ops.push_back(op);
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  UCM_EMU_FAULT("cudaStreamSynchronize");
  if (!stream) return Fail(cudaErrorInvalidResourceHandle);
  bool blocking;
  {
    std::lock_guard<std::mutex> lock(R().mu);
    blocking = (R().devices[stream->device].flags & cudaDeviceScheduleBlockingSync) != 0;
  }
  return Fail(stream->Drain(blocking));
}

namespace {
cudaError_t Batch(void* const* dsts, const void* const* srcs, const size_t* sizes, size_t count, size_t num_attrs,
                  cudaStream_t stream) {
  UCM_EMU_FAULT("cudaMemcpyBatchAsync");
  if (R().driver < 12080) return Fail(cudaErrorCallRequiresNewerDriver);
  if (!stream) return Fail(cudaErrorInvalidResourceHandle);
  if (count == 0 || num_attrs == 0 || !dsts || !srcs || !sizes) return Fail(cudaErrorInvalidValue);
  std::lock_guard<std::mutex> lock(stream->mu);
  for (size_t i = 0; i < count; ++i) {
    CUstream_st::Op op{CUstream_st::Op::kCopy};
    op.dst = dsts[i];
    op.src = srcs[i];
    op.len = sizes[i];
    stream->ops.push_back(op);
  }
  return cudaSuccess;
}
}  // namespace

#if CUDART_VERSION >= 13000
cudaError_t cudaMemcpyBatchAsync(void* const* dsts, const void* const* srcs, const size_t* sizes, size_t count,
                                 cudaMemcpyAttributes*, size_t*, size_t num_attrs, cudaStream_t stream) {
  return Batch(dsts, srcs, sizes, count, num_attrs, stream);
}
#elif CUDART_VERSION >= 12080
cudaError_t cudaMemcpyBatchAsync(void** dsts, void** srcs, size_t* sizes, size_t count, cudaMemcpyAttributes*, size_t*,
                                 size_t num_attrs, size_t* fail_idx, cudaStream_t stream) {
  if (fail_idx) *fail_idx = ~size_t{0};
  return Batch(dsts, srcs, sizes, count, num_attrs, stream);
}
#endif

namespace ucm {

// The emulated kernel launch: queued on the stream, run by whoever waits for
// it, piece by piece (see CUstream_st::Drain).
cudaError_t LaunchCopyPieces(const CopyPiece* table, int n, cudaStream_t stream) {
  if (cudaError_t f = Fault("LaunchCopyPieces")) return Fail(f);
  if (n <= 0) return cudaSuccess;
  if (!stream) return Fail(cudaErrorInvalidResourceHandle);
  CUstream_st::Op op{CUstream_st::Op::kPieces};
  op.table = table;
  op.n = n;
  std::lock_guard<std::mutex> lock(stream->mu);
  stream->ops.push_back(op);
  return cudaSuccess;
}

}  // namespace ucm
