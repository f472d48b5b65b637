// Launcher of the segment copy kernel (see segment_copy.h). Only included where KVTIER_HAVE_CUDA
// is 1; knows no framework: device pointers and a cudaStream_t in, the launch's error out.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "transfer/segment_copy.h"

namespace kvtier {

// Pieces are at most this long: a warp copies one piece, so large segments spread over the GPU.
constexpr uint64_t kSegmentPieceBytes = 64 << 10;
constexpr int kSegmentCopyThreads = 256;

// Copies `num_pieces` pieces (CopySegment entries of at most kSegmentPieceBytes each, in device
// memory) with at most `max_blocks` blocks.
cudaError_t LaunchSegmentCopy(const CopySegment* pieces, uint64_t num_pieces, int max_blocks,
                              cudaStream_t stream);

}  // namespace kvtier
