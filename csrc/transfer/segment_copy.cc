#include "transfer/segment_copy.h"

#include <algorithm>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <utility>

#if KVTIER_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "transfer/cuda_util.h"
#include "transfer/segment_copy_kernel.h"
#endif

namespace kvtier {

#if !KVTIER_HAVE_CUDA
Status CopySegments(int, const std::vector<CopySegment>&, uintptr_t, SegmentCopyMethod) {
  return Status(StatusCode::kUnavailable, "CopySegments: this build of kvtier has no CUDA");
}
#else
namespace {

// Peer access from `device` to the GPU holding `ptr`, enabled once per pair (remembered: the
// runtime call is not free and answers "already enabled" every later time).
Status EnsurePeerAccess(int device, uint64_t ptr) {
  cudaPointerAttributes attr{};
  KVTIER_CUDA_RETURN_IF_ERROR(cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr)),
                              "cudaPointerGetAttributes");
  if (attr.type != cudaMemoryTypeDevice || attr.device == device) return Status::OK();
  static std::mutex mu;
  static std::set<std::pair<int, int>> enabled;
  std::lock_guard<std::mutex> lock(mu);
  if (enabled.count({device, attr.device})) return Status::OK();
  int can = 0;
  KVTIER_CUDA_RETURN_IF_ERROR(cudaDeviceCanAccessPeer(&can, device, attr.device),
                              "cudaDeviceCanAccessPeer");
  if (!can) {
    return Status(StatusCode::kFailedPrecondition,
                  "CopySegments: GPU " + std::to_string(device) + " cannot access GPU " +
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

// The copy engines: batches of cudaMemcpyBatchAsync, else one cudaMemcpyAsync a segment.
Status CopyByDma(const std::vector<CopySegment>& segments, cudaStream_t stream) {
  constexpr size_t kMaxPerBatch = 1024;
  std::vector<void*> dsts;
  std::vector<const void*> srcs;
  std::vector<size_t> sizes;
  for (const CopySegment& s : segments) {
    if (s.bytes == 0) continue;
    dsts.push_back(reinterpret_cast<void*>(s.dst));
    srcs.push_back(reinterpret_cast<const void*>(s.src));
    sizes.push_back(s.bytes);
  }
  size_t i = 0;
#if CUDART_VERSION >= 12080
  while (i < sizes.size() && sizes.size() > 1) {
    const size_t count = std::min(kMaxPerBatch, sizes.size() - i);
    cudaMemcpyAttributes attr{};
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    size_t attr_index = 0;
#if CUDART_VERSION >= 13000
    const cudaError_t err = cudaMemcpyBatchAsync(dsts.data() + i, srcs.data() + i,
                                                 sizes.data() + i, count, &attr, &attr_index, 1,
                                                 stream);
#else
    size_t fail_index = SIZE_MAX;
    const cudaError_t err =
        cudaMemcpyBatchAsync(dsts.data() + i, srcs.data() + i, sizes.data() + i, count, &attr,
                             &attr_index, 1, &fail_index, stream);
#endif
    if (err == cudaSuccess) {
      i += count;
      continue;
    }
    if (err == cudaErrorNotSupported || err == cudaErrorInvalidValue ||
        err == cudaErrorCallRequiresNewerDriver) {
      cudaGetLastError();  // no batches here: single copies from this batch on
      break;
    }
    return CudaStatus(err, "cudaMemcpyBatchAsync of " + std::to_string(count) + " copies");
  }
#endif
  for (; i < sizes.size(); ++i) {
    KVTIER_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(dsts[i], srcs[i], sizes[i], cudaMemcpyDefault, stream),
        "cudaMemcpyAsync of " + std::to_string(sizes[i]) + " bytes");
  }
  return Status::OK();
}

}  // namespace

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
    for (uint64_t off = 0; off < s.bytes; off += kSegmentPieceBytes) {
      const uint64_t n = s.bytes - off < kSegmentPieceBytes ? s.bytes - off : kSegmentPieceBytes;
      pieces.push_back({s.src + off, s.dst + off, n});
    }
  }
  if (pieces.empty()) return Status::OK();
  DeviceGuard guard;
  KVTIER_RETURN_IF_ERROR(guard.Enter(device));
  // Peer access to the sources' and destinations' GPU, asked of the first segment only: one
  // runtime query per segment would cost more than the copy itself for a chunk's hundreds of
  // page runs. A kernel on the sources' GPU pushes into a peer; one on the destinations' pulls.
  KVTIER_RETURN_IF_ERROR(EnsurePeerAccess(device, pieces.front().src));
  KVTIER_RETURN_IF_ERROR(EnsurePeerAccess(device, pieces.front().dst));
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  if (method == SegmentCopyMethod::kDma) return CopyByDma(segments, st);
  // The kernel: pieces travel in the launch's parameter, kSegmentPiecesPerLaunch a launch.
  auto batch = std::make_unique<SegmentBatch>();
  for (size_t i = 0; i < pieces.size(); i += kSegmentPiecesPerLaunch) {
    const size_t n = std::min<size_t>(kSegmentPiecesPerLaunch, pieces.size() - i);
    batch->count = static_cast<uint32_t>(n);
    std::copy(pieces.begin() + i, pieces.begin() + i + n, batch->pieces);
    KVTIER_CUDA_RETURN_IF_ERROR(LaunchSegmentCopy(*batch, st), "CopySegments kernel launch");
  }
  return Status::OK();
}
#endif

}  // namespace kvtier
