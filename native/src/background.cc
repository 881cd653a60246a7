#include "background.h"

#include <sched.h>
#include <sys/mman.h>

#include <algorithm>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14
#endif

namespace ucm {

namespace {
constexpr uint64_t kPiece = 4ull << 20;
}  // namespace

void MarkBulkThread() {
  sched_param none{};
  (void)sched_setscheduler(0, SCHED_BATCH, &none);  // 0: this thread (Linux schedules threads)
}

bool PopulateWrite(uint8_t* p, uint64_t n) {
  for (uint64_t off = 0; off < n; off += kPiece) {
    if (madvise(p + off, std::min(kPiece, n - off), MADV_POPULATE_WRITE) != 0) return false;
  }
  return true;
}

}  // namespace ucm
