// CRC32C: SSE4.2 instruction path (3-way interleaved) and a slicing-by-8 software fallback.
//
// The hardware path follows Mark Adler's crc32c.c (zlib license): three independent crc32
// streams hide the instruction's 3-cycle latency, and their CRCs are merged by multiplying with
// the "append N zero bytes" operator, precomputed as byte tables for two block lengths.
#include "storage/crc32c.h"

#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <nmmintrin.h>
#define KVTIER_CRC32C_X86 1
#else
#define KVTIER_CRC32C_X86 0
#endif

namespace kvtier {
namespace {

constexpr uint32_t kPoly = 0x82F63B78;  // CRC-32C, reflected

struct SoftwareTables {
  uint32_t t[8][256];
  SoftwareTables() {
    for (uint32_t n = 0; n < 256; ++n) {
      uint32_t c = n;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ kPoly : c >> 1;
      t[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; ++n) {
      for (int k = 1; k < 8; ++k) t[k][n] = (t[k - 1][n] >> 8) ^ t[0][t[k - 1][n] & 0xff];
    }
  }
};

const SoftwareTables& Tables() {
  static const SoftwareTables tables;
  return tables;
}

uint32_t Load32(const unsigned char* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;  // little-endian hosts only (x86-64, aarch64)
}

#if KVTIER_CRC32C_X86

// GF(2) 32x32 matrices, as in zlib's crc32_combine.
uint32_t Gf2MatrixTimes(const uint32_t* mat, uint32_t vec) {
  uint32_t sum = 0;
  while (vec) {
    if (vec & 1) sum ^= *mat;
    vec >>= 1;
    ++mat;
  }
  return sum;
}

void Gf2MatrixSquare(uint32_t* square, const uint32_t* mat) {
  for (int n = 0; n < 32; ++n) square[n] = Gf2MatrixTimes(mat, mat[n]);
}

// The operator that appends `len` zero bytes to a CRC (len a power of two).
void ZerosOperator(uint32_t* even, size_t len) {
  uint32_t odd[32];
  odd[0] = kPoly;  // the operator for one zero bit
  uint32_t row = 1;
  for (int n = 1; n < 32; ++n) {
    odd[n] = row;
    row <<= 1;
  }
  Gf2MatrixSquare(even, odd);  // 2 zero bits
  Gf2MatrixSquare(odd, even);  // 4 zero bits
  do {
    Gf2MatrixSquare(even, odd);  // first pass: 1 zero byte
    len >>= 1;
    if (len == 0) return;
    Gf2MatrixSquare(odd, even);
    len >>= 1;
  } while (len);
  for (int n = 0; n < 32; ++n) even[n] = odd[n];
}

struct ShiftTable {
  uint32_t t[4][256];
  explicit ShiftTable(size_t len) {
    uint32_t op[32];
    ZerosOperator(op, len);
    for (uint32_t n = 0; n < 256; ++n) {
      t[0][n] = Gf2MatrixTimes(op, n);
      t[1][n] = Gf2MatrixTimes(op, n << 8);
      t[2][n] = Gf2MatrixTimes(op, n << 16);
      t[3][n] = Gf2MatrixTimes(op, n << 24);
    }
  }
  uint32_t Shift(uint32_t crc) const {
    return t[0][crc & 0xff] ^ t[1][(crc >> 8) & 0xff] ^ t[2][(crc >> 16) & 0xff] ^ t[3][crc >> 24];
  }
};

constexpr size_t kLong = 8192;
constexpr size_t kShort = 256;

const ShiftTable& LongShift() {
  static const ShiftTable table(kLong);
  return table;
}
const ShiftTable& ShortShift() {
  static const ShiftTable table(kShort);
  return table;
}

uint64_t Load64(const unsigned char* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

__attribute__((target("sse4.2"))) uint32_t Crc32cHardware(uint32_t crc, const void* data,
                                                          size_t len) {
  const unsigned char* next = static_cast<const unsigned char*>(data);
  uint64_t crc0 = crc ^ 0xffffffffu;
  while (len && (reinterpret_cast<uintptr_t>(next) & 7) != 0) {
    crc0 = _mm_crc32_u8(static_cast<uint32_t>(crc0), *next++);
    --len;
  }
  const ShiftTable& long_shift = LongShift();
  while (len >= kLong * 3) {
    uint64_t crc1 = 0, crc2 = 0;
    const unsigned char* end = next + kLong;
    do {
      crc0 = _mm_crc32_u64(crc0, Load64(next));
      crc1 = _mm_crc32_u64(crc1, Load64(next + kLong));
      crc2 = _mm_crc32_u64(crc2, Load64(next + kLong * 2));
      next += 8;
    } while (next < end);
    crc0 = long_shift.Shift(static_cast<uint32_t>(crc0)) ^ crc1;
    crc0 = long_shift.Shift(static_cast<uint32_t>(crc0)) ^ crc2;
    next += kLong * 2;
    len -= kLong * 3;
  }
  const ShiftTable& short_shift = ShortShift();
  while (len >= kShort * 3) {
    uint64_t crc1 = 0, crc2 = 0;
    const unsigned char* end = next + kShort;
    do {
      crc0 = _mm_crc32_u64(crc0, Load64(next));
      crc1 = _mm_crc32_u64(crc1, Load64(next + kShort));
      crc2 = _mm_crc32_u64(crc2, Load64(next + kShort * 2));
      next += 8;
    } while (next < end);
    crc0 = short_shift.Shift(static_cast<uint32_t>(crc0)) ^ crc1;
    crc0 = short_shift.Shift(static_cast<uint32_t>(crc0)) ^ crc2;
    next += kShort * 2;
    len -= kShort * 3;
  }
  while (len >= 8) {
    crc0 = _mm_crc32_u64(crc0, Load64(next));
    next += 8;
    len -= 8;
  }
  while (len) {
    crc0 = _mm_crc32_u8(static_cast<uint32_t>(crc0), *next++);
    --len;
  }
  return static_cast<uint32_t>(crc0) ^ 0xffffffffu;
}

bool DetectSse42() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return false;
  return (ecx & bit_SSE4_2) != 0;
}

#endif  // KVTIER_CRC32C_X86

}  // namespace

uint32_t Crc32cSoftware(uint32_t crc, const void* data, size_t len) {
  const SoftwareTables& tb = Tables();
  const unsigned char* p = static_cast<const unsigned char*>(data);
  uint32_t c = crc ^ 0xffffffffu;
  while (len && (reinterpret_cast<uintptr_t>(p) & 7) != 0) {
    c = tb.t[0][(c ^ *p++) & 0xff] ^ (c >> 8);
    --len;
  }
  while (len >= 8) {
    uint32_t lo = c ^ Load32(p);
    uint32_t hi = Load32(p + 4);
    c = tb.t[7][lo & 0xff] ^ tb.t[6][(lo >> 8) & 0xff] ^ tb.t[5][(lo >> 16) & 0xff] ^
        tb.t[4][lo >> 24] ^ tb.t[3][hi & 0xff] ^ tb.t[2][(hi >> 8) & 0xff] ^
        tb.t[1][(hi >> 16) & 0xff] ^ tb.t[0][hi >> 24];
    p += 8;
    len -= 8;
  }
  while (len--) c = tb.t[0][(c ^ *p++) & 0xff] ^ (c >> 8);
  return c ^ 0xffffffffu;
}

bool Crc32cHardwareAvailable() {
#if KVTIER_CRC32C_X86
  static const bool available = DetectSse42();
  return available;
#else
  return false;
#endif
}

uint32_t Crc32c(uint32_t crc, const void* data, size_t len) {
#if KVTIER_CRC32C_X86
  if (Crc32cHardwareAvailable()) return Crc32cHardware(crc, data, len);
#endif
  return Crc32cSoftware(crc, data, len);
}

}  // namespace kvtier
