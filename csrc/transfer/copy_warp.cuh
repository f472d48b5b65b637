// The warp-wide byte copy of the page gather/scatter kernels (gather_kernels.cu).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace kvtier {

// Streaming (evict-first) loads and stores: the bytes are touched once.
static __device__ __forceinline__ void CopyWarp(char* dst, const char* src, uint64_t n,
                                                unsigned lane) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src);
  uint64_t done = 0;
  if ((addr & 15) == 0) {
    const uint64_t m = n >> 4;
    uint4* d = reinterpret_cast<uint4*>(dst);
    const uint4* s = reinterpret_cast<const uint4*>(src);
    uint64_t i = lane;
    for (; i + 96 < m; i += 128) {  // four loads in flight per lane
      const uint4 v0 = __ldcs(s + i);
      const uint4 v1 = __ldcs(s + i + 32);
      const uint4 v2 = __ldcs(s + i + 64);
      const uint4 v3 = __ldcs(s + i + 96);
      __stcs(d + i, v0);
      __stcs(d + i + 32, v1);
      __stcs(d + i + 64, v2);
      __stcs(d + i + 96, v3);
    }
    for (; i < m; i += 32) __stcs(d + i, __ldcs(s + i));
    done = m << 4;
  } else if ((addr & 3) == 0) {
    const uint64_t m = n >> 2;
    unsigned* d = reinterpret_cast<unsigned*>(dst);
    const unsigned* s = reinterpret_cast<const unsigned*>(src);
    uint64_t i = lane;
    for (; i + 96 < m; i += 128) {
      const unsigned v0 = __ldcs(s + i);
      const unsigned v1 = __ldcs(s + i + 32);
      const unsigned v2 = __ldcs(s + i + 64);
      const unsigned v3 = __ldcs(s + i + 96);
      __stcs(d + i, v0);
      __stcs(d + i + 32, v1);
      __stcs(d + i + 64, v2);
      __stcs(d + i + 96, v3);
    }
    for (; i < m; i += 32) __stcs(d + i, __ldcs(s + i));
    done = m << 2;
  }
  for (uint64_t i = done + lane; i < n; i += 32) dst[i] = src[i];
}

}  // namespace kvtier
