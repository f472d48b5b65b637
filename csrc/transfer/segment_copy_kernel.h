// Launcher of the segment copy kernel (see segment_copy.h; the launches and the blocks' shares
// are planned in segment_plan.h). Only included where KVTIER_HAVE_CUDA is 1; knows no framework:
// host-side segments and a cudaStream_t in, the launches' error out.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "transfer/segment_copy.h"

namespace kvtier {

constexpr int kSegmentCopyThreads = 512;

// Copies `segments[0, count)` (none empty) on `stream` of the current GPU, in the launches
// PlanSegmentLaunches gives. Each launch's byte space is cut into equal shares, one block each,
// as many blocks as the GPU holds at once (fewer for a small copy): one block per fixed-size
// piece left the last wave of a launch part empty, which cost a 512 MiB copy of 2048 pieces a
// fifth of its rate.
cudaError_t LaunchSegmentCopy(const CopySegment* segments, size_t count, cudaStream_t stream);

}  // namespace kvtier
