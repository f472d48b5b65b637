// The segment copy kernel: the pieces in the kernel's (grid-constant) parameter, each block an
// equal share of the launch's bytes.
#include "transfer/segment_copy_kernel.h"

#include <atomic>

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
  const uint64_t lo = static_cast<uint64_t>(blockIdx.x) * batch.share;
  const uint64_t hi = min(lo + batch.share, batch.total);
  if (lo >= hi) return;
  // The last piece that begins at or before `lo` (pieces are in increasing `begin`).
  uint32_t a = 0, b = batch.count;
  while (b - a > 1) {
    const uint32_t m = (a + b) / 2;
    if (batch.pieces[m].begin <= lo) {
      a = m;
    } else {
      b = m;
    }
  }
  for (uint32_t k = a; k < batch.count; ++k) {
    const SegmentPiece& p = batch.pieces[k];
    if (p.begin >= hi) break;
    const uint64_t from = max(lo, p.begin);
    const uint64_t to = min(hi, p.begin + p.bytes);
    if (from >= to) continue;  // `lo` in the padding after this piece
    const uint64_t off = from - p.begin;
    CopyRange(reinterpret_cast<char*>(p.dst + off), reinterpret_cast<const char*>(p.src + off),
              to - from);
  }
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
  uint64_t end = 0;
  for (size_t i = 0; i < count; ++i) {
    const uint64_t begin = (end + 15) & ~uint64_t{15};
    batch.pieces[i] = SegmentPiece{segments[i].src, segments[i].dst, segments[i].bytes, begin};
    end = begin + segments[i].bytes;
  }
  batch.total = end;
  uint64_t share = (end + resident - 1) / resident;
  share = share < kSegmentMinShareBytes ? kSegmentMinShareBytes : (share + 15) & ~uint64_t{15};
  batch.share = share;
  const uint64_t grid = (end + share - 1) / share;
  void* args[] = {&batch};
  return cudaLaunchKernel(reinterpret_cast<const void*>(&SegmentCopyKernel<kCap>),
                          dim3(static_cast<unsigned>(grid)), dim3(kSegmentCopyThreads), args, 0,
                          stream);
}

}  // namespace

cudaError_t LaunchSegmentCopy(const CopySegment* segments, size_t count, cudaStream_t stream) {
  const uint64_t resident = static_cast<uint64_t>(ResidentBlocks());
  size_t i = 0;
  while (i < count) {
    const size_t left = count - i;
    // The first launch (and a last one that fits) is small and cheap to queue.
    const bool small = i == 0 || left <= kSegmentSmallLaunch;
    const size_t n = small ? std::min<size_t>(left, kSegmentSmallLaunch)
                           : std::min<size_t>(left, kSegmentLargeLaunch);
    const cudaError_t err =
        small ? Launch<kSegmentSmallLaunch>(segments + i, n, resident, stream)
              : Launch<kSegmentLargeLaunch>(segments + i, n, resident, stream);
    if (err != cudaSuccess) return err;
    i += n;
  }
  return cudaSuccess;
}

}  // namespace kvtier
