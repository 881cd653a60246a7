// Paths below the storage directories, reached through descriptors.
//
// A storage directory (a "root") is the operator's: the engine checked at
// start that it belongs to its user and that nobody else may write it, so
// links in the root's own path are taken as they are. Below a root anyone
// who may write the store (group members of a shared store, other NFS nodes)
// could replace a directory with a symbolic link between two of our calls,
// so nothing there is ever looked up by path: each directory is opened from
// the one above it with O_NOFOLLOW | O_DIRECTORY, and files are opened,
// renamed, stat'ed and unlinked relative to the descriptor of the directory
// that holds them. A link anywhere below a root fails the operation (ELOOP
// or ENOTDIR) instead of leading it elsewhere.
#pragma once
#include <sys/types.h>

#include <cerrno>
#include <cstdint>
#include <string>
#include <vector>

namespace ucm {

// A descriptor closed on destruction; move-only.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  ~UniqueFd() { Reset(); }
  UniqueFd(UniqueFd&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
  UniqueFd& operator=(UniqueFd&& o) noexcept;
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  int get() const { return fd_; }
  bool ok() const { return fd_ >= 0; }
  void Reset(int fd = -1);
  // Closes now; 0 or the errno of close() (NFS reports write errors there).
  int Close();

 private:
  int fd_ = -1;
};

// The storage directories: absolute, without a trailing '/'. Empty: no
// store (the core's own tests), each path's directory is opened as named.
using StoreRoots = std::vector<std::string>;

// A directory on the way is not a real directory (a link, or a file).
inline bool NotRealDir(int err) { return err == ELOOP || err == ENOTDIR; }

// Opens `rel` ('/'-separated, empty for the root itself) below `root`, one
// component at a time, following no link. 0 or errno; EINVAL for an empty,
// "." or ".." component.
int OpenBelow(const std::string& root, const std::string& rel, UniqueFd* out);

// Opens the directory that holds the last component of `path` and names
// that component. `path` must lie below one of `roots` (EXDEV otherwise),
// whose components are then opened as OpenBelow does. 0 or errno.
int OpenParent(const StoreRoots& roots, const std::string& path, UniqueFd* dir, std::string* name);

// What MakeOwnDir did: err 0 and `created` when it made the directory
// (`bytes`: what the new directory takes on the filesystem), err 0 alone when
// a real directory was there already; else err, with the owner in `uid` when
// the directory belongs to another user (EPERM).
struct MadeDir {
  int err = 0;
  bool created = false;
  uint64_t bytes = 0;
  uint32_t uid = 0;
};

// Creates directory `name` in `parent` with the store's mode, made exact
// (whatever the umask) through a descriptor of the directory just opened
// without following links: a directory swapped for a link between mkdirat
// and the mode change fails (ELOOP) and the link's target keeps its mode. An
// existing entry must be a real directory, and of the engine's user when
// `must_be_own`.
MadeDir MakeOwnDir(int parent, const char* name, bool must_be_own);

// Writes `data` into a new file `name` of `parent` (exclusive: an existing
// entry, link or not, is left alone) with the store's file mode. 0 with the
// bytes it takes in *bytes, 0 with *bytes = 0 when it existed, or errno.
int CreateOwnFile(int parent, const char* name, const std::string& data, uint64_t* bytes);

}  // namespace ucm
