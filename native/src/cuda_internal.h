// Pieces of the CUDA backend shared by its two files: cuda_backend.cc
// (probe, devices, IPC regions and events) and cuda_stager.cc (the copy
// paths). Runtime API only; built against the real or the emulated runtime.
#pragma once
#include <cuda_runtime.h>

#include <string>

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

// "what: cudaErrorX (description)".
std::string CudaErr(const std::string& what, cudaError_t e);
// A CUDA version number as "major.minor".
std::string CudaVersionText(int v);
// Sets the calling thread's device (this creates its context on first use).
bool UseDevice(int device, std::string* error);
// The probe found a GPU and `device` is one of them.
bool CheckUsable(int device, std::string* error);
// Queues a message for TakeCudaNotices(); `once` guards a message given at most once per process.
void AddCudaNotice(bool* once, const std::string& message);

}  // namespace ucm
