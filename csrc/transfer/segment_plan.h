// How a segment copy (segment_copy.h, method kernel) is cut into kernel launches, and a launch's
// bytes into equal shares, one block each. Host-only planning, plus the one function the kernel
// and the tests share: which parts of which pieces a block copies. Compiled in every build, so
// the arithmetic is tested without a GPU (segment_plan_test.cc).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "transfer/segment_copy.h"

#if defined(__CUDACC__)
#define KVTIER_HOST_DEVICE __host__ __device__
#else
#define KVTIER_HOST_DEVICE
#endif

namespace kvtier {

// A block copies at least this many bytes of a launch: a small copy (a few page ids) runs in one
// block, a large one in one wave of equal shares.
constexpr uint64_t kSegmentMinShareBytes = 32 << 10;
// Pieces per launch. They travel as the kernel's parameter (up to 32 KiB of parameters on CUDA
// 12.1+ with sm_70+), so a launch needs no device allocation and no host-to-device copy (which
// would queue behind tier loads on the copy engine). A launch's host cost grows with its
// parameter's size: a copy starts with a small launch, whose work covers the host's queueing of
// the large ones after it.
constexpr uint32_t kSegmentSmallLaunch = 64;
constexpr uint32_t kSegmentLargeLaunch = 1000;

// One segment of a launch, placed at `begin` in the launch's byte space (each piece starts at a
// multiple of 16 there, so a share that starts inside a piece keeps the piece's alignment).
struct SegmentPiece {
  uint64_t src;
  uint64_t dst;
  uint64_t bytes;
  uint64_t begin;
};

// One launch of a copy: segments [first, first + count), in a small (kSegmentSmallLaunch) or a
// large (kSegmentLargeLaunch) parameter.
struct SegmentLaunch {
  size_t first;
  size_t count;
  bool small;
};

// The launches of a copy of `count` segments: the first small, then large ones, and a last one
// small where what is left fits.
std::vector<SegmentLaunch> PlanSegmentLaunches(size_t count);

// Places `count` segments in a launch's byte space, each at the next multiple of 16; returns
// the end of the last one (the launch's `total`).
uint64_t PlaceSegmentPieces(const CopySegment* segments, size_t count, SegmentPiece* pieces);

// Bytes per block (a multiple of 16, at least kSegmentMinShareBytes) for a launch of `total`
// bytes on a GPU that holds `resident` blocks at once, and the blocks (at most `resident`).
void ShareSegmentBytes(uint64_t total, uint64_t resident, uint64_t* share, uint64_t* grid);

// Calls visit(k, offset, n) for each part of block `block`'s share [block * share, + share) of
// the byte space: bytes [offset, offset + n) of piece k, pieces in increasing `begin`, none
// empty. What the kernel copies, and what the tests check covers every byte once.
template <typename Visit>
KVTIER_HOST_DEVICE inline void ForEachBlockPart(const SegmentPiece* pieces, uint32_t count,
                                                uint64_t total, uint64_t share, uint64_t block,
                                                Visit&& visit) {
  const uint64_t lo = block * share;
  const uint64_t hi = lo + share < total ? lo + share : total;
  if (lo >= hi || count == 0) return;
  uint32_t a = 0, b = count;  // the last piece that begins at or before `lo`
  while (b - a > 1) {
    const uint32_t m = (a + b) / 2;
    if (pieces[m].begin <= lo) {
      a = m;
    } else {
      b = m;
    }
  }
  for (uint32_t k = a; k < count; ++k) {
    const SegmentPiece& p = pieces[k];
    if (p.begin >= hi) break;
    const uint64_t from = lo > p.begin ? lo : p.begin;
    const uint64_t end = p.begin + p.bytes;
    const uint64_t to = hi < end ? hi : end;
    if (from < to) visit(k, from - p.begin, to - from);  // else `lo` is in the padding after p
  }
}

}  // namespace kvtier
