// Memory regions the engine copies KV blocks out of and into. A region is
// memory another process created and exported: POSIX shared memory (or any
// mappable file, e.g. /proc/<pid>/fd/<n> of a memfd) for host memory, a CUDA
// IPC handle for device memory (see cuda_backend.h). The transfer code only
// sees this interface.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace ucm {

enum class Medium { kHost = 0, kCuda = 1 };

class Region {
 public:
  virtual ~Region() = default;
  Region(const Region&) = delete;
  Region& operator=(const Region&) = delete;

  virtual Medium medium() const = 0;
  virtual const char* describe() const = 0;
  uint64_t size() const { return size_; }
  // Host-addressable base; null for device regions.
  uint8_t* host_base() const { return host_base_; }
  // Device regions: the CUDA device ordinal and the base as a device pointer.
  int device() const { return device_; }
  uint8_t* device_base() const { return device_base_; }

  // True when [offset, offset + length) lies inside the region without overflow.
  bool Contains(uint64_t offset, uint64_t length) const { return offset <= size_ && length <= size_ - offset; }

 protected:
  Region() = default;
  uint8_t* host_base_ = nullptr;
  uint8_t* device_base_ = nullptr;
  int device_ = -1;
  uint64_t size_ = 0;
};

// Host memory shared by another process, and nothing else: a client may name
// only shared memory (tmpfs or hugetlbfs) owned by the engine's own user,
// either as a POSIX shared memory name ("/torch_123_4": /dev/shm/torch_123_4),
// a path under /dev/shm, or /proc/<pid>/fd/<n> of its own process (`pid`: the
// process the client's session belongs to; 0 refuses such paths). Symbolic
// links are not followed (except /proc's fd links, which name an open file),
// opening never blocks (a FIFO is refused, not waited on), and the whole
// object must be at least `size` bytes; only `size` bytes are mapped,
// read-write, MAP_SHARED. So a client can never make the engine read or
// write a file it could not write itself, such as /etc/shadow for a root
// engine.
class HostRegion final : public Region {
 public:
  static std::shared_ptr<HostRegion> Open(const std::string& source, uint64_t size, int pid, std::string* error);
  ~HostRegion() override;
  Medium medium() const override { return Medium::kHost; }
  const char* describe() const override { return source_.c_str(); }

 private:
  explicit HostRegion(std::string source) : source_(std::move(source)) {}
  std::string source_;
};

}  // namespace ucm
