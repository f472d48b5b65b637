// The segment copy kernel: one block per piece, the pieces in the kernel's (grid-constant)
// parameter.
#include "transfer/segment_copy_kernel.h"

namespace kvtier {
namespace {

static_assert(sizeof(SegmentBatch) <= 32764, "a kernel's parameters are at most 32764 bytes");

__global__ void __launch_bounds__(kSegmentCopyThreads)
    SegmentCopyKernel(const __grid_constant__ SegmentBatch batch) {
  const CopySegment p = batch.pieces[blockIdx.x];
  char* dst = reinterpret_cast<char*>(p.dst);
  const char* src = reinterpret_cast<const char*>(p.src);
  const unsigned t = threadIdx.x;
  constexpr unsigned kT = kSegmentCopyThreads;
  uint64_t done = 0;
  if (((p.dst | p.src) & 15) == 0) {
    const uint64_t m = p.bytes >> 4;
    uint4* d = reinterpret_cast<uint4*>(dst);
    const uint4* s = reinterpret_cast<const uint4*>(src);
    uint64_t i = t;
    for (; i + 3 * kT < m; i += 4 * kT) {  // four loads in flight per thread
      const uint4 v0 = __ldcs(s + i);
      const uint4 v1 = __ldcs(s + i + kT);
      const uint4 v2 = __ldcs(s + i + 2 * kT);
      const uint4 v3 = __ldcs(s + i + 3 * kT);
      __stcs(d + i, v0);
      __stcs(d + i + kT, v1);
      __stcs(d + i + 2 * kT, v2);
      __stcs(d + i + 3 * kT, v3);
    }
    for (; i < m; i += kT) __stcs(d + i, __ldcs(s + i));
    done = m << 4;
  }
  for (uint64_t i = done + t; i < p.bytes; i += kT) dst[i] = src[i];
}

}  // namespace

cudaError_t LaunchSegmentCopy(const SegmentBatch& batch, cudaStream_t stream) {
  if (batch.count == 0) return cudaSuccess;
  void* args[] = {const_cast<SegmentBatch*>(&batch)};
  return cudaLaunchKernel(reinterpret_cast<const void*>(&SegmentCopyKernel), dim3(batch.count),
                          dim3(kSegmentCopyThreads), args, 0, stream);
}

}  // namespace kvtier
