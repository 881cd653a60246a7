#include "client_copy.h"

#include <algorithm>
#include <cerrno>

#include "transfer.h"

namespace ucm {

CopyGuard::CopyGuard(TransferTask& t) : task_(t) { task_.copying.fetch_add(1); }

CopyGuard::~CopyGuard() { task_.copying.fetch_sub(1); }

bool CopyGuard::Stopped(IoResult* why) const {
  if (task_.cancelled.load()) {
    *why = IoResult{BlockStatus::kCancelled, ECANCELED, "cancelled"};
    return true;
  }
  return PastDeadline(why);
}

bool CopyGuard::PastDeadline(IoResult* why) const {
  // One clock read (vDSO, no system call) per chunk.
  if (task_.deadline_ns == 0 || NowNs() < task_.deadline_ns) return false;
  *why = IoResult{BlockStatus::kCancelled, ETIMEDOUT, "past the client's deadline"};
  return true;
}

IoResult CopyGuard::Ended() const {
  IoResult why;
  if (!PastDeadline(&why)) return IoResult{};
  why.what = "the copy ended past the client's deadline";
  return why;
}

IoResult CopyChunked(const CopyGuard& guard, const std::vector<CopyRange>& copies) {
  // The pieces of one chunk; a worker thread reuses its own.
  thread_local std::vector<CopyRange> chunk;
  size_t i = 0, off = 0;  // the next byte to copy: copies[i], `off` bytes in
  while (i < copies.size()) {
    chunk.clear();
    size_t room = kCopyChunk;
    while (i < copies.size() && room > 0) {
      const CopyRange& r = copies[i];
      const size_t len = std::min(r.len - off, room);
      chunk.push_back(CopyRange{r.dst + off, r.src + off, len});
      room -= len;
      off += len;
      if (off == r.len) {
        ++i;
        off = 0;
      }
    }
    // The client shrank its shared memory under the copy (SIGBUS, see guarded_copy.h).
    if (!GuardedCopies(chunk.data(), chunk.size()))
      return IoResult{BlockStatus::kIoError, EFAULT, "the client's shared memory shrank under the copy"};
    IoResult why;
    if (i < copies.size() && guard.PastDeadline(&why)) return why;
  }
  return guard.Ended();
}

}  // namespace ucm
