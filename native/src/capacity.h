// Capacity accounting for one storage backend directory, shared by every
// engine (on every node) that writes to it.
//
//   <dir>/.ucm/usage       the ledger: bytes and block files in the directory,
//                          one text line, changed only under a lock on it
//   <dir>/.ucm/evict.lock  held by whichever engine is evicting
//
// Engines add what they commit and subtract what they delete (LedgerAdd).
// Eviction scans the directory, deletes the least recently used block files
// (mtime: a block's write, and every load refreshes it) until enough is
// freed, and writes the scanned truth back to the ledger, which also repairs
// drift left by engines that died between a commit and its ledger update.
// Locks are open-file-description fcntl locks (they work over NFS and between
// threads of one process), taken with a deadline, never waited on forever.
#pragma once
#include <cstdint>
#include <string>
#include <unordered_set>

namespace ucm {

struct Usage {
  int64_t bytes = 0;
  int64_t files = 0;
  bool existed = false;  // false: the ledger was created by this call
};

// Adds (dbytes, dfiles) to the ledger of `dir`, creating it when missing
// (then existed = false and the totals start at zero). Returns 0 or an errno
// (ETIMEDOUT when the lock was not had within timeout_ms).
int LedgerAdd(const std::string& dir, int64_t dbytes, int64_t dfiles, int timeout_ms, Usage* out);

struct EvictRequest {
  std::string dir;
  // Evict until the scanned bytes plus `extra_bytes` (space this engine has
  // promised to writes in flight) are at most `target_bytes`. Decided on the
  // scan, not on a figure from before the lock: two engines that both saw the
  // directory full evict once, not twice. has_target false: scan and repair only.
  bool has_target = false;
  uint64_t target_bytes = 0;
  uint64_t extra_bytes = 0;
  uint64_t grace_ns = 0;                   // files used within this window are kept
  std::unordered_set<std::string> pinned;  // block file names (key hex) being read here
  int timeout_ms = 10000;                  // for the ledger lock
};

struct EvictResult {
  bool busy = false;           // another engine holds the eviction lock
  int err = 0;                 // errno of a failure that stopped the pass
  uint64_t scanned_bytes = 0;  // block files plus what holds them (namespace directories, descriptions)
  uint64_t scanned_files = 0;
  uint64_t wanted_bytes = 0;  // what the scan said had to go
  uint64_t freed_bytes = 0;
  uint64_t freed_files = 0;
  uint64_t kept_recent = 0;  // candidates spared by the grace window
  uint64_t kept_pinned = 0;  // candidates spared because they are being read
  uint64_t vanished = 0;     // deleted by someone else between scan and unlink
  Usage usage;               // the ledger after the pass
};

// Runs one eviction pass over `dir` (see the file comment).
void Evict(const EvictRequest& req, EvictResult* out);

}  // namespace ucm
