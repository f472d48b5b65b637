// The segment copy kernel: one warp per piece, grid-stride over the launch's pieces.
#include <algorithm>

#include "transfer/copy_warp.cuh"
#include "transfer/segment_copy_kernel.h"

namespace kvtier {
namespace {

__global__ void __launch_bounds__(kSegmentCopyThreads)
    SegmentCopyKernel(const CopySegment* pieces, uint64_t num_pieces) {
  const unsigned lane = threadIdx.x & 31;
  const uint64_t warp = (static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const uint64_t num_warps = (static_cast<uint64_t>(gridDim.x) * blockDim.x) >> 5;
  for (uint64_t w = warp; w < num_pieces; w += num_warps) {
    const CopySegment p = pieces[w];
    CopyWarp(reinterpret_cast<char*>(p.dst), reinterpret_cast<const char*>(p.src), p.bytes, lane);
  }
}

}  // namespace

cudaError_t LaunchSegmentCopy(const CopySegment* pieces, uint64_t num_pieces, int max_blocks,
                              cudaStream_t stream) {
  if (num_pieces == 0) return cudaSuccess;
  constexpr uint64_t kWarpsPerBlock = kSegmentCopyThreads / 32;
  const uint64_t wanted = (num_pieces + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const unsigned blocks =
      static_cast<unsigned>(std::max<uint64_t>(1, std::min<uint64_t>(wanted, max_blocks)));
  const CopySegment* p = pieces;
  uint64_t n = num_pieces;
  void* args[] = {&p, &n};
  return cudaLaunchKernel(reinterpret_cast<const void*>(&SegmentCopyKernel), dim3(blocks),
                          dim3(kSegmentCopyThreads), args, 0, stream);
}

}  // namespace kvtier
