// The CUDA backend's stand-in for builds without the CUDA toolkit: every
// device request fails with the reason, host regions are unaffected.
#include "cuda_backend.h"

namespace ucm {

namespace {
constexpr const char* kNotBuilt =
    "this engine was built without the CUDA toolkit (nvcc not found when native/ was compiled)";
}

const CudaStatus& CudaProbe() {
  static const CudaStatus status = [] {
    CudaStatus s;
    s.why = kNotBuilt;
    return s;
  }();
  return status;
}

bool ResolveDevice(int, const std::string&, int*, std::string* error) {
  *error = kNotBuilt;
  return false;
}

std::vector<std::string> TakeCudaNotices() { return {}; }

bool AwaitCudaEvent(const CudaEvent&, uint32_t, const std::function<bool()>&, std::string* error) {
  *error = kNotBuilt;
  return false;
}

std::shared_ptr<CudaRegion> CudaRegion::Open(int, const std::string&, const std::string&, uint64_t, uint64_t,
                                             std::string* error) {
  *error = kNotBuilt;
  return nullptr;
}

CudaRegion::~CudaRegion() = default;

std::shared_ptr<CudaEvent> CudaEvent::Open(int, const std::string&, const std::string&, std::string* error) {
  *error = kNotBuilt;
  return nullptr;
}

CudaEvent::~CudaEvent() = default;

std::unique_ptr<CudaStager> CudaStager::Create(int, size_t, CudaCopy, std::string* error) {
  *error = kNotBuilt;
  return nullptr;
}

CudaStager::~CudaStager() = default;

bool CudaStager::Gather(int, const std::vector<DeviceCopy>&, uint32_t, std::string* error, HostSpan) {
  *error = kNotBuilt;
  return false;
}

bool CudaStager::Scatter(int, const std::vector<DeviceCopy>&, uint32_t, std::string* error, HostSpan) {
  *error = kNotBuilt;
  return false;
}

bool PinHostMemory(void*, size_t, std::string* error) {
  *error = kNotBuilt;
  return false;
}

void UnpinHostMemory(void*) {}

}  // namespace ucm
