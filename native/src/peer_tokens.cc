#include "peer_tokens.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <unordered_map>

namespace ucm {
namespace {

// A token is redeemed within a hello's round trip: seconds, not minutes. A
// client that fetched one and then stalled simply fetches another.
constexpr auto kLifetime = std::chrono::seconds(30);
// Tokens nobody redeemed are forgotten beyond this many (oldest first): a
// process hammering the socket costs the engine this much memory at most.
constexpr size_t kMaxTokens = 4096;
constexpr size_t kTokenBytes = 16;

using Clock = std::chrono::steady_clock;

struct Issued {
  ProvenPeer peer;
  Clock::time_point at;
};

struct Listener {
  std::mutex mu;
  std::unordered_map<std::string, Issued> tokens;
  std::deque<std::string> order;  // issue order, for the bound (may name redeemed tokens)
  std::thread thread;
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> issued{0};
  int fd = -1;
  std::string path;

  void Forget(Clock::time_point now) {
    while (!order.empty()) {
      auto it = tokens.find(order.front());
      const bool stale = it == tokens.end() || now - it->second.at > kLifetime || tokens.size() > kMaxTokens ||
                         order.size() > 2 * kMaxTokens;
      if (!stale) break;
      if (it != tokens.end()) tokens.erase(it);
      order.pop_front();
    }
  }

  // One connection: its credentials, a token for them, the token sent, closed.
  void Serve(int conn) {
    ucred cred;
    socklen_t len = sizeof cred;
    unsigned char raw[kTokenBytes];
    if (getsockopt(conn, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 ||
        getrandom(raw, sizeof raw, 0) != static_cast<ssize_t>(sizeof raw)) {
      close(conn);
      return;
    }
    static const char kHex[] = "0123456789abcdef";
    std::string hex(2 * kTokenBytes, '0');
    for (size_t i = 0; i < kTokenBytes; ++i) {
      hex[2 * i] = kHex[raw[i] >> 4];
      hex[2 * i + 1] = kHex[raw[i] & 15];
    }
    {
      std::lock_guard<std::mutex> lk(mu);
      const auto now = Clock::now();
      tokens[hex] = Issued{ProvenPeer{cred.pid, cred.uid, cred.gid}, now};
      order.push_back(hex);
      Forget(now);
    }
    issued.fetch_add(1);
    // 32 bytes into a fresh socket's empty buffer: never blocks. A peer that
    // already left loses its token, nothing else.
    (void)send(conn, hex.data(), hex.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    close(conn);
  }

  void Run() {
    while (!stop.load()) {
      pollfd p{fd, POLLIN, 0};
      const int n = poll(&p, 1, 100);
      if (n <= 0) continue;
      const int conn = accept4(fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (conn >= 0) Serve(conn);
      // EMFILE and the like: the connection waits in the backlog for the next turn.
      else if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
};

Listener& TheListener() {
  static Listener* l = new Listener();  // never destroyed: its thread may outlive static destruction at exit
  return *l;
}

}  // namespace

std::string StartCredentialListener(const std::string& path, int mode) {
  StopCredentialListener();
  Listener& l = TheListener();
  sockaddr_un addr;
  std::memset(&addr, 0, sizeof addr);
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof addr.sun_path)
    return "credential socket path '" + path + "' is empty or longer than " + std::to_string(sizeof addr.sun_path - 1) +
           " bytes";
  std::memcpy(addr.sun_path, path.c_str(), path.size());
  // A socket left by an engine that died is ours to replace (the caller made
  // sure no engine serves this endpoint); any other kind of file is not.
  struct stat st;
  if (lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) return "'" + path + "' exists and is not a socket; remove it";
    if (unlink(path.c_str()) != 0) return "cannot replace stale '" + path + "': " + std::strerror(errno);
  }
  const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return std::string("socket: ") + std::strerror(errno);
  // The mode is set right after bind (never through umask: it is the whole
  // process's, and transfer threads create files meanwhile); the directory,
  // checked by the caller, keeps other users out in between.
  const int b = bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  const int bind_errno = errno;
  if (b != 0 || chmod(path.c_str(), static_cast<mode_t>(mode)) != 0 || listen(fd, 128) != 0) {
    const std::string why = std::strerror(b != 0 ? bind_errno : errno);
    close(fd);
    if (b == 0) unlink(path.c_str());
    return "cannot listen on '" + path + "': " + why;
  }
  l.fd = fd;
  l.path = path;
  l.stop = false;
  l.thread = std::thread([&l] { l.Run(); });
  return "";
}

void StopCredentialListener() {
  Listener& l = TheListener();
  if (!l.thread.joinable()) return;
  l.stop = true;
  l.thread.join();
  close(l.fd);
  l.fd = -1;
  unlink(l.path.c_str());
  std::lock_guard<std::mutex> lk(l.mu);
  l.tokens.clear();
  l.order.clear();
}

bool RedeemToken(const std::string& hex, ProvenPeer* out) {
  Listener& l = TheListener();
  std::lock_guard<std::mutex> lk(l.mu);
  auto it = l.tokens.find(hex);
  if (it == l.tokens.end()) return false;
  const bool fresh = Clock::now() - it->second.at <= kLifetime;
  if (fresh) *out = it->second.peer;
  l.tokens.erase(it);
  return fresh;
}

uint64_t TokensIssued() { return TheListener().issued.load(); }

}  // namespace ucm
