#include "crc32c.h"

#include <cstring>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

namespace ucm {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // reflected Castagnoli polynomial

struct Tables {
  uint32_t t[8][256];
  Tables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ kPoly : c >> 1;
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i) {
      for (int s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFF];
    }
  }
};

const Tables& SoftTables() {
  static const Tables tables;
  return tables;
}

uint32_t SoftCrc(uint32_t crc, const uint8_t* p, size_t len) {
  const Tables& tb = SoftTables();
  while (len >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    v ^= crc;
    crc = tb.t[7][v & 0xFF] ^ tb.t[6][(v >> 8) & 0xFF] ^ tb.t[5][(v >> 16) & 0xFF] ^ tb.t[4][(v >> 24) & 0xFF] ^
          tb.t[3][(v >> 32) & 0xFF] ^ tb.t[2][(v >> 40) & 0xFF] ^ tb.t[1][(v >> 48) & 0xFF] ^ tb.t[0][v >> 56];
    p += 8;
    len -= 8;
  }
  while (len--) crc = (crc >> 8) ^ tb.t[0][(crc ^ *p++) & 0xFF];
  return crc;
}

#if defined(__x86_64__)
// Three independent crc32 chains hide the instruction's 3-cycle latency; the
// partial results are merged with carry-less multiplication by x^(8*stride).
__attribute__((target("sse4.2"))) uint32_t HwCrcSerial(uint32_t crc, const uint8_t* p, size_t len) {
  uint64_t c = crc;
  while (len >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    c = _mm_crc32_u64(c, v);
    p += 8;
    len -= 8;
  }
  uint32_t c32 = static_cast<uint32_t>(c);
  while (len--) c32 = _mm_crc32_u8(c32, *p++);
  return c32;
}

// Multiplies a (a CRC value) by x^(n*8) modulo the polynomial: "shift" a CRC
// over n zero bytes without reading them. Used to merge interleaved chains.
uint32_t GfMulXPow(uint32_t a, uint32_t b) {  // a*b mod P, both reflected
  uint32_t prod = 0;
  for (int i = 0; i < 32; ++i) {
    if (b & 0x80000000u) prod ^= a;
    b <<= 1;
    a = (a & 1) ? (a >> 1) ^ kPoly : a >> 1;
  }
  return prod;
}

uint32_t XPow8n(size_t n) {       // x^(8n) mod P in reflected form, by squaring
  uint32_t result = 0x80000000u;  // x^0
  uint32_t base = 0x00800000u;    // x^8
  while (n) {
    if (n & 1) result = GfMulXPow(result, base);
    base = GfMulXPow(base, base);
    n >>= 1;
  }
  return result;
}

constexpr size_t kStripe = 8192;  // bytes per chain per round

__attribute__((target("sse4.2"))) uint32_t HwCrc(uint32_t crc, const uint8_t* p, size_t len) {
  static const uint32_t shift = XPow8n(kStripe);
  while (len >= 3 * kStripe) {
    uint64_t a = crc, b = 0, c = 0;
    const uint8_t* pa = p;
    const uint8_t* pb = p + kStripe;
    const uint8_t* pc = p + 2 * kStripe;
    for (size_t i = 0; i < kStripe; i += 8) {
      uint64_t va, vb, vc;
      std::memcpy(&va, pa + i, 8);
      std::memcpy(&vb, pb + i, 8);
      std::memcpy(&vc, pc + i, 8);
      a = _mm_crc32_u64(a, va);
      b = _mm_crc32_u64(b, vb);
      c = _mm_crc32_u64(c, vc);
    }
    // crc(A|B|C) = shift(shift(a) ^ b) ^ c, where chains b and c started at 0.
    uint32_t ab = GfMulXPow(static_cast<uint32_t>(a), shift) ^ static_cast<uint32_t>(b);
    crc = GfMulXPow(ab, shift) ^ static_cast<uint32_t>(c);
    p += 3 * kStripe;
    len -= 3 * kStripe;
  }
  return HwCrcSerial(crc, p, len);
}

bool DetectHw() { return __builtin_cpu_supports("sse4.2"); }
#else
bool DetectHw() { return false; }
uint32_t HwCrc(uint32_t crc, const uint8_t* p, size_t len) { return SoftCrc(crc, p, len); }
#endif

}  // namespace

bool Crc32cHardware() {
  static const bool hw = DetectHw();
  return hw;
}

uint32_t Crc32c(uint32_t crc, const void* data, size_t len) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  crc = ~crc;
  crc = Crc32cHardware() ? HwCrc(crc, p, len) : SoftCrc(crc, p, len);
  return ~crc;
}

}  // namespace ucm
