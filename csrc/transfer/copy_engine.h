// CopyEngine: moves the pages of chunks between an engine's KV tensors and contiguous blobs.
//
// A layout is a list of segments (see docs/architecture.md): segment s holds `num_pages` pages of
// `page_bytes` contiguous bytes, page p at `base + p * page_stride`. A chunk is `pages_per_chunk`
// pages; its blob is segment-major: for each segment s in order, the chunk's pages of s back to
// back (blob offset of segment s = sum of page_bytes * pages_per_chunk over the segments before).
//
// Gather (offload): pages -> blobs.  Scatter (load): blobs -> pages.
// Where the KV tensors are on a GPU, bytes move on the engine's own streams (one for offload, one
// for load) by one of three methods (TransferMethod); where they are in host memory, C++ worker
// threads copy them. Blobs are always host memory (normally the pinned CPU pool).
//
// Thread safety: Gather/Scatter may be called from any thread concurrently; a Transfer may be
// waited on from any thread.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"

namespace kvtier {

struct SegmentDesc {
  uint64_t base = 0;         // address of page 0 (device or host pointer)
  uint64_t page_stride = 0;  // bytes between consecutive pages
  uint64_t page_bytes = 0;   // contiguous bytes of one page
  uint64_t num_pages = 0;
};

struct LayoutDesc {
  std::vector<SegmentDesc> segments;
  int device = -1;  // CUDA device of the segments; -1 = host memory (CPU path)
  uint32_t pages_per_chunk = 1;
  // layer_segments[i] = indices of the segments of layer i (for per-layer completion). Empty means
  // one layer holding every segment. Every segment is listed by at least one layer; layers may
  // share segments (a cross-layer pool lists its one segment in every layer): such a segment is
  // copied once and completes every layer that lists it.
  std::vector<std::vector<uint32_t>> layer_segments;
};

// Bytes of one chunk's blob for `layout`.
uint64_t ChunkBlobBytes(const LayoutDesc& layout);
// Checks pointers, sizes and layer lists; InvalidArgument naming the problem.
Status ValidateLayout(const LayoutDesc& layout);

enum class TransferMethod : int {
  kAuto = 0,      // pick per layout: direct when pages are large, else staged, else zero-copy
  kDirect = 1,    // DMA per page (or per run of adjacent pages), batched where the runtime allows
  kStaged = 2,    // gather kernel into a double-buffered device staging area, then large DMAs
  kZeroCopy = 3,  // kernel reads/writes mapped pinned memory directly (uses SMs; last resort)
  kCpu = 4,       // host memcpy on worker threads (the only method for host-memory layouts)
};
const char* TransferMethodName(TransferMethod m);

struct CopyEngineOptions {
  TransferMethod method = TransferMethod::kAuto;
  // Device staging area for kStaged: four slots, two (double-buffered) per direction. Each slot
  // must hold the largest page. Under a busy GPU, larger slots keep staged copies nearer the PCIe
  // rate (each fill's kernel waits for SM slots; bench_copy's matmul_beside_* workloads show it).
  uint64_t staging_bytes = 64ull << 20;
  int cpu_threads = 2;  // workers for the CPU path
  // Fault injection for tests (CPU path): every Nth transfer copies its bytes but completes with
  // an IoError, as a failed DMA would. 0 turns it off.
  uint32_t fail_every_nth = 0;
};

// One asynchronous gather or scatter of one or more chunks.
class Transfer {
 public:
  virtual ~Transfer() = default;
  // Blocks until every byte has landed (and the completion callback has run) or the timeout
  // passes: OK, the copy's error, or DeadlineExceeded (the transfer keeps running).
  virtual Status Wait(int64_t timeout_ms) = 0;
  // Blocks until the segments of layer `layer` have landed, for every chunk of the transfer.
  virtual Status WaitLayer(int layer, int64_t timeout_ms) = 0;
  // Makes `stream` (a cudaStream_t, as an integer) wait on the device for layer `layer`,
  // without blocking the host. Unavailable on the CPU path.
  virtual Status StreamWaitLayer(int layer, uintptr_t stream) = 0;
  virtual bool Done() const = 0;
  virtual int num_layers() const = 0;
  virtual TransferMethod method() const = 0;
};

// Called once per transfer, with its final status, from the engine's completion context
// (a CUDA host callback or a worker thread) before Wait() returns. Must not call CUDA APIs,
// must not throw, must not block for long, and must not own the Transfer. Not called when
// Gather/Scatter return an error (nothing started).
using TransferCallback = std::function<void(const Status&)>;

class CopyEngine {
 public:
  static StatusOr<std::unique_ptr<CopyEngine>> Create(const LayoutDesc& layout,
                                                      const CopyEngineOptions& options);
  virtual ~CopyEngine() = default;

  // Copies chunk c's pages page_ids[c*ppc .. (c+1)*ppc) into blobs[c] (host memory of
  // ChunkBlobBytes bytes). When `after_stream` is non-zero (a cudaStream_t), the copy starts only
  // after the work already queued on that stream (the model's compute) has finished.
  // InvalidArgument (nothing started) when page_ids.size() != blobs.size() * ppc or a page id is
  // out of range, a blob is null, after_stream is not a stream of the layout's GPU (or is non-zero
  // on the CPU path), or (kZeroCopy) a blob is not mapped pinned memory. A CUDA failure after the
  // copy has started fails the transfer instead: Wait() returns it and the callback receives it.
  virtual StatusOr<std::shared_ptr<Transfer>> Gather(const std::vector<uint32_t>& page_ids,
                                                     const std::vector<void*>& blobs,
                                                     uintptr_t after_stream,
                                                     TransferCallback on_complete) = 0;
  // The reverse: blobs[c] into pages page_ids[c*ppc .. (c+1)*ppc), in layer order so that
  // per-layer waits complete as early as possible. Also InvalidArgument when a page id appears
  // twice (two chunks would write the same page).
  virtual StatusOr<std::shared_ptr<Transfer>> Scatter(const std::vector<void*>& blobs,
                                                      const std::vector<uint32_t>& page_ids,
                                                      uintptr_t after_stream,
                                                      TransferCallback on_complete) = 0;

  virtual TransferMethod method() const = 0;  // the method kAuto resolved to
  virtual const LayoutDesc& layout() const = 0;
  virtual uint64_t blob_bytes() const = 0;
};

}  // namespace kvtier
