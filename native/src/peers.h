// The engine's own view of who is connected to its ipc:// socket, from the
// kernel rather than from what clients say: the accepted unix-domain
// connections among this process's file descriptors (libzmq owns them), the
// credentials of the process at the other end of each (SO_PEERCRED), and a
// way to end one (shutdown: libzmq then sees end-of-file and closes it as if
// the peer had left). No Node-API here.
#pragma once
#include <sys/types.h>
#include <cstdint>
#include <string>
#include <vector>

namespace ucm {

struct Peer {
  int fd;
  uint64_t inode;  // the socket's inode: names the connection across calls (fd numbers get reused)
  pid_t pid;       // of the connected process, as the kernel saw it at connect time
  uid_t uid;
};

// Accepted connections to the unix socket bound at `path` (not the listener).
std::vector<Peer> ConnectedPeers(const std::string& path);

// True when descriptor `fd` is a socket, asked of the socket layer alone:
// the engine's descriptor scans run on the JavaScript thread, and fstat() of
// a descriptor of a file or directory on a hung NFS server would block it
// (the server's getattr never returns), taking every client's requests down.
bool IsSocketFd(int fd);

// Ends the connection on descriptor `fd` if that descriptor is still the
// accepted connection with socket inode `inode` (checked right before, so a
// descriptor number reused since ConnectedPeers is never hit). True when it
// was shut down.
bool EndConnection(const std::string& path, int fd, uint64_t inode);

// Keeps libzmq's ipc listener from ever meeting EMFILE: libzmq 4.3 aborts
// the whole process when an ipc accept fails for want of a descriptor, and
// its accepts run on its own thread, faster than the engine's event loop
// hears of them. A thread here checks every millisecond how far up the
// descriptor table is taken (one dup: the kernel hands out the lowest free
// number, so a result at or above `pause_at` means every lower number is in
// use) and then renames the socket to a hidden name in its directory: no new
// connection can arrive (only the listen backlog is still accepted), while
// connections already open are untouched. Once fewer than `resume_at`
// descriptors are open (the engine closes idle ones meanwhile), the name is
// put back. One per process.
struct ListenerPauseState {
  bool running = false;
  bool paused = false;
  uint64_t pauses = 0;      // times the socket was hidden
  std::string hidden_path;  // where it is while paused
  std::string error;        // the last rename that failed, if any
};
void StartListenerPause(const std::string& path, int pause_at, int resume_at);
// Stops the thread and puts the socket's name back.
void StopListenerPause();
ListenerPauseState GetListenerPause();

// Lets every thread of this process (and every thread they start after) run
// on every CPU the system allows it (its cgroup's cpuset): an engine started
// by a vLLM worker would otherwise inherit that worker's binding to one core,
// where the worker's own threads spin. Every thread, not only the caller:
// Node's platform workers (V8's garbage collection helpers) and libuv's pool
// exist before the engine's code runs, and the main thread waits for them.
// Returns {CPUs the caller was allowed before, after}.
std::pair<int, int> WidenCpuAffinity();

// Raises this process's soft limit on open files to the hard limit; returns
// {soft, hard} after.
std::pair<uint64_t, uint64_t> RaiseFdLimit();

}  // namespace ucm
