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
// The build of the host pass (device -1) a call runs: kAuto, the fastest this CPU runs (AVX2
// where it has it), or kPortable, the baseline instruction set's. Both give the same bytes.
enum class Fp8HostIsa { kAuto, kPortable };

// Raw chunks held in pages rather than one after another: chunk c is num_segments runs
// (segment-major) of pages_per_chunk pages of page_bytes each, its page j of segment s at
// segments[2 * s] + page_ids[c * pages_per_chunk + j] * segments[2 * s + 1] (a segment's base
// address and page stride, uint64; page ids int64). A row never straddles two pages.
struct Fp8Pages {
  uint64_t page_ids = 0;  // address of chunks * pages_per_chunk page ids; 0: not paged
  uint64_t segments = 0;  // address of num_segments {base, stride} pairs
  uint32_t num_segments = 0;
  uint32_t pages_per_chunk = 0;
  uint64_t page_bytes = 0;
};

// A stack of `chunks` raw chunks and their blobs. Raw chunk c is rows * row_elems elements of
// `elem`, row-major, at raw + c * rows * row_elems * sizeof(elem), or in `pages` where its
// page_ids is not 0 (raw then unused). Blob c starts at blobs + c * blob_stride; its scales (one
// per row, `scale`'s dtype) at scale_offset, its e4m3 payload (row_elems bytes a row) at
// payload_offset. An encode with header_bytes > 0 also writes the header_bytes at `header` at
// the start of every blob and zeroes the bytes between the scales and the payload; else header
// and padding are the caller's. A decode with header_bytes > 0 first compares every blob's first
// header_bytes with `header`: it decodes only the blobs before the first that differs, writes
// their number to the uint32 at `decoded` and, where one differed, sets the uint32 at `stop` to
// 1; a decode that finds `stop` nonzero decodes nothing (so stacks queued behind one that
// stopped leave their pages alone).
struct Fp8Rows {
  uint64_t chunks = 0;
  uint64_t rows = 0;       // rows per chunk
  uint32_t row_elems = 0;  // elements per row
  Fp8Elem elem = Fp8Elem::kBFloat16;
  Fp8Scale scale = Fp8Scale::kFloat32;
  uint64_t blob_stride = 0;
  uint64_t scale_offset = 0;
  uint64_t payload_offset = 0;
  Fp8Pages pages;
  uint64_t header = 0;  // address of the header (same memory as the blobs)
  uint64_t header_bytes = 0;
  uint64_t decoded = 0;  // decode with a header: address of the uint32 count of blobs decoded
  uint64_t stop = 0;     // and of the uint32 flag that stops this and later stacks
  Fp8HostIsa host_isa = Fp8HostIsa::kAuto;
  uint32_t host_threads = 1;  // threads the host pass splits the rows among (device -1)
};

#if defined(__CUDACC__)
#define KVTIER_HOST_DEVICE __host__ __device__
#else
#define KVTIER_HOST_DEVICE
#endif

// The address of row r of raw chunk c (rows of `row_bytes`), one after another from `raw` or in
// the stack's pages.
KVTIER_HOST_DEVICE inline uint64_t Fp8RawRow(const Fp8Rows& g, uint64_t raw, uint64_t c, uint64_t r,
                                             uint64_t row_bytes) {
  const Fp8Pages& p = g.pages;
  if (p.page_ids == 0) return raw + (c * g.rows + r) * row_bytes;
  const uint64_t rows_per_page = p.page_bytes / row_bytes;
  const uint64_t unit = r / rows_per_page;  // the page of one segment the row is in
  const uint64_t s = unit / p.pages_per_chunk, j = unit % p.pages_per_chunk;
  const auto* ids = reinterpret_cast<const int64_t*>(p.page_ids);
  const auto* seg = reinterpret_cast<const uint64_t*>(p.segments);
  return seg[2 * s] + static_cast<uint64_t>(ids[c * p.pages_per_chunk + j]) * seg[2 * s + 1] +
         (r % rows_per_page) * row_bytes;
}

// Queues, on `stream` (a cudaStream_t as an integer) of `device`: ok[c] = 1 for each chunk, then
// the encoding of every row into its blob's scale and payload, ok[c] = 0 where a row of chunk c
// holds NaN or inf (that blob's bytes are then unspecified). Returns once queued. With `device`
// -1 the same bytes are computed on the host by the calling thread (`stream` unused) and are
// there when it returns (fp8_rows_host.h), in any build.
// REQUIRES: raw (or the pages, their ids and segments), blobs, ok and the header in device
// memory of `device` (host memory for -1); the payload after the scales, the header before
// them; raw, blob_stride and scale_offset aligned to their dtypes; paged: the rows fill the
// pages exactly, page_bytes a multiple of a row, every page id in its segment and every base and
// stride aligned to the element (InvalidArgument for what the call can see, nothing queued).
// Unavailable for a GPU in a build without CUDA.
Status Fp8EncodeRows(int device, const Fp8Rows& rows, uint64_t raw, uint64_t blobs, uint64_t ok,
                     uintptr_t stream);

// The build of the host pass that Fp8HostIsa::kAuto runs on this CPU: "avx2" or "portable".
const char* Fp8HostIsaName();

// Queues the decoding of every blob's rows into raw chunks (the inverse layout of
// Fp8EncodeRows), each value q * scale rounded once to `elem`; on the host for `device` -1.
// Same requirements.
Status Fp8DecodeRows(int device, const Fp8Rows& rows, uint64_t blobs, uint64_t raw,
                     uintptr_t stream);

}  // namespace kvtier
