// The page copy kernel behind the staged (KV <-> device staging slot) and zero-copy (KV <-> mapped
// pinned blob) methods: one warp per piece of a page, grid-stride over every piece of a launch.
#include <algorithm>

#include "transfer/gather_kernels.h"

namespace kvtier {
namespace {

// Streaming (evict-first) loads and stores: the bytes are touched once.
__device__ __forceinline__ void CopyWarp(char* dst, const char* src, uint64_t n, unsigned lane) {
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

__global__ void __launch_bounds__(kPageCopyThreads) PageCopyKernel(PageCopyParams p) {
  const unsigned lane = threadIdx.x & 31;
  const uint64_t warp = (static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const uint64_t num_warps = (static_cast<uint64_t>(gridDim.x) * blockDim.x) >> 5;
  const uint64_t units_per_slab = static_cast<uint64_t>(p.max_pages_per_slab) * p.pieces_per_page;
  const uint64_t total = units_per_slab * p.num_slabs;
  for (uint64_t w = warp; w < total; w += num_warps) {
    const uint64_t k = w / units_per_slab;
    const uint32_t r = static_cast<uint32_t>(w - k * units_per_slab);
    const uint32_t j = r / p.pieces_per_page;
    const uint32_t q = r - j * p.pieces_per_page;
    const SlabDev slab = p.slabs[k];
    if (j >= slab.num_pages) continue;  // warp-uniform
    const SegmentDev seg = p.segments[slab.seg];
    const uint64_t offset = static_cast<uint64_t>(q) * kPageCopyPieceBytes;
    if (offset >= seg.page_bytes) continue;
    const uint64_t n = min(static_cast<uint64_t>(kPageCopyPieceBytes), seg.page_bytes - offset);
    const uint64_t page_id = p.page_ids[slab.page_index + j];
    char* page = reinterpret_cast<char*>(seg.base + page_id * seg.page_stride + offset);
    char* other = reinterpret_cast<char*>(p.other_base + slab.other + j * seg.page_bytes + offset);
    if (p.to_pages) {
      CopyWarp(page, other, n, lane);
    } else {
      CopyWarp(other, page, n, lane);
    }
  }
}

}  // namespace

cudaError_t LaunchPageCopy(const PageCopyParams& p, int max_blocks, cudaStream_t stream) {
  const uint64_t units =
      static_cast<uint64_t>(p.num_slabs) * p.max_pages_per_slab * p.pieces_per_page;
  if (units == 0) return cudaSuccess;
  constexpr uint64_t kWarpsPerBlock = kPageCopyThreads / 32;
  const uint64_t wanted = (units + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const unsigned blocks =
      static_cast<unsigned>(std::max<uint64_t>(1, std::min<uint64_t>(wanted, max_blocks)));
  PageCopyParams params = p;
  void* args[] = {&params};
  // cudaLaunchKernel returns this launch's own error, not a stale one left by another caller.
  return cudaLaunchKernel(reinterpret_cast<const void*>(&PageCopyKernel), dim3(blocks),
                          dim3(kPageCopyThreads), args, 0, stream);
}

}  // namespace kvtier
