// The segment copy kernel: the pieces in the kernel's (grid-constant) parameter, each block an
// equal share of the launch's bytes.
#include "transfer/segment_copy_kernel.h"

#include <atomic>

namespace kvtier {
namespace {

static_assert(sizeof(SegmentBatch) <= 32764, "a kernel's parameters are at most 32764 bytes");
constexpr int kMaxDevices = 64;

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

__global__ void __launch_bounds__(kSegmentCopyThreads)
    SegmentCopyKernel(const __grid_constant__ SegmentBatch batch) {
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

// Blocks of the kernel the current GPU holds at once (cached per GPU; 0 on an error).
int ResidentBlocks() {
  static std::atomic<int> cache[kMaxDevices] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0) return 0;
  if (device < kMaxDevices) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int sms = 0, per_sm = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, SegmentCopyKernel,
                                                    kSegmentCopyThreads, 0) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  const int blocks = sms * (per_sm > 0 ? per_sm : 1);
  if (device < kMaxDevices) cache[device].store(blocks, std::memory_order_relaxed);
  return blocks;
}

}  // namespace

cudaError_t LaunchSegmentCopy(SegmentBatch& batch, cudaStream_t stream) {
  if (batch.count == 0 || batch.total == 0) return cudaSuccess;
  const uint64_t resident = static_cast<uint64_t>(ResidentBlocks() > 0 ? ResidentBlocks() : 132);
  uint64_t share = (batch.total + resident - 1) / resident;
  share = share < kSegmentMinShareBytes ? kSegmentMinShareBytes : (share + 15) & ~uint64_t{15};
  batch.share = share;
  const uint64_t grid = (batch.total + share - 1) / share;
  void* args[] = {&batch};
  return cudaLaunchKernel(reinterpret_cast<const void*>(&SegmentCopyKernel),
                          dim3(static_cast<unsigned>(grid)), dim3(kSegmentCopyThreads), args, 0,
                          stream);
}

}  // namespace kvtier
