// The warp-wide byte copy of the page gather/scatter kernels (gather_kernels.cu).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace kvtier {

// The whole elements of type V (uint4 or unsigned) of [src, src + n): four loads in flight per
// lane, streaming (evict-first) loads and stores since the bytes are touched once. Returns the
// bytes copied. REQUIRES: dst and src aligned to sizeof(V).
template <typename V>
static __device__ __forceinline__ uint64_t CopyWarpVectors(char* dst, const char* src, uint64_t n,
                                                          unsigned lane) {
  const uint64_t m = n / sizeof(V);
  V* d = reinterpret_cast<V*>(dst);
  const V* s = reinterpret_cast<const V*>(src);
  uint64_t i = lane;
  for (; i + 96 < m; i += 128) {
    const V v0 = __ldcs(s + i);
    const V v1 = __ldcs(s + i + 32);
    const V v2 = __ldcs(s + i + 64);
    const V v3 = __ldcs(s + i + 96);
    __stcs(d + i, v0);
    __stcs(d + i + 32, v1);
    __stcs(d + i + 64, v2);
    __stcs(d + i + 96, v3);
  }
  for (; i < m; i += 32) __stcs(d + i, __ldcs(s + i));
  return m * sizeof(V);
}

// A warp copies n bytes: 16-byte vectors where both pointers allow, else 4-byte, then bytes.
static __device__ __forceinline__ void CopyWarp(char* dst, const char* src, uint64_t n, unsigned lane) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src);
  uint64_t done = 0;
  if ((addr & 15) == 0) {
    done = CopyWarpVectors<uint4>(dst, src, n, lane);
  } else if ((addr & 3) == 0) {
    done = CopyWarpVectors<unsigned>(dst, src, n, lane);
  }
  for (uint64_t i = done + lane; i < n; i += 32) dst[i] = src[i];
}

}  // namespace kvtier
