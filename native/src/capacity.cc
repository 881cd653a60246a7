#include "capacity.h"

#include "file_modes.h"
#include "store_dirs.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

namespace ucm {
namespace {

constexpr const char* kMetaDir = ".ucm";
constexpr const char* kLedgerMagic = "ucm-usage 1";

int64_t WallNs() {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

int64_t MtimeNs(const struct stat& st) {
  return static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000LL + st.st_mtim.tv_nsec;
}

// Opens <dir>/.ucm/<name>, creating both when missing; -errno on failure.
// Never through a symbolic link: .ucm must be a real directory (another
// engine of a shared store may have made it), the file a real file, both
// reached through descriptors (store_dirs.h).
int OpenMeta(const std::string& dir, const char* name) {
  UniqueFd root;
  int rc = OpenBelow(dir, "", &root);
  if (rc != 0) return -rc;
  const MadeDir made = MakeOwnDir(root.get(), kMetaDir, false);
  if (made.err != 0) return -made.err;
  UniqueFd meta(openat(root.get(), kMetaDir, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (!meta.ok()) return -errno;
  int fd = openat(meta.get(), name, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, Modes().file);
  if (fd < 0) return -errno;
  if (Modes().file != 0600) fchmod(fd, Modes().file);  // group bits the umask took away
  return fd;
}

// Takes a whole-file write lock on `fd` (an open-file-description lock, so
// two threads of this process exclude each other too). timeout_ms 0: one try.
int LockFd(int fd, int timeout_ms) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    struct flock fl;
    std::memset(&fl, 0, sizeof fl);
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    if (fcntl(fd, F_OFD_SETLK, &fl) == 0) return 0;
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EACCES) return errno;
    if (std::chrono::steady_clock::now() >= deadline) return timeout_ms == 0 ? EAGAIN : ETIMEDOUT;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}

// "ucm-usage 1 <bytes> <files>\n", as WriteLedger writes it; anything else is a damaged ledger.
bool ParseLedger(const char* text, Usage* u) {
  const size_t magic = std::strlen(kLedgerMagic);
  if (std::strncmp(text, kLedgerMagic, magic) != 0 || text[magic] != ' ') return false;
  const char* p = text + magic + 1;
  int64_t v[2];
  for (int i = 0; i < 2; ++i) {
    char* end = nullptr;
    errno = 0;
    const long long x = std::strtoll(p, &end, 10);
    if (end == p || errno != 0 || x < 0 || *end != (i == 0 ? ' ' : '\n')) return false;
    v[i] = x;
    p = end + 1;
  }
  u->bytes = v[0];
  u->files = v[1];
  return true;
}

// Read-modify-write of the ledger under its lock. `change` sees the current
// totals (zero and existed = false for a new or unreadable ledger).
int WithLedger(const std::string& dir, int timeout_ms, const std::function<void(Usage&)>& change, Usage* out) {
  int fd = OpenMeta(dir, "usage");
  if (fd < 0) return -fd;
  int rc = LockFd(fd, timeout_ms);
  if (rc != 0) {
    close(fd);
    return rc;
  }
  char buf[128] = {0};
  ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
  Usage u;
  u.existed = n > 0 && ParseLedger(buf, &u);
  if (!u.existed) u.bytes = u.files = 0;
  const bool existed = u.existed;
  const Usage before = u;
  change(u);
  u.bytes = std::max<int64_t>(0, u.bytes);
  u.files = std::max<int64_t>(0, u.files);
  u.existed = existed;
  rc = 0;
  // A read (nothing changed) writes nothing: engines poll the ledger often.
  if (!existed || u.bytes != before.bytes || u.files != before.files) {
    char line[128];
    int len = std::snprintf(line, sizeof line, "%s %" PRId64 " %" PRId64 "\n", kLedgerMagic, u.bytes, u.files);
    if (pwrite(fd, line, static_cast<size_t>(len), 0) != len || ftruncate(fd, len) != 0) rc = errno ? errno : EIO;
  }
  if (close(fd) != 0 && rc == 0) rc = errno;  // releases the lock; NFS flushes here
  if (rc == 0 && out) *out = u;
  return rc;
}

struct Entry {
  int64_t mtime;
  uint64_t size;
  std::string path;  // absolute
  size_t name_at;    // where the key hex starts in path
};

// Bytes a directory or a small file takes on the filesystem (what it allocated).
uint64_t Allocated(const struct stat& st) { return static_cast<uint64_t>(st.st_blocks) * 512u; }

// Lists the block files: <dir>/<namespace>/<2 hex>/<key hex>. Names starting
// with '.' (temp areas, .ucm, probes) are not blocks. `*holders` gets the
// bytes of what holds the blocks: each namespace's directory, its fan-out
// directories and .tmp, and its description (NAMESPACE). They take space too
// (about 1 MiB a namespace on ext4) and stay when every block is evicted, so
// they count against the capacity; core/layout.ts reports the same set when
// it creates a namespace. So do the temporary files in .tmp (dumps not yet
// committed, by size, as core/pending_commits.ts counts them): they are not
// blocks, nor evictable, but they take room until committed or deleted.
//
// A commit renames a temporary file into its fan-out directory while a scan
// may be running: listed once in .tmp and again under its key, it would count
// twice (a whole batch of commits during a long scan: megabytes of ledger
// running ahead), and listed in neither if the rename fell between the two.
// So after a namespace's fan-out directories, every temporary file seen is
// looked at again: still there, it counts as seen; gone, its size is taken
// back, and its block file, if there now and not yet listed, is listed.
void Scan(const std::string& dir, std::vector<Entry>* out, uint64_t* holders) {
  // An NFS client lists a directory from its own cache of it until its
  // attributes expire (acdirmin/acdirmax: 30 to 60 s by default), so a scan
  // would miss block files other nodes committed since, whose ledger updates
  // it then overwrites: the ledger falls behind the directory (the NFS
  // suite: 3 to 7 MiB of a 64 MiB capacity). Dropping the directory's cached
  // pages first (fadvise DONTNEED; a local filesystem has none to drop)
  // makes the listing come from the server.
  auto subdirs = [](const std::string& d, const std::function<void(const std::string&, const char*)>& fn) {
    int fd = open(d.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return;
    posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    DIR* dp = fdopendir(fd);
    if (!dp) {
      close(fd);
      return;
    }
    while (struct dirent* e = readdir(dp)) {
      if (e->d_name[0] == '.') continue;
      fn(d + "/" + e->d_name, e->d_name);
    }
    closedir(dp);
  };
  // Descends only into real directories: a symbolic link planted as a
  // namespace or fan-out directory must never lead eviction elsewhere.
  auto real_dir = [](const std::string& p) {
    struct stat st;
    return lstat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
  };
  auto count = [&](const std::string& p, bool want_dir) {
    struct stat st;
    if (lstat(p.c_str(), &st) != 0) return false;
    if (want_dir ? !S_ISDIR(st.st_mode) : !S_ISREG(st.st_mode)) return false;
    *holders += Allocated(st);
    return true;
  };
  auto block_entry = [&](const std::string& file, const char* name) {
    struct stat st;
    if (lstat(file.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return;
    out->push_back(Entry{MtimeNs(st), static_cast<uint64_t>(st.st_size), file, file.size() - std::strlen(name)});
  };
  subdirs(dir, [&](const std::string& ns, const char*) {
    if (!count(ns, true)) return;
    struct Temp {
      std::string path;
      std::string key;  // the name up to its first '.': <key hex>.<engine tag>.<seq>
      uint64_t size;
    };
    std::vector<Temp> temps;
    if (count(ns + "/.tmp", true)) {
      subdirs(ns + "/.tmp", [&](const std::string& file, const char* name) {
        struct stat st;
        if (lstat(file.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return;
        *holders += static_cast<uint64_t>(st.st_size);
        temps.push_back(Temp{file, std::string(name, std::strcspn(name, ".")), static_cast<uint64_t>(st.st_size)});
      });
    }
    const size_t first_block = out->size();
    subdirs(ns, [&](const std::string& fan, const char*) {
      if (!real_dir(fan)) {
        count(fan, false);  // NAMESPACE
        return;
      }
      count(fan, true);
      subdirs(fan, block_entry);
    });
    std::unordered_set<std::string> listed;
    for (const Temp& t : temps) {
      struct stat st;
      if (lstat(t.path.c_str(), &st) == 0) continue;
      *holders -= std::min(*holders, t.size);
      if (t.key.size() < 2) continue;
      if (listed.empty())
        for (size_t i = first_block; i < out->size(); ++i) listed.insert((*out)[i].path.substr((*out)[i].name_at));
      if (!listed.insert(t.key).second) continue;
      block_entry(ns + "/" + t.key.substr(0, 2) + "/" + t.key, t.key.c_str());
    }
  });
}

}  // namespace

int LedgerAdd(const std::string& dir, int64_t dbytes, int64_t dfiles, int timeout_ms, Usage* out) {
  return WithLedger(
      dir, timeout_ms,
      [&](Usage& u) {
        u.bytes += dbytes;
        u.files += dfiles;
      },
      out);
}

void Evict(const EvictRequest& req, EvictResult* out) {
  int lock = OpenMeta(req.dir, "evict.lock");
  if (lock < 0) {
    out->err = -lock;
    return;
  }
  int rc = LockFd(lock, 0);
  if (rc != 0) {
    close(lock);
    if (rc == EAGAIN)
      out->busy = true;
    else
      out->err = rc;
    return;
  }
  Usage before;
  rc = LedgerAdd(req.dir, 0, 0, req.timeout_ms, &before);
  if (rc != 0) {
    out->err = rc;
    close(lock);
    return;
  }
  std::vector<Entry> files;
  uint64_t holders = 0;
  Scan(req.dir, &files, &holders);
  out->scanned_bytes = holders;
  for (const Entry& e : files) out->scanned_bytes += e.size;
  out->scanned_files = files.size();

  const uint64_t have = out->scanned_bytes + req.extra_bytes;
  if (req.has_target && have > req.target_bytes) out->wanted_bytes = have - req.target_bytes;
  if (out->wanted_bytes > 0) {
    std::sort(files.begin(), files.end(), [](const Entry& a, const Entry& b) { return a.mtime < b.mtime; });
    const int64_t now = WallNs();
    for (const Entry& e : files) {
      if (out->freed_bytes >= out->wanted_bytes) break;
      if (now - e.mtime < static_cast<int64_t>(req.grace_ns)) {
        out->kept_recent++;
        continue;
      }
      if (req.pinned.count(e.path.substr(e.name_at))) {
        out->kept_pinned++;
        continue;
      }
      // Used since the scan (a load refreshes mtime)? Then it is not the
      // least recently used any more.
      struct stat st;
      if (lstat(e.path.c_str(), &st) != 0) {
        out->vanished++;
        continue;
      }
      if (MtimeNs(st) != e.mtime) continue;
      if (unlink(e.path.c_str()) == 0) {
        out->freed_bytes += e.size;
        out->freed_files++;
      } else if (errno == ENOENT) {
        out->vanished++;
      }
    }
  }
  // The scan is the truth; what other engines added or removed while it ran
  // arrives as the ledger's change since `before`.
  const int64_t scanned_bytes = static_cast<int64_t>(out->scanned_bytes);
  const int64_t scanned_files = static_cast<int64_t>(out->scanned_files);
  rc = WithLedger(
      req.dir, req.timeout_ms,
      [&](Usage& u) {
        const int64_t db = u.bytes - before.bytes, df = u.files - before.files;
        u.bytes = scanned_bytes - static_cast<int64_t>(out->freed_bytes) + db;
        u.files = scanned_files - static_cast<int64_t>(out->freed_files) + df;
      },
      &out->usage);
  if (rc != 0) out->err = rc;
  close(lock);
}

}  // namespace ucm
