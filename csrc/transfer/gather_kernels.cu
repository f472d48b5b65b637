// The page copy kernel behind the staged (KV <-> device staging slot) and zero-copy (KV <-> mapped
// pinned blob) methods: one warp per piece of a page, grid-stride over every piece of a launch.
#include <algorithm>

#include "transfer/copy_warp.cuh"
#include "transfer/gather_kernels.h"

namespace kvtier {
namespace {

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
