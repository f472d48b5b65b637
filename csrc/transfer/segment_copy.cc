#include "transfer/segment_copy.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <utility>

#include "common/mutex.h"

#if KVTIER_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "transfer/batch_copy.h"
#include "transfer/cuda_util.h"
#include "transfer/segment_copy_kernel.h"
#endif

namespace kvtier {

Status PageSegments(const PageRows& rows, const int64_t* src_pages, const int64_t* dst_pages,
                    size_t n, std::vector<CopySegment>* out) {
  const size_t num_rows = rows.src_rows.size();
  if (rows.dst_rows.size() != num_rows || rows.page_bytes.size() != num_rows) {
    return Status(StatusCode::kInvalidArgument,
                  "PageSegments: " + std::to_string(num_rows) + " source rows, " +
                      std::to_string(rows.dst_rows.size()) + " destination rows, " +
                      std::to_string(rows.page_bytes.size()) + " page sizes");
  }
  // Runs contiguous on both sides: (first source page, first destination page, pages).
  std::vector<std::array<uint64_t, 3>> runs;
  for (size_t i = 0; i < n; ++i) {
    const int64_t s = src_pages[i], d = dst_pages[i];
    if (s < 0 || s >= rows.src_pages) {
      return Status(StatusCode::kInvalidArgument,
                    "source pages outside [0, " + std::to_string(rows.src_pages) +
                        "): " + std::to_string(s) + " at " + std::to_string(i));
    }
    if (d < 0 || d >= rows.dst_pages) {
      return Status(StatusCode::kInvalidArgument,
                    "destination pages outside [0, " + std::to_string(rows.dst_pages) +
                        "): " + std::to_string(d) + " at " + std::to_string(i));
    }
    if (i > 0 && s == src_pages[i - 1] + 1 && d == dst_pages[i - 1] + 1) {
      ++runs.back()[2];
    } else {
      runs.push_back({static_cast<uint64_t>(s), static_cast<uint64_t>(d), 1});
    }
  }
  out->clear();
  out->reserve(num_rows * runs.size());
  for (size_t r = 0; r < num_rows; ++r) {
    const uint64_t pb = rows.page_bytes[r];
    for (const auto& [s, d, len] : runs) {
      out->push_back({rows.src_rows[r] + s * pb, rows.dst_rows[r] + d * pb, len * pb});
    }
  }
  return Status::OK();
}

#if !KVTIER_HAVE_CUDA
Status CopySegments(int, const std::vector<CopySegment>&, uintptr_t, SegmentCopyMethod) {
  return Status(StatusCode::kUnavailable, "CopySegments: this build of kvtier has no CUDA");
}
Status PushDevice(int, uint64_t, int*) {
  return Status(StatusCode::kUnavailable, "PushDevice: this build of kvtier has no CUDA");
}
#else
namespace {

// Cleared once the runtime or driver refuses cudaMemcpyBatchAsync: single copies from then on.
std::atomic<bool> g_batches_usable{true};

// Peer access from `device` to the GPU holding `ptr`, enabled once per pair (remembered: the
// runtime call is not free and answers "already enabled" every later time).
Status EnsurePeerAccess(int device, uint64_t ptr) {
  cudaPointerAttributes attr{};
  KVTIER_CUDA_RETURN_IF_ERROR(cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr)),
                              "cudaPointerGetAttributes");
  if (attr.type != cudaMemoryTypeDevice || attr.device == device) return Status::OK();
  static Mutex mu;
  static std::set<std::pair<int, int>> enabled;
  MutexLock lock(&mu);
  if (enabled.count({device, attr.device})) return Status::OK();
  int can = 0;
  KVTIER_CUDA_RETURN_IF_ERROR(cudaDeviceCanAccessPeer(&can, device, attr.device),
                              "cudaDeviceCanAccessPeer");
  if (!can) {
    return Status(StatusCode::kFailedPrecondition, "CopySegments: GPU " + std::to_string(device) +
                                                       " cannot access GPU " +
                                                       std::to_string(attr.device) + " as a peer");
  }
  const cudaError_t err = cudaDeviceEnablePeerAccess(attr.device, 0);
  if (err == cudaErrorPeerAccessAlreadyEnabled) {
    cudaGetLastError();
  } else if (err != cudaSuccess) {
    return CudaStatus(err, "cudaDeviceEnablePeerAccess");
  }
  enabled.insert({device, attr.device});
  return Status::OK();
}

// The copy engines: one DMA a segment, queued by QueueCopies (in batches where it can).
Status CopyByDma(const std::vector<CopySegment>& segments, cudaStream_t stream) {
  std::vector<void*> dsts;
  std::vector<const void*> srcs;
  std::vector<size_t> sizes;
  for (const CopySegment& s : segments) {
    if (s.bytes == 0) continue;
    dsts.push_back(reinterpret_cast<void*>(s.dst));
    srcs.push_back(reinterpret_cast<const void*>(s.src));
    sizes.push_back(s.bytes);
  }
  return QueueCopies(dsts.data(), srcs.data(), sizes.data(), sizes.size(), stream,
                     &g_batches_usable);
}

// The copy kernel over `pieces` on `stream` (of the current GPU).
Status LaunchPieces(const std::vector<CopySegment>& pieces, cudaStream_t stream) {
  KVTIER_CUDA_RETURN_IF_ERROR(LaunchSegmentCopy(pieces.data(), pieces.size(), stream),
                              "CopySegments kernel launch");
  return Status::OK();
}

// The GPU that holds `ptr`, or -1 for other memory (host, managed, unknown); as the current GPU's
// context sees it.
Status HoldingDevice(uint64_t ptr, int* device) {
  cudaPointerAttributes attr{};
  KVTIER_CUDA_RETURN_IF_ERROR(cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr)),
                              "cudaPointerGetAttributes");
  *device = attr.type == cudaMemoryTypeDevice ? attr.device : -1;
  return Status::OK();
}

// That a kernel on the current GPU can dereference device memory at `ptr`: the runtime names no
// address for memory this GPU has no mapping of (a CUDA IPC mapping opened on another GPU may be
// one), and a kernel touching it would fault and poison the process's context.
Status CheckAddressable(int device, uint64_t ptr, const char* what) {
  cudaPointerAttributes attr{};
  const cudaError_t err = cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr));
  if (err != cudaSuccess) {
    cudaGetLastError();
    return Status(StatusCode::kFailedPrecondition,
                  std::string("CopySegments(push): GPU ") + std::to_string(device) +
                      " cannot query the " + what + ": " + cudaGetErrorName(err));
  }
  if (attr.type == cudaMemoryTypeDevice && attr.devicePointer == nullptr) {
    return Status(StatusCode::kFailedPrecondition,
                  std::string("CopySegments(push): GPU ") + std::to_string(device) +
                      " has no mapping of the " + what + " (on GPU " + std::to_string(attr.device) +
                      ")");
  }
  return Status::OK();
}

// A cudaEvent_t destroyed with its scope. Destroying one whose record or waits are still queued
// is legal: the runtime releases it once the device is done with it.
class ScopedEvent {
 public:
  ScopedEvent() = default;
  ScopedEvent(const ScopedEvent&) = delete;
  ScopedEvent& operator=(const ScopedEvent&) = delete;
  ~ScopedEvent() {
    if (event_ != nullptr) cudaEventDestroy(event_);
  }
  // On the current GPU.
  Status Create() {
    KVTIER_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming),
                                "cudaEventCreateWithFlags");
    return Status::OK();
  }
  cudaEvent_t get() const { return event_; }

 private:
  cudaEvent_t event_ = nullptr;
};

// The stream pushes from one GPU run on, made on first use and kept for the process's life (not
// destroyed at exit, where it would race the runtime's own teardown). `mu` keeps one call's wait,
// launches and record together on it.
struct PushStream {
  Mutex mu;
  cudaStream_t stream = nullptr;
};

// The current GPU's push stream; `device` is the current GPU.
Status PushStreamOf(int device, PushStream** out) {
  static Mutex mu;
  static std::map<int, std::unique_ptr<PushStream>> streams;
  MutexLock lock(&mu);
  std::unique_ptr<PushStream>& slot = streams[device];
  if (!slot) {
    auto p = std::make_unique<PushStream>();
    KVTIER_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&p->stream, cudaStreamNonBlocking),
                                "cudaStreamCreateWithFlags on GPU " + std::to_string(device));
    slot = std::move(p);
  }
  *out = slot.get();
  return Status::OK();
}

// The kernel on `src_device`, writing into the destinations through peer access, ordered on the
// caller's `stream` (of the current GPU) by an event each way.
Status CopyByPush(int src_device, const std::vector<CopySegment>& pieces, cudaStream_t stream) {
  PushStream* push = nullptr;
  ScopedEvent ready, done;
  {
    DeviceGuard on_src;
    KVTIER_RETURN_IF_ERROR(on_src.Enter(src_device));
    KVTIER_RETURN_IF_ERROR(EnsurePeerAccess(src_device, pieces.front().dst));
    KVTIER_RETURN_IF_ERROR(CheckAddressable(src_device, pieces.front().src, "sources"));
    KVTIER_RETURN_IF_ERROR(CheckAddressable(src_device, pieces.front().dst, "destinations"));
    KVTIER_RETURN_IF_ERROR(PushStreamOf(src_device, &push));
    KVTIER_RETURN_IF_ERROR(done.Create());
  }
  // On the caller's GPU: stream 0 names the current GPU's legacy stream.
  KVTIER_RETURN_IF_ERROR(ready.Create());
  KVTIER_CUDA_RETURN_IF_ERROR(cudaEventRecord(ready.get(), stream),
                              "cudaEventRecord on the caller's stream");
  Status launched;
  {
    DeviceGuard on_src;  // a launch goes to a stream of the current GPU
    KVTIER_RETURN_IF_ERROR(on_src.Enter(src_device));
    MutexLock lock(&push->mu);
    KVTIER_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(push->stream, ready.get(), 0),
                                "cudaStreamWaitEvent on GPU " + std::to_string(src_device));
    launched = LaunchPieces(pieces, push->stream);
    // Even after a failed launch: the caller's stream then still waits for the batches queued.
    // Unfenced, the copy could still run when the caller's later work starts: wait here instead.
    const cudaError_t err = cudaEventRecord(done.get(), push->stream);
    if (err != cudaSuccess) {
      cudaStreamSynchronize(push->stream);
      return CudaStatus(err, "cudaEventRecord on GPU " + std::to_string(src_device));
    }
  }
  const cudaError_t err = cudaStreamWaitEvent(stream, done.get(), 0);
  if (err != cudaSuccess) {
    cudaEventSynchronize(done.get());
    return CudaStatus(err, "cudaStreamWaitEvent on the caller's stream");
  }
  return launched;
}

}  // namespace

Status PushDevice(int device, uint64_t src, int* push_device) {
  DeviceGuard guard;
  KVTIER_RETURN_IF_ERROR(guard.Enter(device));
  int holder = -1;
  KVTIER_RETURN_IF_ERROR(HoldingDevice(src, &holder));
  *push_device = holder < 0 ? device : holder;
  return Status::OK();
}

Status CopySegments(int device, const std::vector<CopySegment>& segments, uintptr_t stream,
                    SegmentCopyMethod method) {
  std::vector<CopySegment> pieces;
  pieces.reserve(segments.size());
  for (size_t i = 0; i < segments.size(); ++i) {
    const CopySegment& s = segments[i];
    if (s.bytes == 0) continue;
    if (s.src == 0 || s.dst == 0) {
      return Status(StatusCode::kInvalidArgument,
                    "CopySegments: segment " + std::to_string(i) + " has a null address");
    }
    pieces.push_back(s);  // whole: the launch splits its bytes among blocks evenly
  }
  if (pieces.empty()) return Status::OK();
  DeviceGuard guard;
  KVTIER_RETURN_IF_ERROR(guard.Enter(device));
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  if (method == SegmentCopyMethod::kPush) {
    // The sources' GPU from the first piece only, as for peer access below.
    int holder = -1;
    KVTIER_RETURN_IF_ERROR(HoldingDevice(pieces.front().src, &holder));
    if (holder >= 0 && holder != device) return CopyByPush(holder, pieces, st);
    method = SegmentCopyMethod::kKernel;
  }
  // Peer access to the sources' and destinations' GPU, asked of the first segment only: one
  // runtime query per segment would cost more than the copy itself for a chunk's hundreds of
  // page runs. A kernel on the sources' GPU pushes into a peer; one on the destinations' pulls.
  KVTIER_RETURN_IF_ERROR(EnsurePeerAccess(device, pieces.front().src));
  KVTIER_RETURN_IF_ERROR(EnsurePeerAccess(device, pieces.front().dst));
  if (method == SegmentCopyMethod::kDma) return CopyByDma(segments, st);
  return LaunchPieces(pieces, st);
}
#endif

}  // namespace kvtier
