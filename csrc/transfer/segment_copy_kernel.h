// Launcher of the segment copy kernel (see segment_copy.h). Only included where KVTIER_HAVE_CUDA
// is 1; knows no framework: host-side segments and a cudaStream_t in, the launches' error out.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "transfer/segment_copy.h"

namespace kvtier {

constexpr int kSegmentCopyThreads = 512;
// A block copies at least this many bytes of a launch: a small copy (a few page ids) runs in one
// block, a large one in one wave of equal shares.
constexpr uint64_t kSegmentMinShareBytes = 32 << 10;
// Pieces per launch. They travel as the kernel's parameter (up to 32 KiB of parameters on CUDA
// 12.1+ with sm_70+), so a launch needs no device allocation and no host-to-device copy (which
// would queue behind tier loads on the copy engine). A launch's host cost grows with its
// parameter's size (~45 us for 32 KiB on an H200 host): a copy starts with a small launch, whose
// work covers the host's queueing of the large ones after it.
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

// Copies `segments[0, count)` (none empty) on `stream` of the current GPU, in launches of at most
// kSegmentLargeLaunch pieces. Each launch's byte space is cut into equal shares, one block each,
// as many blocks as the GPU holds at once (fewer for a small copy): one block per fixed-size
// piece left the last wave of a launch part empty, which cost a 512 MiB copy of 2048 pieces a
// fifth of its rate.
cudaError_t LaunchSegmentCopy(const CopySegment* segments, size_t count, cudaStream_t stream);

}  // namespace kvtier
