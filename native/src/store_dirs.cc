#include "store_dirs.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "file_modes.h"

namespace ucm {

UniqueFd& UniqueFd::operator=(UniqueFd&& o) noexcept {
  if (this != &o) {
    Reset(o.fd_);
    o.fd_ = -1;
  }
  return *this;
}

void UniqueFd::Reset(int fd) {
  if (fd_ >= 0) close(fd_);
  fd_ = fd;
}

int UniqueFd::Close() {
  if (fd_ < 0) return 0;
  const int rc = close(fd_) == 0 ? 0 : errno;
  fd_ = -1;
  return rc;
}

namespace {

bool BadComponent(const std::string& c) { return c.empty() || c == "." || c == ".."; }

// O_PATH: a directory we only pass through or name entries in needs no
// read permission and, over NFS, no open of its own on the server.
constexpr int kWalkFlags = O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC;

}  // namespace

int OpenBelow(const std::string& root, const std::string& rel, UniqueFd* out) {
  UniqueFd cur(open(root.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC));  // the root's own path is trusted
  if (!cur.ok()) return errno;
  size_t at = 0;
  while (at < rel.size()) {
    size_t end = rel.find('/', at);
    if (end == std::string::npos) end = rel.size();
    const std::string part = rel.substr(at, end - at);
    if (BadComponent(part)) return EINVAL;
    UniqueFd next(openat(cur.get(), part.c_str(), kWalkFlags));
    if (!next.ok()) return errno;
    cur = std::move(next);
    at = end + 1;
  }
  *out = std::move(cur);
  return 0;
}

int OpenParent(const StoreRoots& roots, const std::string& path, UniqueFd* dir, std::string* name) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return EINVAL;
  *name = path.substr(slash + 1);
  if (BadComponent(*name)) return EINVAL;
  if (roots.empty()) {
    UniqueFd d(open(slash == 0 ? "/" : path.substr(0, slash).c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC));
    if (!d.ok()) return errno;
    *dir = std::move(d);
    return 0;
  }
  // The longest root the path lies below (one store may sit inside another's directory).
  const std::string* best = nullptr;
  size_t skip = 0;
  for (const std::string& r : roots) {
    const std::string prefix = r == "/" ? r : r + "/";
    if (path.size() > prefix.size() && path.compare(0, prefix.size(), prefix) == 0 && (!best || prefix.size() > skip)) {
      best = &r;
      skip = prefix.size();
    }
  }
  if (!best) return EXDEV;
  const std::string rel = slash + 1 > skip ? path.substr(skip, slash - skip) : std::string();
  return OpenBelow(*best, rel, dir);
}

MadeDir MakeOwnDir(int parent, const char* name, bool must_be_own) {
  MadeDir r;
  const bool created = mkdirat(parent, name, Modes().dir) == 0;
  if (!created && errno != EEXIST) {
    r.err = errno;
    return r;
  }
  // Whatever sits at the name now, reached without following a link: the
  // directory just made, one that was there, or whatever replaced either.
  UniqueFd d(openat(parent, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (!d.ok()) {
    r.err = errno;
    return r;
  }
  struct stat st;
  if (fstat(d.get(), &st) != 0) {
    r.err = errno;
    return r;
  }
  if ((must_be_own || created) && st.st_uid != geteuid()) {
    r.err = EPERM;
    r.uid = st.st_uid;
    return r;
  }
  if (!created) return r;
  // Ours: the exact mode (the umask may have taken group bits), set on the
  // directory itself, never through its name.
  if (fchmod(d.get(), Modes().dir) != 0 || fstat(d.get(), &st) != 0) {
    r.err = errno;
    return r;
  }
  r.created = true;
  r.bytes = static_cast<uint64_t>(st.st_blocks) * 512u;
  return r;
}

int CreateOwnFile(int parent, const char* name, const std::string& data, uint64_t* bytes) {
  *bytes = 0;
  UniqueFd f(openat(parent, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, Modes().file));
  if (!f.ok()) return errno == EEXIST ? 0 : errno;
  int rc = fchmod(f.get(), Modes().file) == 0 ? 0 : errno;
  for (size_t done = 0; rc == 0 && done < data.size();) {
    const ssize_t n = write(f.get(), data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) rc = n < 0 ? errno : EIO;
    if (n > 0) done += static_cast<size_t>(n);
  }
  struct stat st;
  if (rc == 0 && fstat(f.get(), &st) == 0) *bytes = static_cast<uint64_t>(st.st_blocks) * 512u;
  if (rc == 0) rc = f.Close();
  if (rc != 0) unlinkat(parent, name, 0);  // ours: created exclusively above
  return rc;
}

}  // namespace ucm
