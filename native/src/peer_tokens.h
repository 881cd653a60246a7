// Proof of which process a client is. ZeroMQ hides the connection a message
// came in on, so the kernel's answer (SO_PEERCRED) about the connection that
// says `hello` cannot be had there. Instead the engine listens on a second
// unix socket beside its endpoint (the credential socket): whoever connects
// gets a fresh random token, remembered with the credentials the kernel
// reports for that connection, and then the connection is closed. A client
// puts the token in its hello; the engine redeems it (once, within a few
// seconds) and so learns the pid and uid of the process that asked for it,
// whatever pid the hello names. Nobody can get a token for another process.
// No Node-API here.
#pragma once
#include <sys/types.h>
#include <cstdint>
#include <string>

namespace ucm {

struct ProvenPeer {
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;
};

// Binds `path` (a stale socket there is replaced; anything else is an
// error), sets its mode and serves it on a thread of its own until
// StopCredentialListener. Returns "" or what failed. One per process.
std::string StartCredentialListener(const std::string& path, int mode);

// Stops the thread and removes the socket.
void StopCredentialListener();

// The credentials token `hex` (32 hex digits) was given to, if it is known
// and younger than its lifetime; it is forgotten either way.
bool RedeemToken(const std::string& hex, ProvenPeer* out);

// Tokens handed out so far (for tests and stats).
uint64_t TokensIssued();

}  // namespace ucm
