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

}  // namespace ucm
