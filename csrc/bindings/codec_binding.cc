// Python view of csrc/codec: the fused fp8 row kernels. Only exports; the GIL is released around
// the queueing.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bindings/status_binding.h"
#include "codec/fp8_rows.h"

namespace py = pybind11;

namespace kvtier::bindings {
namespace {

Fp8Rows ParseRows(uint64_t chunks, uint64_t rows, uint32_t row_elems, const std::string& elem,
                  const std::string& scale, uint64_t blob_stride, uint64_t scale_offset,
                  uint64_t payload_offset) {
  Fp8Rows r;
  if (elem == "bfloat16") {
    r.elem = Fp8Elem::kBFloat16;
  } else if (elem == "float16") {
    r.elem = Fp8Elem::kFloat16;
  } else if (elem == "float32") {
    r.elem = Fp8Elem::kFloat32;
  } else {
    throw StatusError(Status::InvalidArgument(
        "elem must be 'bfloat16', 'float16' or 'float32', got '" + elem + "'"));
  }
  if (scale == "float32") {
    r.scale = Fp8Scale::kFloat32;
  } else if (scale == "bfloat16") {
    r.scale = Fp8Scale::kBFloat16;
  } else {
    throw StatusError(
        Status::InvalidArgument("scale must be 'float32' or 'bfloat16', got '" + scale + "'"));
  }
  r.chunks = chunks;
  r.rows = rows;
  r.row_elems = row_elems;
  r.blob_stride = blob_stride;
  r.scale_offset = scale_offset;
  r.payload_offset = payload_offset;
  return r;
}

// The paged-raw and header arguments both calls take (0: raw chunks one after another; the
// header the caller's).
void SetPages(Fp8Rows& r, uint64_t page_ids, uint64_t segments, uint32_t num_segments,
              uint32_t pages_per_chunk, uint64_t page_bytes) {
  r.pages.page_ids = page_ids;
  r.pages.segments = segments;
  r.pages.num_segments = num_segments;
  r.pages.pages_per_chunk = pages_per_chunk;
  r.pages.page_bytes = page_bytes;
}

Fp8HostIsa ParseHostIsa(const std::string& isa) {
  if (isa == "auto") return Fp8HostIsa::kAuto;
  if (isa == "portable") return Fp8HostIsa::kPortable;
  throw StatusError(
      Status::InvalidArgument("host_isa must be 'auto' or 'portable', got '" + isa + "'"));
}

}  // namespace

void BindCodec(py::module_& m) {
  m.def(
      "fp8_host_isa", [] { return std::string(Fp8HostIsaName()); },
      "The build of the fp8 host pass (device -1) that host_isa='auto' runs on this CPU: 'avx2' "
      "or 'portable' (the baseline instruction set's). Both give the same bytes.");
  m.def(
      "fp8_encode_rows",
      [](int device, uint64_t raw, uint64_t blobs, uint64_t ok, uint64_t chunks, uint64_t rows,
         uint32_t row_elems, const std::string& elem, const std::string& scale,
         uint64_t blob_stride, uint64_t scale_offset, uint64_t payload_offset, uintptr_t stream,
         uint64_t page_ids, uint64_t segments, uint32_t num_segments, uint32_t pages_per_chunk,
         uint64_t page_bytes, uint64_t header, uint64_t header_bytes, const std::string& host_isa,
         uint32_t host_threads) {
        Fp8Rows r = ParseRows(chunks, rows, row_elems, elem, scale, blob_stride, scale_offset,
                              payload_offset);
        SetPages(r, page_ids, segments, num_segments, pages_per_chunk, page_bytes);
        r.header = header;
        r.header_bytes = header_bytes;
        r.host_isa = ParseHostIsa(host_isa);
        r.host_threads = host_threads;
        Status s;
        {
          py::gil_scoped_release release;
          s = Fp8EncodeRows(device, r, raw, blobs, ok, stream);
        }
        ThrowIfError(s);
      },
      py::arg("device"), py::arg("raw"), py::arg("blobs"), py::arg("ok"), py::arg("chunks"),
      py::arg("rows"), py::arg("row_elems"), py::arg("elem"), py::arg("scale"),
      py::arg("blob_stride"), py::arg("scale_offset"), py::arg("payload_offset"), py::arg("stream"),
      py::arg("page_ids") = 0, py::arg("segments") = 0, py::arg("num_segments") = 0,
      py::arg("pages_per_chunk") = 0, py::arg("page_bytes") = 0, py::arg("header") = 0,
      py::arg("header_bytes") = 0, py::arg("host_isa") = "auto", py::arg("host_threads") = 1,
      "Queues on GPU `device`'s stream `stream` (an int; device -1: done on the host by this "
      "call, stream unused) the fp8 encoding of `chunks` raw chunks "
      "(rows x row_elems elements of `elem` each, one after another at address `raw`) into blobs "
      "`blob_stride` bytes apart at `blobs`: one `scale` per row at scale_offset, e4m3 bytes at "
      "payload_offset (Fp8Codec's bytes with scale_over=(-1,)). "
      "ok[c] (a byte per chunk) ends 1, or 0 where chunk c holds NaN or inf. With page_ids (an "
      "address of chunks x pages_per_chunk int64), the raw chunks are read from pages instead "
      "(raw 0): chunk c is num_segments runs of pages_per_chunk pages of page_bytes, page j of "
      "segment s at segments[2s] + page_ids[c * pages_per_chunk + j] * segments[2s + 1] (uint64 "
      "base and stride pairs at address `segments`). With header_bytes, the header_bytes at "
      "address `header` start every blob and the bytes between scales and payload are zeroed; "
      "else header and padding are the caller's. host_isa ('auto' or 'portable') picks the host "
      "pass's build (fp8_host_isa); host_threads, how many threads it splits the rows among "
      "(the calling one and host_threads - 1 started for the call; small calls use one).");
  m.def(
      "fp8_decode_rows",
      [](int device, uint64_t blobs, uint64_t raw, uint64_t chunks, uint64_t rows,
         uint32_t row_elems, const std::string& elem, const std::string& scale,
         uint64_t blob_stride, uint64_t scale_offset, uint64_t payload_offset, uintptr_t stream,
         uint64_t page_ids, uint64_t segments, uint32_t num_segments, uint32_t pages_per_chunk,
         uint64_t page_bytes, uint64_t header, uint64_t header_bytes, uint64_t decoded,
         uint64_t stop, const std::string& host_isa, uint32_t host_threads) {
        Fp8Rows r = ParseRows(chunks, rows, row_elems, elem, scale, blob_stride, scale_offset,
                              payload_offset);
        SetPages(r, page_ids, segments, num_segments, pages_per_chunk, page_bytes);
        r.header = header;
        r.header_bytes = header_bytes;
        r.decoded = decoded;
        r.stop = stop;
        r.host_isa = ParseHostIsa(host_isa);
        r.host_threads = host_threads;
        Status s;
        {
          py::gil_scoped_release release;
          s = Fp8DecodeRows(device, r, blobs, raw, stream);
        }
        ThrowIfError(s);
      },
      py::arg("device"), py::arg("blobs"), py::arg("raw"), py::arg("chunks"), py::arg("rows"),
      py::arg("row_elems"), py::arg("elem"), py::arg("scale"), py::arg("blob_stride"),
      py::arg("scale_offset"), py::arg("payload_offset"), py::arg("stream"),
      py::arg("page_ids") = 0, py::arg("segments") = 0, py::arg("num_segments") = 0,
      py::arg("pages_per_chunk") = 0, py::arg("page_bytes") = 0, py::arg("header") = 0,
      py::arg("header_bytes") = 0, py::arg("decoded") = 0, py::arg("stop") = 0,
      py::arg("host_isa") = "auto", py::arg("host_threads") = 1,
      "Queues the inverse of fp8_encode_rows: each blob's rows decoded into raw chunks of `elem` "
      "(one after another at `raw`, or into pages given as to fp8_encode_rows). With "
      "header_bytes, only the blobs before the first whose first header_bytes differ from those "
      "at `header` are decoded; their number is written to the uint32 at `decoded`, and the "
      "uint32 at `stop` is set to 1 where one differed; with `stop` already nonzero nothing is "
      "decoded.");
}

}  // namespace kvtier::bindings
