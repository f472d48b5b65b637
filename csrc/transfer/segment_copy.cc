#include "transfer/segment_copy.h"

#include <algorithm>
#include <string>

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

// Peer access from `device` to the GPU holding `ptr`, enabled once per pair by the runtime.
Status EnsurePeerAccess(int device, uint64_t ptr) {
  cudaPointerAttributes attr{};
  KVTIER_CUDA_RETURN_IF_ERROR(cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr)),
                              "cudaPointerGetAttributes");
  if (attr.type != cudaMemoryTypeDevice || attr.device == device) return Status::OK();
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
  const size_t bytes = pieces.size() * sizeof(CopySegment);
  void* dev = nullptr;
  KVTIER_CUDA_RETURN_IF_ERROR(cudaMallocAsync(&dev, bytes, st), "cudaMallocAsync");
  // From pageable memory: the runtime stages it before returning, so `pieces` may go away.
  cudaError_t err = cudaMemcpyAsync(dev, pieces.data(), bytes, cudaMemcpyHostToDevice, st);
  if (err == cudaSuccess) {
    int sms = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    err = LaunchSegmentCopy(static_cast<const CopySegment*>(dev), pieces.size(),
                            std::max(1, sms) * 4, st);
  }
  const cudaError_t free_err = cudaFreeAsync(dev, st);
  if (err != cudaSuccess) return CudaStatus(err, "CopySegments");
  if (free_err != cudaSuccess) return CudaStatus(free_err, "cudaFreeAsync");
  return Status::OK();
}
#endif

}  // namespace kvtier
