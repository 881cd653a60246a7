#include "peers.h"

#include <dirent.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstddef>
#include <cstdlib>
#include <cstring>

namespace ucm {
namespace {

// A connection accepted on the listener at `path`: same local name, not
// listening itself, with peer credentials.
bool Inspect(int fd, const std::string& path, Peer* out) {
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode)) return false;
  sockaddr_un addr;
  socklen_t len = sizeof addr;
  std::memset(&addr, 0, sizeof addr);
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0 || addr.sun_family != AF_UNIX) return false;
  const size_t name_len = len > offsetof(sockaddr_un, sun_path) ? len - offsetof(sockaddr_un, sun_path) : 0;
  if (strnlen(addr.sun_path, name_len) != path.size() || std::strncmp(addr.sun_path, path.c_str(), path.size()) != 0)
    return false;
  int listening = 0;
  socklen_t ll = sizeof listening;
  if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &ll) != 0 || listening) return false;
  ucred cred;
  socklen_t cl = sizeof cred;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cl) != 0) return false;
  *out = Peer{fd, static_cast<uint64_t>(st.st_ino), cred.pid, cred.uid};
  return true;
}

}  // namespace

std::vector<Peer> ConnectedPeers(const std::string& path) {
  std::vector<Peer> peers;
  DIR* d = opendir("/proc/self/fd");
  if (!d) return peers;
  const int own = dirfd(d);
  while (dirent* e = readdir(d)) {
    char* end = nullptr;
    const long fd = std::strtol(e->d_name, &end, 10);
    if (end == e->d_name || *end != '\0' || fd == own) continue;
    Peer p;
    if (Inspect(static_cast<int>(fd), path, &p)) peers.push_back(p);
  }
  closedir(d);
  return peers;
}

bool EndConnection(const std::string& path, int fd, uint64_t inode) {
  Peer again;
  if (!Inspect(fd, path, &again) || again.inode != inode) return false;
  return shutdown(fd, SHUT_RDWR) == 0;
}

std::pair<uint64_t, uint64_t> RaiseFdLimit() {
  rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return {0, 0};
  if (rl.rlim_cur < rl.rlim_max) {
    rlimit want = rl;
    want.rlim_cur = rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &want) == 0) rl = want;
  }
  return {static_cast<uint64_t>(rl.rlim_cur), static_cast<uint64_t>(rl.rlim_max)};
}

}  // namespace ucm
