#include "region.h"

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace ucm {

namespace {
bool IsShmName(const std::string& s) {
  // POSIX shm names are "/name" with no further slash.
  return s.size() > 1 && s[0] == '/' && s.find('/', 1) == std::string::npos &&
         s.rfind("/dev/", 0) != 0;
}
}  // namespace

std::shared_ptr<HostRegion> HostRegion::Open(const std::string& source, uint64_t size,
                                             std::string* error) {
  if (size == 0) {
    *error = "region size must be positive";
    return nullptr;
  }
  if (source.empty() || source[0] != '/' || source.find('\0') != std::string::npos) {
    *error = "region source must be a shared memory name or absolute path, got '" + source + "'";
    return nullptr;
  }
  int fd = IsShmName(source) ? shm_open(source.c_str(), O_RDWR, 0)
                             : open(source.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    *error = "cannot open region '" + source + "': " + std::strerror(errno);
    return nullptr;
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    *error = "cannot stat region '" + source + "': " + std::strerror(errno);
    close(fd);
    return nullptr;
  }
  if (!S_ISREG(st.st_mode)) {
    *error = "region '" + source + "' is not a regular shared memory object or file";
    close(fd);
    return nullptr;
  }
  if (static_cast<uint64_t>(st.st_size) < size) {
    *error = "region '" + source + "' holds " + std::to_string(st.st_size) +
             " bytes, less than the " + std::to_string(size) + " requested";
    close(fd);
    return nullptr;
  }
  void* base = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  int map_errno = errno;
  close(fd);  // the mapping keeps the object alive
  if (base == MAP_FAILED) {
    *error = "cannot map region '" + source + "': " + std::strerror(map_errno);
    return nullptr;
  }
  std::shared_ptr<HostRegion> region(new HostRegion(source));
  region->host_base_ = static_cast<uint8_t*>(base);
  region->size_ = size;
  return region;
}

HostRegion::~HostRegion() {
  if (host_base_ != nullptr) munmap(host_base_, size_);
}

}  // namespace ucm
