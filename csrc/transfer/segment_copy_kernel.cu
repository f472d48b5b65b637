// The segment copy kernel: the pieces in the kernel's (grid-constant) parameter, each block an
// equal share of the launch's bytes.
#include <atomic>

#include "transfer/segment_copy_kernel.h"
#include "transfer/segment_plan.h"

namespace kvtier {
namespace {

constexpr int kMaxDevices = 64;

template <uint32_t kCap>
struct Batch {
  uint32_t count;  // pieces, in increasing `begin`, none empty
  uint32_t reserved;
  uint64_t total;  // end of the last piece in the byte space
  uint64_t share;  // bytes of the byte space per block (a multiple of 16)
  SegmentPiece pieces[kCap];
};
static_assert(sizeof(Batch<kSegmentLargeLaunch>) <= 32764,
              "a kernel's parameters are at most 32764 bytes");

// Copies `n` bytes from `src` to `dst` with the block's threads: 16-byte words, four loads in
// flight per thread, where both ends are 16-byte aligned; bytes otherwise and for the tail.
__device__ __forceinline__ void CopyRange(char* dst, const char* src, uint64_t n) {
  const unsigned t = threadIdx.x;
  constexpr unsigned kT = kSegmentCopyThreads;
  uint64_t done = 0;
  if (((reinterpret_cast<uint64_t>(dst) | reinterpret_cast<uint64_t>(src)) & 15) == 0) {
    const uint64_t m = n >> 4;
    uint4* d = reinterpret_cast<uint4*>(dst);
    const uint4* s = reinterpret_cast<const uint4*>(src);
    uint64_t i = t;
    for (; i + 3 * kT < m; i += 4 * kT) {
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
  for (uint64_t i = done + t; i < n; i += kT) dst[i] = src[i];
}

template <uint32_t kCap>
__global__ void __launch_bounds__(kSegmentCopyThreads)
    SegmentCopyKernel(const __grid_constant__ Batch<kCap> batch) {
  ForEachBlockPart(batch.pieces, batch.count, batch.total, batch.share, blockIdx.x,
                   [&](uint32_t k, uint64_t off, uint64_t n) {
                     const SegmentPiece& p = batch.pieces[k];
                     CopyRange(reinterpret_cast<char*>(p.dst + off),
                               reinterpret_cast<const char*>(p.src + off), n);
                   });
}

// Blocks of the kernel the current GPU holds at once (cached per GPU; 132 where the runtime
// cannot say).
int ResidentBlocks() {
  static std::atomic<int> cache[kMaxDevices] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0) return 132;
  if (device < kMaxDevices) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int sms = 0, per_sm = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, SegmentCopyKernel<kSegmentLargeLaunch>,
                                                    kSegmentCopyThreads, 0) != cudaSuccess) {
    cudaGetLastError();
    return 132;
  }
  const int blocks = (sms > 0 ? sms : 1) * (per_sm > 0 ? per_sm : 1);
  if (device < kMaxDevices) cache[device].store(blocks, std::memory_order_relaxed);
  return blocks;
}

template <uint32_t kCap>
cudaError_t Launch(const CopySegment* segments, size_t count, uint64_t resident,
                   cudaStream_t stream) {
  Batch<kCap> batch;
  batch.count = static_cast<uint32_t>(count);
  batch.reserved = 0;
  batch.total = PlaceSegmentPieces(segments, count, batch.pieces);
  uint64_t grid = 0;
  ShareSegmentBytes(batch.total, resident, &batch.share, &grid);
  if (grid == 0) return cudaSuccess;
  void* args[] = {&batch};
  return cudaLaunchKernel(reinterpret_cast<const void*>(&SegmentCopyKernel<kCap>),
                          dim3(static_cast<unsigned>(grid)), dim3(kSegmentCopyThreads), args, 0,
                          stream);
}

}  // namespace

cudaError_t LaunchSegmentCopy(const CopySegment* segments, size_t count, cudaStream_t stream) {
  const uint64_t resident = static_cast<uint64_t>(ResidentBlocks());
  for (const SegmentLaunch& l : PlanSegmentLaunches(count)) {
    const cudaError_t err =
        l.small ? Launch<kSegmentSmallLaunch>(segments + l.first, l.count, resident, stream)
                : Launch<kSegmentLargeLaunch>(segments + l.first, l.count, resident, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace kvtier
