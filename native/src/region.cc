#include "region.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>
#include <cerrno>
#include <cstdio>
#include <cstring>

namespace ucm {

namespace {
constexpr long kTmpfsMagic = 0x01021994;
constexpr long kHugetlbfsMagic = 0x958458f6;

bool IsShmName(const std::string& s) {
  // POSIX shm names are "/name" with no further slash.
  return s.size() > 1 && s[0] == '/' && s.find('/', 1) == std::string::npos;
}

// A decimal number of at most 9 digits at `p` (no sign, no blanks), moving `p` past it; -1 if none.
long Digits(const char*& p) {
  long v = 0;
  int n = 0;
  for (; *p >= '0' && *p <= '9' && n < 9; ++p, ++n) v = v * 10 + (*p - '0');
  return n == 0 || (*p >= '0' && *p <= '9') ? -1 : v;
}

// "/proc/<pid>/fd/<n>" -> pid, or -1.
int ProcFdPid(const std::string& s) {
  constexpr char kPrefix[] = "/proc/";
  if (s.compare(0, sizeof kPrefix - 1, kPrefix) != 0) return -1;
  const char* p = s.c_str() + sizeof kPrefix - 1;
  const long pid = Digits(p);
  if (pid <= 0 || std::strncmp(p, "/fd/", 4) != 0) return -1;
  p += 4;
  if (Digits(p) < 0 || *p != '\0') return -1;
  return static_cast<int>(pid);
}
}  // namespace

std::shared_ptr<HostRegion> HostRegion::Open(const std::string& source, uint64_t size, int pid, std::string* error) {
  if (size == 0) {
    *error = "region size must be positive";
    return nullptr;
  }
  if (source.empty() || source[0] != '/' || source.find('\0') != std::string::npos) {
    *error = "region source must be a shared memory name or absolute path, got '" + source + "'";
    return nullptr;
  }
  const int proc_pid = ProcFdPid(source);
  const bool under_shm = source.rfind("/dev/shm/", 0) == 0 && source.find("/..") == std::string::npos &&
                         source.find("/./") == std::string::npos;
  int fd = -1;
  if (IsShmName(source)) {
    fd = shm_open(source.c_str(), O_RDWR | O_NONBLOCK, 0);  // glibc adds O_NOFOLLOW
  } else if (under_shm) {
    fd = open(source.c_str(), O_RDWR | O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC);
  } else if (proc_pid > 0) {
    if (proc_pid != pid) {
      *error = "region '" + source + "' names another process's file descriptor (this client's pid is " +
               std::to_string(pid) + ")";
      return nullptr;
    }
    fd = open(source.c_str(), O_RDWR | O_NONBLOCK | O_CLOEXEC);  // /proc's fd link names the open file itself
  } else {
    *error = "region '" + source +
             "' is not shared memory: give a POSIX shared memory name (\"/name\"), a path "
             "under /dev/shm, or /proc/<pid>/fd/<n> of the client's own process";
    return nullptr;
  }
  if (fd < 0) {
    *error = "cannot open region '" + source + "': " + std::strerror(errno);
    return nullptr;
  }
  auto refuse = [&](const std::string& why) -> std::shared_ptr<HostRegion> {
    *error = "region '" + source + "' " + why;
    close(fd);
    return nullptr;
  };
  struct stat st;
  struct statfs sfs;
  if (fstat(fd, &st) != 0 || fstatfs(fd, &sfs) != 0)
    return refuse(std::string("cannot be examined: ") + std::strerror(errno));
  if (!S_ISREG(st.st_mode)) return refuse("is not a regular shared memory object or file");
  if (static_cast<long>(sfs.f_type) != kTmpfsMagic && static_cast<long>(sfs.f_type) != kHugetlbfsMagic)
    return refuse("is not in shared memory (tmpfs or hugetlbfs): the engine maps only memory, never other files");
  if (st.st_uid != geteuid())
    return refuse("belongs to uid " + std::to_string(st.st_uid) + ", not to the engine's user (" +
                  std::to_string(geteuid()) + ")");
  if (static_cast<uint64_t>(st.st_size) < size) {
    return refuse("holds " + std::to_string(st.st_size) + " bytes, less than the " + std::to_string(size) +
                  " requested");
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
