#include "peers.h"

#include <dirent.h>
#include <fcntl.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>

namespace ucm {
namespace {

// A connection accepted on the listener at `path`: same local name, not
// listening itself, with peer credentials.
bool Inspect(int fd, const std::string& path, Peer* out) {
  struct stat st;
  if (!IsSocketFd(fd) || fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode)) return false;
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

bool IsSocketFd(int fd) {
  int type = 0;
  socklen_t len = sizeof type;
  return getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) == 0;
}

namespace {

int OpenDescriptors() {
  DIR* d = opendir("/proc/self/fd");
  if (!d) return -1;
  int n = -1;  // not counting the directory's own descriptor
  while (dirent* e = readdir(d))
    if (e->d_name[0] != '.') ++n;
  closedir(d);
  return n;
}

struct Pauser {
  std::mutex mu;
  std::condition_variable cv;
  std::thread thread;
  bool stop = false;
  ListenerPauseState state;
  std::string path;
  int pause_at = 0, resume_at = 0, probe_fd = -1;

  // The lowest free descriptor number, or INT32_MAX when none is free.
  int LowestFree() const {
    const int fd = fcntl(probe_fd, F_DUPFD_CLOEXEC, 0);
    if (fd < 0) return errno == EMFILE ? INT32_MAX : 0;
    close(fd);
    return fd;
  }

  // Near the mark (half the way or more) it is looked at every millisecond: libzmq accepts about a hundred
  // connections in one. Farther, as often as descriptors taken at a hundred a millisecond could reach it from here, but
  // at least every 100 ms: with the usual raised limit (hundreds of thousands) that is ten looks a second instead of a
  // hundred, each of which woke a thread that, on a vLLM CPU node, took a core from the model's threads.
  int FarLook(int low) const { return std::clamp((pause_at - low) / 100, 10, 100); }

  void Rename(const std::string& from, const std::string& to, bool pausing) {
    if (rename(from.c_str(), to.c_str()) == 0) {
      state.paused = pausing;
      if (pausing) ++state.pauses;
    } else {
      state.error = "rename " + from + " -> " + to + ": " + std::strerror(errno);
    }
  }

  void Run() {
    std::unique_lock<std::mutex> lk(mu);
    while (!stop) {
      if (!state.paused) {
        const int low = LowestFree();
        if (low >= pause_at) Rename(path, state.hidden_path, true);
        cv.wait_for(lk, std::chrono::milliseconds(state.paused || low * 2 >= pause_at ? 1 : FarLook(low)));
      } else {
        const int open = OpenDescriptors();
        if (open >= 0 && open < resume_at) Rename(state.hidden_path, path, false);
        cv.wait_for(lk, std::chrono::milliseconds(20));
      }
    }
    if (state.paused) Rename(state.hidden_path, path, false);
  }
};

Pauser& ThePauser() {
  static Pauser* p = new Pauser();  // never destroyed: the thread may outlive static destruction at exit
  return *p;
}

}  // namespace

void StartListenerPause(const std::string& path, int pause_at, int resume_at) {
  Pauser& p = ThePauser();
  StopListenerPause();
  std::lock_guard<std::mutex> lk(p.mu);
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : path.substr(0, slash);
  const std::string base = slash == std::string::npos ? path : path.substr(slash + 1);
  p.path = path;
  p.pause_at = pause_at;
  p.resume_at = resume_at;
  p.state = ListenerPauseState{};
  p.state.running = true;
  p.state.hidden_path = dir + "/." + base + ".paused-" + std::to_string(getpid());
  if (p.probe_fd < 0) p.probe_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
  p.stop = false;
  p.thread = std::thread([&p] { p.Run(); });
}

void StopListenerPause() {
  Pauser& p = ThePauser();
  {
    std::lock_guard<std::mutex> lk(p.mu);
    if (!p.thread.joinable()) return;
    p.stop = true;
  }
  p.cv.notify_all();
  p.thread.join();
  std::lock_guard<std::mutex> lk(p.mu);
  p.state.running = false;
}

ListenerPauseState GetListenerPause() {
  Pauser& p = ThePauser();
  std::lock_guard<std::mutex> lk(p.mu);
  return p.state;
}

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

std::pair<int, int> WidenCpuAffinity() {
  cpu_set_t before;
  CPU_ZERO(&before);
  if (sched_getaffinity(0, sizeof before, &before) != 0) return {0, 0};
  cpu_set_t all;
  CPU_ZERO(&all);
  for (int c = 0; c < CPU_SETSIZE; ++c) CPU_SET(c, &all);
  // The kernel keeps of this set what the cpuset allows (EINVAL only if nothing).
  cpu_set_t after = before;
  if (sched_setaffinity(0, sizeof all, &all) == 0) sched_getaffinity(0, sizeof after, &after);
  // The threads that exist already: each keeps the affinity it was started with otherwise.
  if (DIR* d = opendir("/proc/self/task")) {
    while (dirent* e = readdir(d)) {
      char* end = nullptr;
      const long tid = std::strtol(e->d_name, &end, 10);
      if (end == e->d_name || *end != '\0') continue;
      // A thread that ended meanwhile fails with ESRCH: nothing to do.
      sched_setaffinity(static_cast<pid_t>(tid), sizeof all, &all);
    }
    closedir(d);
  }
  return {CPU_COUNT(&before), CPU_COUNT(&after)};
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
