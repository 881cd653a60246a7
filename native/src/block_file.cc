#include "block_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "file_modes.h"

#include "crc32c.h"
#include "io_gate.h"

namespace ucm {
namespace {

// Opens `name` in `dir` with O_DIRECT when asked and the filesystem allows
// it. tmpfs, overlayfs and some NFS setups answer EINVAL; then plain buffered
// I/O is used. Never follows a link at `name`.
int OpenMaybeDirect(int dir, const std::string& name, int flags, mode_t mode, bool odirect) {
  flags |= O_NOFOLLOW | O_CLOEXEC;
  if (odirect) {
    int fd = openat(dir, name.c_str(), flags | O_DIRECT, mode);
    if (fd >= 0 || errno != EINVAL) return fd;
  }
  return openat(dir, name.c_str(), flags, mode);
}

bool ClearDirect(int fd) {
  int fl = fcntl(fd, F_GETFL);
  return fl >= 0 && fcntl(fd, F_SETFL, fl & ~O_DIRECT) == 0;
}

// pwrite/pread loops: a short transfer is continued, an error returns -errno.
// EINVAL on an O_DIRECT descriptor (alignment refused late, as some network
// filesystems do) drops O_DIRECT once and retries. A write that makes no
// progress is EIO; a read that hits the end of the file stops there and the
// caller compares the count.
ssize_t TransferAll(int fd, uint8_t* buf, size_t len, bool write) {
  size_t done = 0;
  bool retried = false;
  while (done < len) {
    const off_t at = static_cast<off_t>(done);
    ssize_t n = write ? pwrite(fd, buf + done, len - done, at) : pread(fd, buf + done, len - done, at);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EINVAL && !retried && ClearDirect(fd)) {
        retried = true;
        continue;
      }
      return -errno;
    }
    if (n == 0) {
      if (write) return -EIO;
      break;
    }
    done += static_cast<size_t>(n);
  }
  return static_cast<ssize_t>(done);
}

// pwrite only reads `buf`; the cast lets one loop serve both directions.
ssize_t WriteAll(int fd, const uint8_t* buf, size_t len) {
  return TransferAll(fd, const_cast<uint8_t*>(buf), len, true);
}

ssize_t ReadAll(int fd, uint8_t* buf, size_t len) { return TransferAll(fd, buf, len, false); }

IoResult Io(int err, const char* what) { return IoResult{BlockStatus::kIoError, err, what}; }

// The file is gone: deleted (ENOENT), or, over NFS, deleted or replaced by
// another client since this one looked the name up or opened it (ESTALE:
// the server no longer knows the file handle). Either way a miss, not an
// error: another node evicted the block, or committed a fresh copy of it.
bool Gone(int err) { return err == ENOENT || err == ESTALE; }
IoResult Corrupt(const char* what) { return IoResult{BlockStatus::kCorrupt, 0, what}; }

// Why the directory of a block file could not be opened (an open call too,
// so named as one). A load from a directory that is gone finds no block (a
// miss); a dump there fails.
IoResult DirFailed(int err, bool reading) {
  if (reading && Gone(err)) return IoResult{BlockStatus::kNotFound, err, "open"};
  if (NotRealDir(err)) return Io(err, "open: a directory in the store is a symbolic link or not a directory");
  if (err == EXDEV) return Io(err, "open: a path outside the storage directories");
  return Io(err, "open");
}

}  // namespace

IoResult WriteBlockFile(const std::string& path, uint8_t* staging, uint64_t payload_length, uint64_t layout_digest,
                        uint32_t shard_count, const IoOptions& opts, IoGate* gate) {
  const size_t file_size = FileSizeFor(payload_length);
  std::memset(staging, 0, kHeaderSize);
  std::memset(staging + kHeaderSize + payload_length, 0, file_size - kHeaderSize - payload_length);
  BlockHeader h;
  std::memset(&h, 0, sizeof h);
  std::memcpy(h.magic, kBlockMagic, sizeof h.magic);
  h.version = kFormatVersion;
  h.header_size = kHeaderSize;
  h.payload_length = payload_length;
  h.layout_digest = layout_digest;
  h.checksum_kind = 1;
  h.payload_crc = Crc32c(0, staging + kHeaderSize, payload_length);
  h.shard_count = shard_count;
  h.header_crc = Crc32c(0, &h, offsetof(BlockHeader, header_crc));
  std::memcpy(staging, &h, sizeof h);

  UniqueFd dir;
  std::string name;
  if (int rc = OpenParent(opts.roots, path, &dir, &name)) return DirFailed(rc, false);
  int fd = OpenMaybeDirect(dir.get(), name, O_WRONLY | O_CREAT | O_EXCL, Modes().file, opts.odirect);
  if (fd < 0) return Io(errno, "open");
  if (Modes().file != 0600) fchmod(fd, Modes().file);  // group bits the umask took away
  // No preallocation (fallocate): the file is written whole in one write, so
  // the filesystem allocates its extent in one go anyway, and a full disk
  // answers ENOSPC to that write. On ext4 a preallocated extent is "unwritten"
  // and each O_DIRECT write into it costs an extent conversion in the journal:
  // measured on a virtio disk at 8 threads (bench/store_bench.py), 4 MiB
  // dumps went from 67-84 % of fio to 83-104 % without it, and later loads of
  // those files from 75-100 % to 91-127 %. Over NFS it was a round trip per
  // block (v4.2 ALLOCATE) or, where glibc emulates it, a second write.
  // The pass covers the write, the flush and the close (where a buffered
  // NFS client sends the data): everything after the file exists.
  IoGate::Pass pass(gate, false);
  ssize_t n = WriteAll(fd, staging, file_size);
  if (n < 0) {
    close(fd);
    unlinkat(dir.get(), name.c_str(), 0);
    return Io(static_cast<int>(-n), "write");
  }
  if (opts.fsync && fdatasync(fd) != 0) {
    int e = errno;
    close(fd);
    unlinkat(dir.get(), name.c_str(), 0);
    return Io(e, "fdatasync");
  }
  if (close(fd) != 0) {
    int e = errno;
    unlinkat(dir.get(), name.c_str(), 0);
    return Io(e, "close");
  }
  return IoResult{};
}

// Checks the header's own consistency: damage here means the file is bad.
const char* HeaderDamage(const BlockHeader& h) {
  if (std::memcmp(h.magic, kBlockMagic, sizeof h.magic) != 0) return "magic";
  if (h.header_crc != Crc32c(0, &h, offsetof(BlockHeader, header_crc))) return "header checksum";
  if (h.version != kFormatVersion) return "format version";
  if (h.header_size != kHeaderSize) return "header size";
  if (h.checksum_kind != 1) return "checksum kind";
  return nullptr;
}

IoResult ReadBlockFile(const std::string& path, uint8_t* staging, uint64_t expected_payload, uint64_t layout_digest,
                       uint32_t shard_count, const IoOptions& opts, IoGate* gate) {
  const size_t want = FileSizeFor(expected_payload);
  UniqueFd dir;
  std::string name;
  if (int rc = OpenParent(opts.roots, path, &dir, &name)) return DirFailed(rc, true);
  // O_NONBLOCK: a FIFO planted at the name would block a plain open until a
  // writer came, holding this transfer thread for good.
  int fd = OpenMaybeDirect(dir.get(), name, O_RDONLY | O_NONBLOCK, 0, opts.odirect);
  if (fd < 0) {
    if (Gone(errno)) return IoResult{BlockStatus::kNotFound, errno, "open"};
    // A link at the name of a block is nothing we wrote: a miss.
    if (errno == ELOOP) return IoResult{BlockStatus::kNotFound, errno, "open: a symbolic link"};
    return Io(errno, "open");
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int e = errno;
    close(fd);
    if (Gone(e)) return IoResult{BlockStatus::kNotFound, e, "fstat"};
    return Io(e, "fstat");
  }
  if (!S_ISREG(st.st_mode)) {
    close(fd);
    return IoResult{BlockStatus::kNotFound, 0, "not a regular file"};
  }
  const uint64_t have = static_cast<uint64_t>(st.st_size);
  // Read the whole file when its size is the one expected, else only the
  // header, to tell a damaged file from a request that does not match it.
  const size_t len = have == want ? want : (have >= kHeaderSize ? kHeaderSize : 0);
  IoGate::Pass pass(gate, true);
  ssize_t n = len ? ReadAll(fd, staging, len) : 0;
  pass.Leave();  // the checks below are CPU work: the next read may start
  UniqueFd file(fd);
  if (n < 0 && Gone(static_cast<int>(-n))) return IoResult{BlockStatus::kNotFound, static_cast<int>(-n), "read"};
  if (n < 0) return Io(static_cast<int>(-n), "read");
  if (static_cast<size_t>(n) != len || len == 0) return Corrupt(len == 0 ? "file size" : "short read");

  BlockHeader h;
  std::memcpy(&h, staging, sizeof h);
  if (const char* what = HeaderDamage(h)) return Corrupt(what);
  if (have != FileSizeFor(h.payload_length)) return Corrupt("file size");
  // The file is intact as far as its header goes; now compare with the request.
  if (h.payload_length != expected_payload) return IoResult{BlockStatus::kMismatch, 0, "payload length"};
  if (h.layout_digest != layout_digest) return IoResult{BlockStatus::kMismatch, 0, "layout digest"};
  if (h.shard_count != shard_count) return IoResult{BlockStatus::kMismatch, 0, "shard count"};
  if (h.payload_crc != Crc32c(0, staging + kHeaderSize, expected_payload)) return Corrupt("payload checksum");
  // A served block is a used block: capacity eviction goes by mtime. Best
  // effort; a file we may not touch is still a good block.
  if (opts.touch) futimens(file.get(), nullptr);
  return IoResult{};
}

uint8_t BlockExists(const StoreRoots& roots, const std::string& path) {
  UniqueFd dir;
  std::string name;
  if (OpenParent(roots, path, &dir, &name) != 0) return 0;
  struct stat st;
  if (fstatat(dir.get(), name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) return 0;
  return S_ISREG(st.st_mode) && static_cast<uint64_t>(st.st_size) >= kHeaderSize ? 1 : 0;
}

int CommitFile(const StoreRoots& roots, const std::string& from, const std::string& to) {
  UniqueFd from_dir, to_dir;
  std::string from_name, to_name;
  if (int rc = OpenParent(roots, from, &from_dir, &from_name)) return rc;
  if (int rc = OpenParent(roots, to, &to_dir, &to_name)) return rc;
  return renameat(from_dir.get(), from_name.c_str(), to_dir.get(), to_name.c_str()) == 0 ? 0 : errno;
}

int RemoveFile(const StoreRoots& roots, const std::string& path) {
  UniqueFd dir;
  std::string name;
  int rc = OpenParent(roots, path, &dir, &name);
  if (rc == 0) rc = unlinkat(dir.get(), name.c_str(), 0) == 0 ? 0 : errno;
  return rc == ENOENT ? 0 : rc;
}

}  // namespace ucm
