// Launcher of the segment copy kernel (see segment_copy.h). Only included where KVTIER_HAVE_CUDA
// is 1; knows no framework: a host-side batch and a cudaStream_t in, the launch's error out.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "transfer/segment_copy.h"

namespace kvtier {

constexpr int kSegmentCopyThreads = 512;
// A block copies at least this many bytes of a launch: a small copy (a few page ids) runs in one
// block, a large one in one wave of equal shares.
constexpr uint64_t kSegmentMinShareBytes = 32 << 10;
// Pieces per launch: the batch travels as the kernel's parameter (up to 32 KiB of parameters on
// CUDA 12.1+ with sm_70+), so a launch needs no device allocation and no host-to-device copy.
constexpr uint32_t kSegmentPiecesPerLaunch = 1000;

// One segment of a launch, placed at `begin` in the launch's byte space (each piece starts at a
// multiple of 16 there, so a share that starts inside a piece keeps the piece's alignment).
struct SegmentPiece {
  uint64_t src;
  uint64_t dst;
  uint64_t bytes;
  uint64_t begin;
};

struct SegmentBatch {
  uint32_t count;     // pieces, in increasing `begin`, none empty
  uint32_t reserved;
  uint64_t total;     // end of the last piece in the byte space
  uint64_t share;     // bytes of the byte space per block (a multiple of 16); set by the launcher
  SegmentPiece pieces[kSegmentPiecesPerLaunch];
};

// Appends a segment to `batch` (not full, `bytes` > 0), placing it after the last piece.
inline void AddPiece(SegmentBatch& batch, uint64_t src, uint64_t dst, uint64_t bytes) {
  const uint64_t begin = (batch.total + 15) & ~uint64_t{15};
  batch.pieces[batch.count++] = SegmentPiece{src, dst, bytes, begin};
  batch.total = begin + bytes;
}

// Copies the batch's pieces on `stream` (of the current GPU). The byte space is cut into equal
// shares, one block each, as many blocks as the GPU holds at once (fewer for a small batch):
// one block a piece left the last wave of a launch part empty, which cost a 512 MiB copy of
// 2048 pieces a fifth of its rate.
cudaError_t LaunchSegmentCopy(SegmentBatch& batch, cudaStream_t stream);

}  // namespace kvtier
