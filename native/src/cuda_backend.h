// The CUDA backend: KV cache in GPU memory, reached through the CUDA IPC
// handles the shim sends, copied through pinned host staging.
//
// This header has no CUDA types, so the rest of the core compiles without the
// toolkit. cuda_backend.cc implements it with the CUDA runtime API (plus the
// kernel in cuda_copy_kernel.cu), built when CMake finds nvcc; the same file
// is built a second way for tests, against the emulated runtime in
// native/cuda_emu/. Without the toolkit, cuda_stub.cc answers "not built". At
// run time without a driver or a GPU, CudaProbe() says why and every Open
// fails with that reason: the engine still serves host regions.
//
// Ordering. Dump: the shim records an interprocess event after the forward
// pass that wrote the blocks; a worker gathers only once that event has
// completed (polled from the host with a deadline, sleeping between polls, so
// a client's event that never completes costs neither a core nor a thread
// for good, and a cancel or the task's deadline ends the wait at once). Load: a worker reports a block done only after
// its scatter finished on the device, so the shim, which waits for the task, never lets vLLM read a block before its
// bytes are in.
//
// Waiting. Every wait on the device sleeps (events created with
// cudaEventBlockingSync): 32 transfer threads must not spin 32 cores that
// vLLM's scheduler and tokenizer need.
//
// Device identity. Each vLLM worker numbers GPUs through its own
// CUDA_VISIBLE_DEVICES; the engine (one per node) sees them all, numbered
// its own way. Regions and events name their GPU by PCI bus id, which is the
// same in every process; the ordinal a client sends is used only when it
// sends no bus id.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "region.h"

namespace ucm {

struct CudaStatus {
  bool built = false;         // compiled with the CUDA toolkit (or the emulated runtime)
  bool emulated = false;      // the test build: CUDA runtime emulated over host shared memory
  bool usable = false;        // driver present and at least one device
  bool batch_copies = false;  // this build's runtime has cudaMemcpyBatchAsync (CUDA >= 12.8)
  int devices = 0;
  int runtime_version = 0;
  int driver_version = 0;
  std::string why;  // when !usable
};

// Probed once per process. Creates no CUDA context.
const CudaStatus& CudaProbe();

// The engine's ordinal for a client's GPU: by PCI bus id when one is given
// ("0000:06:00.0"), else `client_device` as is. False with a message when
// no such GPU is visible to the engine.
bool ResolveDevice(int client_device, const std::string& pci_bus_id, int* device, std::string* error);

class CudaEvent;

// Waits, sleeping between polls, until the client's event `ev` has completed
// (true), `abandon()` says to stop waiting (false, `*error` empty: the task was
// cancelled or its deadline passed), or `timeout_ms` passed (false, message).
bool AwaitCudaEvent(const CudaEvent& ev, uint32_t timeout_ms, const std::function<bool()>& abandon, std::string* error);

// Things the operator should hear about once (a copy method that the
// driver lacks, say). Each notice is returned by one call only.
std::vector<std::string> TakeCudaNotices();

// Device memory of another process: `handle` is its cudaIpcMemHandle_t (64
// bytes) for the allocation, `offset` where the tensor's storage starts in
// it, `size` the storage's bytes. One allocation exported several times is
// opened once (CUDA allows one mapping per handle per process) and closed
// with its last region. The GPU is found as ResolveDevice says.
class CudaRegion final : public Region {
 public:
  static std::shared_ptr<CudaRegion> Open(int device, const std::string& pci_bus_id, const std::string& handle,
                                          uint64_t offset, uint64_t size, std::string* error);
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
  static std::shared_ptr<CudaEvent> Open(int device, const std::string& pci_bus_id, const std::string& handle,
                                         std::string* error);
  ~CudaEvent();  // NOLINT(performance-trivially-destructible): trivial only in the build without CUDA
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

// Host memory of the engine's own that a copy reads or writes instead of the
// staging buffer (a Cache stage buffer page-locked by PinHostMemory);
// DeviceCopy::host_off is then an offset into it.
struct HostSpan {
  uint8_t* data = nullptr;
  size_t bytes = 0;
};

// Page-locks `bytes` at `p` (cudaHostRegister, portable and mapped: every
// device's copies and the copy kernel reach it, the host pointer being valid
// on the device with unified addressing) so that blocks move between it and
// the GPU in one DMA. Creates the current device's context if none exists.
// False with CUDA's error (also said once as a notice: blocks then go
// through the staging buffers as before).
bool PinHostMemory(void* p, size_t bytes, std::string* error);
// Undoes PinHostMemory (before the memory is freed).
void UnpinHostMemory(void* p);

// A transfer thread's device side: one pinned staging buffer (allocated
// once, page aligned, mapped for the GPU), and per device it used: a
// non-blocking stream and a blocking-sync event marking the end of a copy;
// a pinned copy table. Not thread safe: one per worker.
class CudaStager {
 public:
  // Allocates the staging buffer with `device` current, so the only CUDA
  // context this creates is that of a GPU the worker is about to use.
  static std::unique_ptr<CudaStager> Create(int device, size_t bytes, CudaCopy method, std::string* error);
  ~CudaStager();
  CudaStager(const CudaStager&) = delete;
  CudaStager& operator=(const CudaStager&) = delete;
  uint8_t* data() const { return data_; }
  size_t capacity() const { return capacity_; }
  // A copy that never finished may still write the staging buffer: a broken
  // stager must not be used again (its memory is abandoned, not freed).
  bool broken() const { return broken_; }

  // Device -> staging, all copies in one batched operation. The caller has
  // waited for the client's event (AwaitCudaEvent). Returns when the bytes are
  // in staging, or fails when the copy has not finished within `timeout_ms`
  // (the stager is then broken: its copy may still land).
  // With `host`, the bytes land there instead (pinned memory; a broken
  // stager's copy may still write it: the caller must not reuse it either).
  bool Gather(int device, const std::vector<DeviceCopy>& copies, uint32_t timeout_ms, std::string* error,
              HostSpan host = {});
  // Staging (or `host`) -> device; returns when the bytes are on the device (same bound).
  bool Scatter(int device, const std::vector<DeviceCopy>& copies, uint32_t timeout_ms, std::string* error,
               HostSpan host = {});

 private:
  CudaStager() = default;
  bool Run(int device, const std::vector<DeviceCopy>& copies, bool to_host, uint32_t timeout_ms, std::string* error,
           HostSpan host);
  bool Streams(int device, std::string* error);
  bool EnqueueBatch(int device, const std::vector<DeviceCopy>& copies, bool to_host, uint8_t* host, void* stream,
                    std::string* error);
  bool EnqueueKernel(const std::vector<DeviceCopy>& copies, bool to_host, uint8_t* host, void* stream,
                     std::string* error);

  CudaCopy method_ = CudaCopy::kKernel;
  bool broken_ = false;
  uint8_t* alloc_ = nullptr;  // what cudaHostAlloc returned
  uint8_t* data_ = nullptr;   // 4096-aligned inside alloc_
  size_t capacity_ = 0;
  void* table_ = nullptr;  // pinned copy descriptors (kernel method)
  size_t table_entries_ = 0;
  std::vector<void*> streams_;  // by device ordinal
  std::vector<void*> done_;     // by device ordinal: end-of-copy events (blocking sync)
  std::vector<void*> srcs_, dsts_;
  std::vector<size_t> sizes_;
};

}  // namespace ucm
