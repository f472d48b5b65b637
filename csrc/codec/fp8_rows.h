// fp8 (e4m3fn) coding of KV in one fused pass each way, for stacks of chunks, on the GPU or (for
// CPU-only use) on the host: the bytes kvtier.codecs.Fp8Codec writes with one scale per row
// (scale_over=(-1,), a row being one token of one head), byte for byte. The torch path of that
// codec makes five passes over float32 copies of the chunk; these read the raw KV once and write
// the blob once.
//
// Thread safety: both calls may be made from any thread; each changes the calling thread's
// current device only for its own duration.
#pragma once

#include <cstdint>

#include "common/status.h"

namespace kvtier {

enum class Fp8Elem { kFloat16, kBFloat16, kFloat32 };  // the raw KV's dtype
enum class Fp8Scale { kFloat32, kBFloat16 };           // the stored scales' dtype

// A stack of `chunks` raw chunks and their blobs. Raw chunk c is rows * row_elems elements of
// `elem`, row-major, at raw + c * rows * row_elems * sizeof(elem). Blob c starts at
// blobs + c * blob_stride; its scales (one per row, `scale`'s dtype) at scale_offset, its e4m3
// payload (row_elems bytes a row) at payload_offset. Header and padding are the caller's.
struct Fp8Rows {
  uint64_t chunks = 0;
  uint64_t rows = 0;       // rows per chunk
  uint32_t row_elems = 0;  // elements per row
  Fp8Elem elem = Fp8Elem::kBFloat16;
  Fp8Scale scale = Fp8Scale::kFloat32;
  uint64_t blob_stride = 0;
  uint64_t scale_offset = 0;
  uint64_t payload_offset = 0;
};

// Queues, on `stream` (a cudaStream_t as an integer) of `device`: ok[c] = 1 for each chunk, then
// the encoding of every row into its blob's scale and payload, ok[c] = 0 where a row of chunk c
// holds NaN or inf (that blob's bytes are then unspecified). Returns once queued. With `device`
// -1 the same bytes are computed on the host by the calling thread (`stream` unused) and are
// there when it returns (fp8_rows_host.h), in any build.
// REQUIRES: raw, blobs and ok in device memory of `device` (host memory for -1); the payload
// after the scales; raw, blob_stride and scale_offset aligned to their dtypes (InvalidArgument
// otherwise, nothing queued). Unavailable for a GPU in a build without CUDA.
Status Fp8EncodeRows(int device, const Fp8Rows& rows, uint64_t raw, uint64_t blobs, uint64_t ok,
                     uintptr_t stream);

// Queues the decoding of every blob's rows into raw chunks (the inverse layout of
// Fp8EncodeRows), each value q * scale rounded once to `elem`; on the host for `device` -1.
// Same requirements.
Status Fp8DecodeRows(int device, const Fp8Rows& rows, uint64_t blobs, uint64_t raw,
                     uintptr_t stream);

}  // namespace kvtier
