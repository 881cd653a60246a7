// The CUDA backend: KV cache in GPU memory, reached through the CUDA IPC
// handles the shim sends, copied through pinned host staging.
//
// This header has no CUDA types, so the rest of the core compiles without the
// toolkit. With the toolkit, cuda_backend.cu implements it (built when CMake
// finds nvcc); without it, cuda_stub.cc answers "not built". At run time
// without a driver or a GPU, CudaProbe() says why and every Open fails with
// that reason: the engine still serves host regions.
//
// Ordering. Dump: the shim records an interprocess event after the forward
// pass that wrote the blocks; each worker makes its stream wait on that event
// before it gathers. Load: a worker reports a block done only after its
// scatter finished on the device (stream synchronized), so the shim, which
// waits for the task, never lets vLLM read a block before its bytes are in.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "region.h"

namespace ucm {

struct CudaStatus {
  bool built = false;    // compiled with the CUDA toolkit
  bool usable = false;   // driver present and at least one device
  int devices = 0;
  int runtime_version = 0;
  int driver_version = 0;
  std::string why;       // when !usable
};

// Probed once per process.
const CudaStatus& CudaProbe();

// Device memory of another process: `handle` is its cudaIpcMemHandle_t (64
// bytes) for the allocation, `offset` where the tensor's storage starts in
// it, `size` the storage's bytes. One allocation exported several times is
// opened once (CUDA allows one mapping per handle per process) and closed
// with its last region.
class CudaRegion final : public Region {
 public:
  static std::shared_ptr<CudaRegion> Open(int device, const std::string& handle, uint64_t offset, uint64_t size,
                                          std::string* error);
  ~CudaRegion() override;
  Medium medium() const override { return Medium::kCuda; }
  const char* describe() const override { return "cuda ipc"; }

 private:
  CudaRegion() = default;
  std::string key_;  // device + handle: the shared mapping this region holds
};

// An interprocess CUDA event another process records (cudaIpcEventHandle_t,
// 64 bytes).
class CudaEvent {
 public:
  static std::shared_ptr<CudaEvent> Open(int device, const std::string& handle, std::string* error);
  ~CudaEvent();
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;
  int device() const { return device_; }
  void* raw() const { return event_; }

 private:
  CudaEvent() = default;
  int device_ = -1;
  void* event_ = nullptr;
};

enum class CudaCopy { kKernel = 0, kBatch = 1 };

// One contiguous piece of a block: `len` bytes at device pointer `dev`, at
// `host_off` inside the staging buffer.
struct DeviceCopy {
  uint8_t* dev;
  uint64_t host_off;
  uint64_t len;
};

// A transfer thread's device side: one pinned staging buffer (allocated
// once, page aligned, mapped for the GPU), one non-blocking stream per
// device, a pinned copy table. Not thread safe: one per worker.
class CudaStager {
 public:
  static std::unique_ptr<CudaStager> Create(size_t bytes, CudaCopy method, std::string* error);
  ~CudaStager();
  CudaStager(const CudaStager&) = delete;
  CudaStager& operator=(const CudaStager&) = delete;
  uint8_t* data() const { return data_; }
  size_t capacity() const { return capacity_; }

  // Device -> staging, all copies in one batched operation, after `after`
  // (may be null) completes. Returns when the bytes are in staging.
  bool Gather(int device, const std::vector<DeviceCopy>& copies, const CudaEvent* after, std::string* error);
  // Staging -> device; returns when the bytes are on the device.
  bool Scatter(int device, const std::vector<DeviceCopy>& copies, std::string* error);

 private:
  CudaStager() = default;
  bool Run(int device, const std::vector<DeviceCopy>& copies, bool to_host, const CudaEvent* after, std::string* error);
  void* Stream(int device, std::string* error);

  CudaCopy method_ = CudaCopy::kKernel;
  uint8_t* alloc_ = nullptr;   // what cudaHostAlloc returned
  uint8_t* data_ = nullptr;    // 4096-aligned inside alloc_
  size_t capacity_ = 0;
  void* table_ = nullptr;      // pinned copy descriptors (kernel method)
  size_t table_entries_ = 0;
  std::vector<void*> streams_; // by device ordinal
  std::vector<void*> srcs_, dsts_;
  std::vector<size_t> sizes_;
};

}  // namespace ucm
