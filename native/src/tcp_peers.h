// Who is at the other end of the engine's tcp connections. A tcp endpoint is
// on localhost only, where every local user can connect; those without the
// CURVE key cannot be served, but each connection they open holds one of the
// engine's descriptors until ZeroMQ's handshake gives up. The client's end of
// a localhost connection is a socket in this host's table too, and the
// kernel lists its owner there (/proc/net/tcp and tcp6: the same table `ss`
// and identd read), so the engine can tell another user's connections from
// its own user's and close them at once. No Node-API here.
#pragma once
#include <sys/types.h>
#include <cstdint>
#include <vector>

namespace ucm {

struct TcpPeer {
  int fd;
  uint64_t inode;  // our socket's inode: names the connection across calls
  bool uid_known;  // false when the client's socket is not in this host's table (gone meanwhile)
  uid_t uid;       // owner of the client's socket
};

// Accepted connections to the tcp listener on local `port` among this
// process's descriptors; with the owner of the client's end when `owners`.
std::vector<TcpPeer> TcpPeers(int port, bool owners);

// Shuts down descriptor `fd` if it still is the accepted tcp connection with
// socket inode `inode` to local `port`.
bool EndTcpConnection(int port, int fd, uint64_t inode);

}  // namespace ucm
