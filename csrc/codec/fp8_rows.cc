#include "codec/fp8_rows.h"

#include <string>

#include "codec/fp8_rows_host.h"

#if KVTIER_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "codec/fp8_rows_kernel.h"
#include "transfer/cuda_util.h"
#endif

namespace kvtier {
namespace {

uint64_t ElemBytes(Fp8Elem e) { return e == Fp8Elem::kFloat32 ? 4 : 2; }
uint64_t ScaleBytes(Fp8Scale s) { return s == Fp8Scale::kFloat32 ? 4 : 2; }

// The checks both directions make before anything is queued.
Status Check(const char* what, const Fp8Rows& r, uint64_t raw, uint64_t blobs) {
  const std::string w = what;
  if (r.chunks == 0 || r.rows == 0 || r.row_elems == 0) {
    return Status::InvalidArgument(w + ": chunks, rows and row_elems must be positive");
  }
  if (r.host_threads == 0 || r.host_threads > 256) {
    return Status::InvalidArgument(w + ": host_threads must be in [1, 256], got " +
                                   std::to_string(r.host_threads));
  }
  const bool paged = r.pages.page_ids != 0;
  if ((raw == 0 && !paged) || blobs == 0) return Status::InvalidArgument(w + ": a null address");
  const uint64_t row_bytes = r.row_elems * ElemBytes(r.elem);
  if (paged) {
    const Fp8Pages& p = r.pages;
    if (p.segments == 0 || p.num_segments == 0 || p.pages_per_chunk == 0 || p.page_bytes == 0) {
      return Status::InvalidArgument(
          w + ": paged raw chunks need segments, num_segments, pages_per_chunk and page_bytes");
    }
    if (p.page_bytes % row_bytes) {
      return Status::InvalidArgument(w + ": a page of " + std::to_string(p.page_bytes) +
                                     " bytes is not a whole number of " +
                                     std::to_string(row_bytes) + "-byte rows");
    }
    if (uint64_t{p.num_segments} * p.pages_per_chunk * p.page_bytes != r.rows * row_bytes) {
      return Status::InvalidArgument(w + ": " + std::to_string(p.num_segments) + " segments of " +
                                     std::to_string(p.pages_per_chunk) + " pages of " +
                                     std::to_string(p.page_bytes) + " bytes are not a chunk of " +
                                     std::to_string(r.rows) + " rows");
    }
    if (p.page_ids % 8 || p.segments % 8) {
      return Status::InvalidArgument(w + ": page_ids or segments is not 8-byte aligned");
    }
  }
  if (r.header_bytes && (r.header == 0 || r.header_bytes > r.scale_offset)) {
    return Status::InvalidArgument(w + ": a header of " + std::to_string(r.header_bytes) +
                                   " bytes does not fit before the scales at byte " +
                                   std::to_string(r.scale_offset));
  }
  const uint64_t scales_end = r.scale_offset + r.rows * ScaleBytes(r.scale);
  if (scales_end > r.payload_offset) {
    return Status::InvalidArgument(w + ": the scales (ending at byte " +
                                   std::to_string(scales_end) + ") run into the payload at byte " +
                                   std::to_string(r.payload_offset));
  }
  if (r.payload_offset + r.rows * r.row_elems > r.blob_stride) {
    return Status::InvalidArgument(w + ": a blob's payload runs past blob_stride " +
                                   std::to_string(r.blob_stride));
  }
  const uint64_t sb = ScaleBytes(r.scale);
  if (raw % ElemBytes(r.elem) || blobs % sb || r.blob_stride % sb || r.scale_offset % sb) {
    return Status::InvalidArgument(w +
                                   ": raw, blobs, blob_stride or scale_offset is not aligned "
                                   "to its dtype");
  }
  return Status::OK();
}

}  // namespace

Status Fp8EncodeRows(int device, const Fp8Rows& rows, uint64_t raw, uint64_t blobs, uint64_t ok,
                     uintptr_t stream) {
  KVTIER_RETURN_IF_ERROR(Check("Fp8EncodeRows", rows, raw, blobs));
  if (ok == 0) return Status::InvalidArgument("Fp8EncodeRows: a null address");
  if (device < 0) {
    Fp8EncodeRowsHost(rows, reinterpret_cast<const void*>(raw), reinterpret_cast<void*>(blobs),
                      reinterpret_cast<uint8_t*>(ok));
    return Status::OK();
  }
#if !KVTIER_HAVE_CUDA
  (void)stream;
  return Status(StatusCode::kUnavailable, "Fp8EncodeRows: this build of kvtier has no CUDA");
#else
  DeviceGuard guard;
  KVTIER_RETURN_IF_ERROR(guard.Enter(device));
  auto s = reinterpret_cast<cudaStream_t>(stream);
  KVTIER_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(reinterpret_cast<void*>(ok), 1, rows.chunks, s),
                              "Fp8EncodeRows: cudaMemsetAsync");
  KVTIER_CUDA_RETURN_IF_ERROR(
      LaunchFp8Encode(rows, reinterpret_cast<const void*>(raw), reinterpret_cast<void*>(blobs),
                      reinterpret_cast<uint8_t*>(ok), s),
      "Fp8EncodeRows: launch");
  return Status::OK();
#endif
}

Status Fp8DecodeRows(int device, const Fp8Rows& rows, uint64_t blobs, uint64_t raw,
                     uintptr_t stream) {
  KVTIER_RETURN_IF_ERROR(Check("Fp8DecodeRows", rows, raw, blobs));
  if (rows.header_bytes &&
      (rows.decoded == 0 || rows.stop == 0 || rows.decoded % 4 || rows.stop % 4)) {
    return Status::InvalidArgument(
        "Fp8DecodeRows: a header check needs 4-byte aligned `decoded` and `stop` addresses");
  }
  if (device < 0) {
    Fp8DecodeRowsHost(rows, reinterpret_cast<const void*>(blobs), reinterpret_cast<void*>(raw));
    return Status::OK();
  }
#if !KVTIER_HAVE_CUDA
  (void)stream;
  return Status(StatusCode::kUnavailable, "Fp8DecodeRows: this build of kvtier has no CUDA");
#else
  DeviceGuard guard;
  KVTIER_RETURN_IF_ERROR(guard.Enter(device));
  KVTIER_CUDA_RETURN_IF_ERROR(
      LaunchFp8Decode(rows, reinterpret_cast<const void*>(blobs), reinterpret_cast<void*>(raw),
                      reinterpret_cast<cudaStream_t>(stream)),
      "Fp8DecodeRows: launch");
  return Status::OK();
#endif
}

}  // namespace kvtier
