// CRC32C (Castagnoli) over byte ranges. Uses the SSE4.2 crc32 instruction
// when the CPU has it, a slicing-by-8 table otherwise.
#pragma once
#include <cstddef>
#include <cstdint>

namespace ucm {

// Extends `crc` (0 for a fresh checksum) over [data, data + len).
uint32_t Crc32c(uint32_t crc, const void* data, size_t len);

// True when the hardware path is in use (reported in stats).
bool Crc32cHardware();

}  // namespace ucm
