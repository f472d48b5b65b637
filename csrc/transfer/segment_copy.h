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

// Pages of tensors laid out as rows: row r of a copy starts at src_rows[r] on the source side
// and dst_rows[r] on the destination side, and holds pages of page_bytes[r] bytes, page p at
// offset p * page_bytes[r] (a contiguous [outer..., pages, ...] tensor has one row per outer
// index; vLLM's [2, pages, ...] per layer: two rows a layer).
struct PageRows {
  std::vector<uint64_t> src_rows;
  std::vector<uint64_t> dst_rows;
  std::vector<uint64_t> page_bytes;
  int64_t src_pages = 0;  // pages per row on each side: page ids must be below
  int64_t dst_pages = 0;
};

// The byte ranges that copy pages src_pages[i] -> dst_pages[i] (i < n) of every row: one per run
// of pages contiguous on both sides, per row, rows in order. InvalidArgument (naming the side)
// for a page id outside [0, pages) or rows of unequal lengths.
Status PageSegments(const PageRows& rows, const int64_t* src_pages, const int64_t* dst_pages,
                    size_t n, std::vector<CopySegment>* out);

// The GPU whose kernel a kPush copy on `device` from `src` runs: the GPU that the runtime says
// holds `src`, or `device` where that is `device` itself or `src` is not device memory.
Status PushDevice(int device, uint64_t src, int* push_device);

}  // namespace kvtier
