// One way to queue many small host<->device or device<->device copies on a stream: batches of
// cudaMemcpyBatchAsync where the runtime and driver have it, else one cudaMemcpyAsync each.
// Used by the copy engine (gathers and scatters) and by CopySegments' DMA path.
#pragma once

#if KVTIER_HAVE_CUDA
#include <cuda_runtime_api.h>

#include <atomic>
#include <cstddef>

#include "common/status.h"

namespace kvtier {

// Copies per cudaMemcpyBatchAsync call.
inline constexpr size_t kMaxCopiesPerBatch = 1024;

// Queues dsts[i] <- srcs[i] (sizes[i] bytes, i < n) on `stream`, ordered after the work already
// on it, with the hint that the copies should overlap compute. `batches_usable` (may be null:
// try batches) says whether to try cudaMemcpyBatchAsync; it is cleared, for every later call,
// when the runtime or driver turns out not to support it, and this call goes on with single
// copies (a copy the refused batch already queued is queued again; both write the same bytes).
// REQUIRES: the current device is the one that owns `stream`; no two destinations overlap.
Status QueueCopies(void* const* dsts, const void* const* srcs, const size_t* sizes, size_t n,
                   cudaStream_t stream, std::atomic<bool>* batches_usable);

}  // namespace kvtier
#endif  // KVTIER_HAVE_CUDA
