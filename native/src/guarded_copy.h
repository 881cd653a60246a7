// Copies out of and into memory another process shares with us, surviving
// that process shrinking it underneath (ftruncate of its shared memory
// object): a plain memcpy would then die of SIGBUS and take the engine, and
// every other client with it, down. A guarded copy turns the fault into a
// failed copy instead.
#pragma once
#include <cstddef>
#include <cstdint>

namespace ucm {

struct CopyRange {
  uint8_t* dst;
  const uint8_t* src;
  size_t len;
};

// Performs every copy in order; false when one of them faulted (SIGBUS:
// the mapping's backing is gone). Later copies are then not done, earlier
// ones are. Safe to call from any thread; cheap enough per block (one
// sigsetjmp), not meant per byte.
bool GuardedCopies(const CopyRange* copies, size_t n);

}  // namespace ucm
