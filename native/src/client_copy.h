// Copies between a client's memory and the engine's staging, bounded by the
// client's cancel and deadline (TransferTask::cancelled, deadline_ns).
//
// A copy counts only if it ended before the deadline: the client gives up at
// its deadline plus a margin and may reuse the memory then, so a copy that
// ran past it (the engine paused by SIGSTOP, a long stall) may have read
// bytes the client had already replaced (a dump would store a torn block
// with a good checksum) or written bytes into memory that is no longer the
// destination. Host copies run in chunks of kCopyChunk bytes with the clock
// read between chunks, so an engine that resumes past the deadline writes at
// most the rest of one chunk; it is read once more after the last chunk.
// A cancel is looked at only before a block's copy: a block is either copied
// whole (and reported as it went) or not at all (cancelled, its destination
// untouched), and Cancel waits for a running copy. A device copy is one DMA the engine only waits
// for (it cannot be paused halfway by pausing the engine); it is checked
// after it ended the same way.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "block_file.h"
#include "guarded_copy.h"

namespace ucm {

struct TransferTask;

// Bytes copied between two looks at the cancel flag and the clock: large
// enough that the look costs nothing next to the copy (a few hundred
// microseconds of memcpy), small enough that a resumed engine stops soon.
constexpr size_t kCopyChunk = 4u << 20;

// Counts a copy in progress for TransferEngine::Cancel, and says whether it
// may start: the counter first, then the cancel flag and the deadline
// (sequentially consistent), so Cancel either stops the copy or sees it
// and waits for it.
class CopyGuard {
 public:
  explicit CopyGuard(TransferTask& t);
  ~CopyGuard();
  CopyGuard(const CopyGuard&) = delete;
  CopyGuard& operator=(const CopyGuard&) = delete;
  // Before a copy: why it must not start (cancelled, or past the deadline);
  // false when it may.
  bool Stopped(IoResult* why) const;
  // Between chunks: why the copy must not go on (past the deadline).
  bool PastDeadline(IoResult* why) const;
  // After the copy: kOk when it ended in time, else why it counts for nothing.
  IoResult Ended() const;

 private:
  TransferTask& task_;
};

// Copies `copies` (client memory and staging, either way) under `guard`, in
// chunks with a look at the deadline between them. kOk when every byte was
// copied and the copy ended in time; else kCancelled (the deadline passed:
// the caller must neither report nor commit the block; a load's destination
// may hold part of it) or kIoError (the client's shared memory shrank under
// the copy).
IoResult CopyChunked(const CopyGuard& guard, const std::vector<CopyRange>& copies);

}  // namespace ucm
