#include "tcp_peers.h"

#include "peers.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace ucm {
namespace {

// An address as /proc/net/tcp{,6} prints it: each 32-bit word of the address
// as the machine holds it, and the port in host order.
struct Endpoint {
  bool v6 = false;
  std::array<uint32_t, 4> words{};
  uint16_t port = 0;
  bool operator<(const Endpoint& o) const {
    if (v6 != o.v6) return v6 < o.v6;
    if (port != o.port) return port < o.port;
    return words < o.words;
  }
};

bool FromSockaddr(const sockaddr_storage& ss, Endpoint* out) {
  if (ss.ss_family == AF_INET) {
    const auto& a = reinterpret_cast<const sockaddr_in&>(ss);
    out->v6 = false;
    out->words = {a.sin_addr.s_addr, 0, 0, 0};
    out->port = ntohs(a.sin_port);
    return true;
  }
  if (ss.ss_family == AF_INET6) {
    const auto& a = reinterpret_cast<const sockaddr_in6&>(ss);
    out->v6 = true;
    std::memcpy(out->words.data(), &a.sin6_addr, 16);
    out->port = ntohs(a.sin6_port);
    return true;
  }
  return false;
}

// A connection: the client's address and ours.
using Link = std::pair<Endpoint, Endpoint>;

// An accepted (not listening) tcp connection on local `port`: its inode, the client's address and ours.
bool Accepted(int fd, int port, uint64_t* inode, Endpoint* client, Endpoint* local) {
  struct stat st;
  if (!IsSocketFd(fd) || fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode)) return false;
  sockaddr_storage ss;
  socklen_t len = sizeof ss;
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0 || !FromSockaddr(ss, local) || local->port != port)
    return false;
  int listening = 0;
  socklen_t ll = sizeof listening;
  if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &ll) != 0 || listening) return false;
  len = sizeof ss;
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0 || !FromSockaddr(ss, client)) return false;
  *inode = static_cast<uint64_t>(st.st_ino);
  return true;
}

// "0100007F:1F90" (or 32 hex digits for tcp6) -> Endpoint.
bool ParseEndpoint(const std::string& s, bool v6, Endpoint* out) {
  const size_t words = v6 ? 4 : 1;
  if (s.size() < 8 * words + 2 || s[8 * words] != ':') return false;
  out->v6 = v6;
  for (size_t i = 0; i < words; ++i) {
    const std::string hex = s.substr(8 * i, 8);
    char* end = nullptr;
    out->words[i] = static_cast<uint32_t>(std::strtoul(hex.c_str(), &end, 16));
    if (end != hex.c_str() + hex.size()) return false;
  }
  const std::string port = s.substr(8 * words + 1);
  char* end = nullptr;
  out->port = static_cast<uint16_t>(std::strtoul(port.c_str(), &end, 16));
  return end == port.c_str() + port.size();
}

// What a sweep reads, opened once while descriptors are plentiful: a flood of
// connections takes every free descriptor within a millisecond of libzmq's
// accepts, and a sweep that had to open anything then could not run at all.
struct Handles {
  DIR* fds = nullptr;  // /proc/self/fd, rewound for each listing
  int tcp = -1;        // /proc/net/tcp, read from offset 0 each time
  int tcp6 = -1;
};

Handles& TheHandles() {
  static Handles h = [] {
    Handles x;
    x.fds = opendir("/proc/self/fd");
    x.tcp = open("/proc/net/tcp", O_RDONLY | O_CLOEXEC);
    x.tcp6 = open("/proc/net/tcp6", O_RDONLY | O_CLOEXEC);
    return x;
  }();
  return h;
}

std::string ReadAll(int fd) {
  std::string out;
  if (fd < 0) return out;
  char buf[65536];
  for (off_t at = 0;;) {
    const ssize_t n = pread(fd, buf, sizeof buf, at);
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
    at += n;
  }
  return out;
}

// Owner of every tcp socket of this host (network namespace), by its local and remote address.
std::map<Link, uid_t> Owners() {
  std::map<Link, uid_t> out;
  const Handles& h = TheHandles();
  for (const bool v6 : {false, true}) {
    const std::string text = ReadAll(v6 ? h.tcp6 : h.tcp);
    size_t at = text.find('\n');  // the header line ends here
    while (at != std::string::npos && at + 1 < text.size()) {
      const size_t end = text.find('\n', at + 1);
      const std::string line = text.substr(at + 1, end == std::string::npos ? std::string::npos : end - at - 1);
      at = end;
      // "  sl  local_address rem_address   st tx_queue:rx_queue tr:tm->when retrnsmt   uid ..."
      std::vector<std::string> fields;
      for (size_t p = 0; fields.size() < 8;) {
        const size_t from = line.find_first_not_of(' ', p);
        if (from == std::string::npos) break;
        p = line.find(' ', from);
        fields.push_back(line.substr(from, p == std::string::npos ? std::string::npos : p - from));
        if (p == std::string::npos) break;
      }
      if (fields.size() < 8) continue;
      char* uid_end = nullptr;
      const unsigned long uid = std::strtoul(fields[7].c_str(), &uid_end, 10);
      Endpoint a, b;
      if (uid_end == fields[7].c_str() + fields[7].size() && ParseEndpoint(fields[1], v6, &a) &&
          ParseEndpoint(fields[2], v6, &b))
        out[{a, b}] = static_cast<uid_t>(uid);
    }
  }
  return out;
}

}  // namespace

std::vector<TcpPeer> TcpPeers(int port, bool owners) {
  std::vector<TcpPeer> peers;
  std::map<Link, uid_t> table;
  if (owners) table = Owners();
  DIR* d = TheHandles().fds;
  if (!d) return peers;
  rewinddir(d);
  const int own = dirfd(d);
  while (dirent* e = readdir(d)) {
    char* end = nullptr;
    const long fd = std::strtol(e->d_name, &end, 10);
    if (end == e->d_name || *end != '\0' || fd == own) continue;
    uint64_t inode = 0;
    Endpoint client, local;
    if (!Accepted(static_cast<int>(fd), port, &inode, &client, &local)) continue;
    TcpPeer p{static_cast<int>(fd), inode, false, 0};
    // The client's socket: its local address is our peer, its remote one is us.
    auto it = table.find({client, local});
    if (it != table.end()) {
      p.uid_known = true;
      p.uid = it->second;
    }
    peers.push_back(p);
  }
  return peers;
}

bool EndTcpConnection(int port, int fd, uint64_t inode) {
  uint64_t again = 0;
  Endpoint client, local;
  if (!Accepted(fd, port, &again, &client, &local) || again != inode) return false;
  return shutdown(fd, SHUT_RDWR) == 0;
}

}  // namespace ucm
