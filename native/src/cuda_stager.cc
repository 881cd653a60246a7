// The CUDA backend's copy paths (see cuda_backend.h, CudaStager): pinned
// staging, one stream and one completion event per device and thread, and
// the two ways shards move between device memory and staging (batched copies
// on the copy engines, or the gather/scatter kernel of cuda_copy_kernel.cu).
// A stager serves one block at a time (lent by StagerPool); nothing here is shared.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>

#include "block_file.h"
#include "cuda_backend.h"
#include "cuda_copy.h"
#include "cuda_internal.h"

namespace ucm {

namespace {
// Set once batched copies failed to start in this process (EnqueueBatch):
// every stager then uses the copy kernel.
std::atomic<bool> g_batch_failed{false};

// Waits for `done` at most `timeout_ms`: cudaErrorNotReady when it has not
// completed by then. Polled (a copy of a block takes well under a
// millisecond to tens of milliseconds, 50 us steps cost little), since
// cudaEventSynchronize cannot be bounded and a hung copy must not hold a
// transfer stream and a share of staging for good.
cudaError_t WaitFor(cudaEvent_t done, uint32_t timeout_ms) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    const cudaError_t e = cudaEventQuery(done);
    if (e != cudaErrorNotReady) return e;
    if (std::chrono::steady_clock::now() >= until) return cudaErrorNotReady;
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}
}  // namespace

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
    *error = CudaErr("cudaHostAlloc(" + std::to_string(bytes) + " bytes of pinned staging)", e);
    return nullptr;
  }
  s->alloc_ = static_cast<uint8_t*>(p);
  const size_t skew = reinterpret_cast<uintptr_t>(p) % kBlockAlign;
  s->data_ = s->alloc_ + (skew == 0 ? 0 : kBlockAlign - skew);
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
      *error = CudaErr("cudaStreamCreateWithFlags", e);
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
      *error = CudaErr("cudaEventCreateWithFlags", e);
      return false;
    }
    done_[device] = ev;
  }
  return true;
}

bool CudaStager::Gather(int device, const std::vector<DeviceCopy>& copies, uint32_t timeout_ms, std::string* error,
                        HostSpan host) {
  return Run(device, copies, true, timeout_ms, error, host);
}

bool CudaStager::Scatter(int device, const std::vector<DeviceCopy>& copies, uint32_t timeout_ms, std::string* error,
                         HostSpan host) {
  return Run(device, copies, false, timeout_ms, error, host);
}

bool PinHostMemory(void* p, size_t bytes, std::string* error) {
  cudaError_t e = cudaHostRegister(p, bytes, cudaHostRegisterPortable | cudaHostRegisterMapped);
  if (e == cudaSuccess) return true;
  cudaGetLastError();
  *error = CudaErr("cudaHostRegister(" + std::to_string(bytes) + " bytes of the Cache stage)", e);
  static bool notice_given = false;
  AddCudaNotice(&notice_given, *error + ": GPU blocks go through pinned staging, not straight from the Cache stage");
  return false;
}

void UnpinHostMemory(void* p) {
  if (cudaHostUnregister(p) != cudaSuccess) cudaGetLastError();
}

bool CudaStager::EnqueueBatch(int device, const std::vector<DeviceCopy>& copies, bool to_host, uint8_t* base,
                              void* stream, std::string* error) {
#if UCM_BATCH_COPY
  srcs_.clear();
  dsts_.clear();
  sizes_.clear();
  for (const DeviceCopy& c : copies) {
    void* host = base + c.host_off;
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
  // Batched copies that fail to start, for a driver that lacks them or for
  // any other reason, would fail every GPU block from now on: the copy
  // kernel takes over, for every stager of the process, said once. A block
  // the kernel cannot copy either fails with the kernel's error.
  method_ = CudaCopy::kKernel;
  g_batch_failed.store(true);
  static bool notice_given = false;
  const bool missing = e == cudaErrorNotSupported || e == cudaErrorCallRequiresNewerDriver;
  AddCudaNotice(&notice_given,
                std::string("cudaMemcpyBatchAsync ") + (missing ? "is not available with this driver" : "failed") +
                    " (CUDA " + CudaVersionText(CudaProbe().driver_version) + "; " +
                    CudaErr("cudaMemcpyBatchAsync", e) + "): GPU blocks move with the copy kernel instead");
  return EnqueueKernel(copies, to_host, base, stream, error);
#else
  (void)device;
  return EnqueueKernel(copies, to_host, base, stream, error);
#endif
}

bool CudaStager::EnqueueKernel(const std::vector<DeviceCopy>& copies, bool to_host, uint8_t* base, void* stream,
                               std::string* error) {
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
      *error = CudaErr("cudaHostAlloc(copy table)", e);
      return false;
    }
    table_entries_ = pieces;
  }
  CopyPiece* t = static_cast<CopyPiece*>(table_);
  size_t n = 0;
  for (const DeviceCopy& c : copies) {
    for (uint64_t off = 0; off < c.len; off += kCopyPiece) {
      uint8_t* dev = c.dev + off;
      uint8_t* host = base + c.host_off + off;
      const uint64_t len = std::min<uint64_t>(kCopyPiece, c.len - off);
      t[n++] = to_host ? CopyPiece{dev, host, len} : CopyPiece{host, dev, len};
    }
  }
  cudaError_t e = LaunchCopyPieces(t, static_cast<int>(n), static_cast<cudaStream_t>(stream));
  if (e != cudaSuccess) {
    cudaGetLastError();
    *error = CudaErr("gather/scatter kernel launch", e);
    return false;
  }
  return true;
}

bool CudaStager::Run(int device, const std::vector<DeviceCopy>& copies, bool to_host, uint32_t timeout_ms,
                     std::string* error, HostSpan host) {
  if (broken_) {
    *error = "this transfer thread's staging was abandoned after a copy that did not finish";
    return false;
  }
  if (!CheckUsable(device, error) || !UseDevice(device, error)) return false;
  uint8_t* base = host.data ? host.data : data_;
  const size_t cap = host.data ? host.bytes : capacity_;
  for (const DeviceCopy& c : copies) {
    if (c.host_off > cap || c.len > cap - c.host_off) {
      *error = host.data ? "copy outside the Cache stage buffer" : "copy outside the pinned staging buffer";
      return false;
    }
  }
  if (!Streams(device, error)) return false;
  void* stream = streams_[device];
  if (method_ == CudaCopy::kBatch && g_batch_failed.load()) method_ = CudaCopy::kKernel;
  const bool queued = method_ == CudaCopy::kBatch ? EnqueueBatch(device, copies, to_host, base, stream, error)
                                                  : EnqueueKernel(copies, to_host, base, stream, error);
  if (!queued) return false;
  auto done = static_cast<cudaEvent_t>(done_[device]);
  cudaError_t e = cudaEventRecord(done, static_cast<cudaStream_t>(stream));
  if (e == cudaSuccess) e = WaitFor(done, timeout_ms);
  if (e != cudaSuccess) {
    cudaGetLastError();
    // The copy's state is unknown: never reuse this staging for another block.
    broken_ = true;
    *error = e == cudaErrorNotReady
                 ? std::string(to_host ? "the gather" : "the scatter") + " did not finish within cudaEventTimeoutMs (" +
                       std::to_string(timeout_ms) + " ms): a hung copy"
                 : CudaErr(to_host ? "waiting for the gather" : "waiting for the scatter", e);
    return false;
  }
  return true;
}

}  // namespace ucm
