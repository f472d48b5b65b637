// Launcher of the segment copy kernel (see segment_copy.h). Only included where KVTIER_HAVE_CUDA
// is 1; knows no framework: a host-side batch and a cudaStream_t in, the launch's error out.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "transfer/segment_copy.h"

namespace kvtier {

// A piece is at most this long; a block copies one piece.
constexpr uint64_t kSegmentPieceBytes = 256 << 10;
constexpr int kSegmentCopyThreads = 512;
// Pieces per launch: the batch travels as the kernel's parameter (up to 32 KiB of parameters on
// CUDA 12.1+ with sm_70+), so a launch needs no device allocation and no host-to-device copy.
constexpr uint32_t kSegmentPiecesPerLaunch = 1280;

struct SegmentBatch {
  uint32_t count;
  uint32_t reserved;
  CopySegment pieces[kSegmentPiecesPerLaunch];
};

// Copies the batch's pieces (one block each) on `stream`.
cudaError_t LaunchSegmentCopy(const SegmentBatch& batch, cudaStream_t stream);

}  // namespace kvtier
