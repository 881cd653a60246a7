// The engine's own view of who is connected to its ipc:// socket, from the
// kernel rather than from what clients say: the accepted unix-domain
// connections among this process's file descriptors (libzmq owns them), the
// credentials of the process at the other end of each (SO_PEERCRED), and a
// way to end one (shutdown: libzmq then sees end-of-file and closes it as if
// the peer had left). No Node-API here.
#pragma once
#include <cstdint>
#include <string>
#include <sys/types.h>
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

// Ends the connection on descriptor `fd` if that descriptor is still the
// accepted connection with socket inode `inode` (checked right before, so a
// descriptor number reused since ConnectedPeers is never hit). True when it
// was shut down.
bool EndConnection(const std::string& path, int fd, uint64_t inode);

// Raises this process's soft limit on open files to the hard limit; returns
// {soft, hard} after.
std::pair<uint64_t, uint64_t> RaiseFdLimit();

}  // namespace ucm
