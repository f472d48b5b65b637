// The host half of fp8_rows: the same bytes as the GPU kernels (and as kvtier.codecs.Fp8Codec's
// torch path), computed by the calling thread in plain C++. Every rounding is done on the bits,
// so the result does not depend on the CPU's half-precision instructions: float32 division and
// multiplication as IEEE round to nearest, then bfloat16 / float16 / e4m3 by round to nearest
// even on the float32's bits; the loops are written so that compilers vectorize them.
//
// Included by fp8_rows_host.cc (built for the baseline instruction set) and by
// fp8_rows_host_avx2.cc (built with AVX2 where the compiler targets x86-64): everything here has
// internal linkage, so each file keeps its own copy, and each defines its entry points around
// EncodeRows / DecodeRows. Both are built without contracting multiplies and adds into FMAs,
// which would round differently.
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "codec/fp8_rows.h"

namespace kvtier {
namespace {

constexpr float kFp8Max = 448.0f;  // e4m3fn's largest finite value

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// A float32 in [0, 2^22) rounded to the nearest integer, ties to even: adding 2^23 leaves no
// fraction bits, so the addition itself rounds (IEEE round to nearest).
float RoundToInt(float v) { return (v + 8388608.0f) - 8388608.0f; }

float BFloat16ToFloat(uint16_t b) { return FromBits(static_cast<uint32_t>(b) << 16); }
uint16_t FloatToBFloat16(float f) {  // round to nearest even; values here are never NaN
  const uint32_t u = Bits(f);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in float32
    const float v = static_cast<float>(mant) * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  if (exp == 31) return FromBits(sign | 0x7F800000u | (mant << 13));  // inf / NaN
  return FromBits(sign | ((exp + 112) << 23) | (mant << 13));
}
uint16_t FloatToHalf(float f) {  // round to nearest even, overflow to inf
  const uint32_t u = Bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a >= 0x7F800000u) return sign | (a > 0x7F800000u ? 0x7E00 : 0x7C00);
  if (a >= 0x477FF000u) return sign | 0x7C00;  // 65520 and above round to inf
  if (a < 0x38800000u) {                       // below 2^-14: units of 2^-24, exact scaling
    return sign | static_cast<uint16_t>(RoundToInt(FromBits(a) * 16777216.0f));
  }
  const uint32_t r = a + 0xFFFu + ((a >> 13) & 1u) - (112u << 23);
  return sign | static_cast<uint16_t>(r >> 13);
}

constexpr uint32_t kFp8MaxBits = 0x43E00000u;  // 448.0f

// e4m3fn of a finite float32 clamped to [-448, 448]: round to nearest even, the sign kept (-0.0
// too). The clamp is an integer min of the magnitude's bits (a float's magnitude orders as its
// bits), and both cases are computed and one selected by a mask, without a branch, so the loops
// vectorize.
uint8_t ClampedFloatToE4m3(float f) {
  const uint32_t u = Bits(f);
  const uint32_t sign = (u >> 24) & 0x80u;
  uint32_t a = u & 0x7FFFFFFFu;
  a = a < kFp8MaxBits ? a : kFp8MaxBits;
  // below 2^-6: subnormals, units of 2^-9 (8 of them is 2^-6, code 8)
  const uint32_t sub = static_cast<uint32_t>(RoundToInt(FromBits(a) * 512.0f));
  const uint32_t r = a + 0x7FFFFu + ((a >> 20) & 1u);  // the mantissa rounded to 3 bits
  const uint32_t normal = (((r >> 23) - 120u) << 3) | ((r >> 20) & 7u);
  const uint32_t is_sub = 0u - static_cast<uint32_t>(a < 0x3C800000u);  // all ones or zero
  return static_cast<uint8_t>(sign | (sub & is_sub) | (normal & ~is_sub));
}
float E4m3ToFloat(uint8_t q) {
  const uint32_t exp = (q >> 3) & 0xFu, mant = q & 7u;
  float v;
  if (exp == 0) {
    v = static_cast<float>(mant) * (1.0f / 512.0f);
  } else if (exp == 15 && mant == 7) {
    v = NAN;
  } else {
    v = FromBits(((exp + 120u) << 23) | (mant << 20));
  }
  return (q & 0x80u) ? -v : v;
}

// The element dtypes, as 16- or 32-bit words. A value's magnitude orders as its bits without the
// sign (AbsBits), infinity at kInfBits and every NaN above it: a row's largest magnitude, and
// whether it is finite, come from an integer max, which vectorizes.
struct Bf16 {
  using Word = uint16_t;
  static constexpr uint32_t kInfBits = 0x7F80u;
  static float Load(Word w) { return BFloat16ToFloat(w); }
  static Word Store(float f) { return FloatToBFloat16(f); }
  static uint32_t AbsBits(Word w) { return w & 0x7FFFu; }
  static float FromAbsBits(uint32_t b) { return Load(static_cast<Word>(b)); }
};
struct F16 {
  using Word = uint16_t;
  static constexpr uint32_t kInfBits = 0x7C00u;
  static float Load(Word w) { return HalfToFloat(w); }
  static Word Store(float f) { return FloatToHalf(f); }
  static uint32_t AbsBits(Word w) { return w & 0x7FFFu; }
  static float FromAbsBits(uint32_t b) { return Load(static_cast<Word>(b)); }
};
struct F32 {
  using Word = float;
  static constexpr uint32_t kInfBits = 0x7F800000u;
  static float Load(Word w) { return w; }
  static Word Store(float f) { return f; }
  static uint32_t AbsBits(Word w) { return Bits(w) & 0x7FFFFFFFu; }
  static float FromAbsBits(uint32_t b) { return FromBits(b); }
};

// The scale a row of largest magnitude `amax` stores and divides by: amax / 448, at least the
// smallest normal float32, rounded up to a bfloat16 so the row's largest value still fits.
struct ScaleF32 {
  using Word = float;
  static float Make(float amax, Word* stored) {
    *stored = std::fmax(amax / kFp8Max, FLT_MIN);
    return *stored;
  }
  static float Load(Word w) { return w; }
};
struct ScaleBf16 {
  using Word = uint16_t;
  static float Make(float amax, Word* stored) {
    const float scale = std::fmax(amax / kFp8Max, FLT_MIN);
    uint16_t b = FloatToBFloat16(scale);
    if (BFloat16ToFloat(b) < scale) ++b;
    *stored = b;
    return BFloat16ToFloat(b);
  }
  static float Load(Word w) { return BFloat16ToFloat(w); }
};

// Encodes global rows [begin, end) of the stack (row r of chunk c is c * rows + r); ok[] and the
// headers are the caller's (EncodeRows). A refused chunk's flag is cleared and its later rows in
// the range skipped.
template <typename T, typename S>
struct EncodeOp {
  static void Run(const Fp8Rows& g, const uint8_t* raw, uint8_t* blobs, uint8_t* ok, uint64_t begin,
                  uint64_t end) {
    const uint64_t row_bytes = g.row_elems * sizeof(typename T::Word);
    for (uint64_t row = begin; row < end; ++row) {
      const uint64_t c = row / g.rows, r = row % g.rows;
      uint8_t* blob = blobs + c * g.blob_stride;
      const auto* x = reinterpret_cast<const typename T::Word*>(
          Fp8RawRow(g, reinterpret_cast<uint64_t>(raw), c, r, row_bytes));
      uint32_t amax_bits = 0;
      for (uint32_t i = 0; i < g.row_elems; ++i) {
        const uint32_t b = T::AbsBits(x[i]);
        amax_bits = b > amax_bits ? b : amax_bits;
      }
      if (amax_bits >= T::kInfBits) {  // NaN or inf (torch's amax keeps a NaN): refused, the
        __atomic_store_n(&ok[c], 0, __ATOMIC_RELAXED);  // blob's bytes do not matter
        row = (c + 1) * g.rows - 1;
        continue;
      }
      typename S::Word stored;
      const float scale = S::Make(T::FromAbsBits(amax_bits), &stored);
      std::memcpy(blob + g.scale_offset + r * sizeof(stored), &stored, sizeof(stored));
      uint8_t* q = blob + g.payload_offset + r * g.row_elems;
      const uint32_t n = g.row_elems;  // a local: the byte stores below may alias g
      for (uint32_t i = 0; i < n; ++i) {
        q[i] = ClampedFloatToE4m3(T::Load(x[i]) / scale);  // finite: the row's amax is
      }
    }
  }
};

// Every e4m3 byte's float32 value.
struct E4m3Table {
  float v[256];
  E4m3Table() {
    for (int q = 0; q < 256; ++q) v[q] = E4m3ToFloat(static_cast<uint8_t>(q));
  }
};

// The blobs a decode with a header check decodes (all of them without one): see Fp8Rows.
uint64_t BlobsToDecode(const Fp8Rows& g, const uint8_t* blobs) {
  if (!g.header_bytes) return g.chunks;
  auto* stop = reinterpret_cast<uint32_t*>(g.stop);
  uint64_t n = 0;
  if (!*stop) {
    const auto* header = reinterpret_cast<const uint8_t*>(g.header);
    while (n < g.chunks && std::memcmp(blobs + n * g.blob_stride, header, g.header_bytes) == 0) ++n;
    if (n < g.chunks) *stop = 1;
  }
  *reinterpret_cast<uint32_t*>(g.decoded) = static_cast<uint32_t>(n);
  return n;
}

// Decodes global rows [begin, end) of the stack into the raw chunks.
template <typename T, typename S>
struct DecodeOp {
  static void Run(const Fp8Rows& g, const uint8_t* blobs, uint8_t* raw, uint64_t begin,
                  uint64_t end) {
    static const E4m3Table table;
    const uint64_t row_bytes = g.row_elems * sizeof(typename T::Word);
    for (uint64_t row = begin; row < end; ++row) {
      const uint64_t c = row / g.rows, r = row % g.rows;
      const uint8_t* blob = blobs + c * g.blob_stride;
      typename S::Word stored;
      std::memcpy(&stored, blob + g.scale_offset + r * sizeof(stored), sizeof(stored));
      const float scale = S::Load(stored);
      const uint8_t* q = blob + g.payload_offset + r * g.row_elems;
      auto* x = reinterpret_cast<typename T::Word*>(
          Fp8RawRow(g, reinterpret_cast<uint64_t>(raw), c, r, row_bytes));
      const uint32_t n = g.row_elems;  // a local: the stores below may alias g
      for (uint32_t i = 0; i < n; ++i) x[i] = T::Store(table.v[q[i]] * scale);
    }
  }
};

// Rows a thread of the host pass takes at least (~1 MiB of bf16 KV at 128 elements a row): a
// smaller call runs on the calling thread alone.
constexpr uint64_t kMinRowsPerThread = 4096;

// Runs f(begin, end) over [0, total) split into up to `threads` ranges, the first on the calling
// thread and the others on threads started here (a range whose thread cannot be started runs on
// the calling thread); returns once all have ended.
template <typename F>
void ForRowRanges(uint64_t total, uint32_t threads, F f) {
  const uint64_t n = std::min<uint64_t>(std::max<uint32_t>(threads, 1u),
                                        std::max<uint64_t>(total / kMinRowsPerThread, 1));
  std::vector<std::thread> workers;
  std::vector<std::pair<uint64_t, uint64_t>> here;
  for (uint64_t i = 1; i < n; ++i) {
    const uint64_t b = total * i / n, e = total * (i + 1) / n;
    try {
      workers.emplace_back(f, b, e);
    } catch (const std::system_error&) {
      here.emplace_back(b, e);
    }
  }
  f(uint64_t{0}, total / n);
  for (const auto& [b, e] : here) f(b, e);
  for (auto& w : workers) w.join();
}

template <template <typename, typename> class F>
struct Dispatch {
  template <typename... Args>
  static void Run(const Fp8Rows& g, Args... args) {
    const bool bf16 = g.scale == Fp8Scale::kBFloat16;
    switch (g.elem) {
      case Fp8Elem::kBFloat16:
        return bf16 ? F<Bf16, ScaleBf16>::Run(g, args...) : F<Bf16, ScaleF32>::Run(g, args...);
      case Fp8Elem::kFloat16:
        return bf16 ? F<F16, ScaleBf16>::Run(g, args...) : F<F16, ScaleF32>::Run(g, args...);
      case Fp8Elem::kFloat32:
        return bf16 ? F<F32, ScaleBf16>::Run(g, args...) : F<F32, ScaleF32>::Run(g, args...);
    }
  }
};

void EncodeRows(const Fp8Rows& g, const void* raw, void* blobs, uint8_t* ok) {
  auto* out = static_cast<uint8_t*>(blobs);
  const uint64_t scales_end =
      g.scale_offset + g.rows * (g.scale == Fp8Scale::kBFloat16 ? 2 : sizeof(float));
  for (uint64_t c = 0; c < g.chunks; ++c) {
    ok[c] = 1;
    if (g.header_bytes) {
      uint8_t* blob = out + c * g.blob_stride;
      std::memcpy(blob, reinterpret_cast<const void*>(g.header), g.header_bytes);
      std::memset(blob + scales_end, 0, g.payload_offset - scales_end);
    }
  }
  ForRowRanges(g.chunks * g.rows, g.host_threads, [&](uint64_t begin, uint64_t end) {
    Dispatch<EncodeOp>::Run(g, static_cast<const uint8_t*>(raw), out, ok, begin, end);
  });
}

void DecodeRows(const Fp8Rows& g, const void* blobs, void* raw) {
  const auto* in = static_cast<const uint8_t*>(blobs);
  const uint64_t chunks = BlobsToDecode(g, in);
  ForRowRanges(chunks * g.rows, g.host_threads, [&](uint64_t begin, uint64_t end) {
    Dispatch<DecodeOp>::Run(g, in, static_cast<uint8_t*>(raw), begin, end);
  });
}

}  // namespace
}  // namespace kvtier
