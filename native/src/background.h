// Work the engine does ahead of the transfers, off their path: making pages
// present before a copy needs them. It must never hold up anything else in
// the process, so it takes the address space's lock only briefly at a time.
#pragma once

#include <cstdint>

namespace ucm {

// Makes [p, p+n) present and writable in this process's page tables, as a
// write to each page would, without changing a byte (MADV_POPULATE_WRITE,
// Linux 5.14). In pieces of a few MiB: the kernel holds the address space's
// lock for each call, and every mmap, munmap or mprotect of the process (the
// JS heap's included) waits for it. False when the kernel refused (an older
// one).
bool PopulateWrite(uint8_t* p, uint64_t n);

// Marks the calling thread as one doing bulk work (copies, checksums, file
// I/O, faulting memory in): SCHED_BATCH, so waking up it never preempts a
// running thread, while it keeps its full share of the CPU. Without it, a
// dump of 16 blocks woke every transfer worker inside the engine's own
// native call and the event loop waited behind them: 1.7-4.4 ms for a call
// of 60 us (2-core VM). Best effort: a refusal leaves the thread as it was.
void MarkBulkThread();

}  // namespace ucm
