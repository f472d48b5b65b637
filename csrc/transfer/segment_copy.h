// Device-to-device copies of many byte ranges in one kernel launch: the GPU-to-GPU path of peers
// on one host (CUDA IPC), where a chunk is hundreds of page runs and one cudaMemcpy per run would
// cost more in launches than in bytes.
//
// Thread safety: CopySegments may be called from any thread; it changes the calling thread's
// current device only for its own duration.
#pragma once

#include <cstdint>
#include <vector>

#include "common/status.h"

namespace kvtier {

struct CopySegment {
  uint64_t src;    // device address (this process's mapping, e.g. of a peer's IPC allocation)
  uint64_t dst;    // device address
  uint64_t bytes;  // length of the range
};

enum class SegmentCopyMethod {
  kKernel,  // one launch of a copy kernel on `device` (SM loads and stores, peer reads)
  kDma,     // the copy engines: cudaMemcpyBatchAsync of every segment (one cudaMemcpyAsync each
            // where the runtime or driver lacks batches)
  kPush,    // the copy kernel on the GPU that holds the sources, writing into the destinations
            // through peer access: NVLink carries writes more efficiently than remote reads. It
            // runs on an internal stream of that GPU, fenced by events on `stream` both ways. As
            // kKernel where the sources are on `device` or not in device memory (host, managed)
};

// Copies every segment on `stream` (a cudaStream_t as an integer, 0 = the legacy default stream)
// of `device`, by `method`: the copy starts after the work queued on `stream` so far, and work
// queued on it later starts after the copy. Sources (destinations, for kPush) on another GPU are
// reached through peer access, enabled here when the devices allow it. Returns once the copy is
// queued: the caller synchronizes the stream. Segments must not overlap one another.
// REQUIRES: all sources are on one GPU and all destinations on one GPU, `device` being one of
// them or a peer of both (peer access is enabled from the first segment's attributes).
// Unavailable in a build without CUDA or on a machine without a GPU; InvalidArgument for a
// null address; FailedPrecondition when the GPU running the copy cannot reach the other side
// as a peer (for kPush: the sources' GPU the destinations), or for kPush when the runtime says
// the sources' GPU has no mapping of either side (e.g. of a CUDA IPC mapping opened elsewhere).
Status CopySegments(int device, const std::vector<CopySegment>& segments, uintptr_t stream,
                    SegmentCopyMethod method = SegmentCopyMethod::kDma);

// The GPU whose kernel a kPush copy on `device` from `src` runs: the GPU that the runtime says
// holds `src`, or `device` where that is `device` itself or `src` is not device memory.
Status PushDevice(int device, uint64_t src, int* push_device);

}  // namespace kvtier
