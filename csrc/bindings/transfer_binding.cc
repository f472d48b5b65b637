// Python view of csrc/transfer: CopyEngine and Transfer. Only exports; the GIL is released around
// every call that copies or waits.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "bindings/status_binding.h"
#include "transfer/copy_engine.h"
#include "transfer/segment_copy.h"

namespace py = pybind11;

namespace kvtier::bindings {
namespace {

TransferMethod ParseMethod(const std::string& name) {
  if (name == "auto") return TransferMethod::kAuto;
  if (name == "direct") return TransferMethod::kDirect;
  if (name == "staged") return TransferMethod::kStaged;
  if (name == "zero_copy") return TransferMethod::kZeroCopy;
  if (name == "cpu") return TransferMethod::kCpu;
  throw StatusError(Status::InvalidArgument(
      "method must be 'auto', 'direct', 'staged', 'zero_copy' or 'cpu', got '" + name + "'"));
}

SegmentCopyMethod ParseSegmentMethod(const std::string& method, const char* who) {
  if (method == "dma") return SegmentCopyMethod::kDma;
  if (method == "kernel") return SegmentCopyMethod::kKernel;
  if (method == "push") return SegmentCopyMethod::kPush;
  throw StatusError(Status(
      StatusCode::kInvalidArgument,
      std::string(who) + ": method must be 'dma', 'kernel' or 'push', got '" + method + "'"));
}

using U64Array = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>;
using I64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

std::vector<uint64_t> ToVector(const U64Array& a, const char* what) {
  if (a.ndim() != 1) {
    throw StatusError(Status::InvalidArgument(std::string(what) + " must be a 1-D array"));
  }
  return std::vector<uint64_t>(a.data(), a.data() + a.shape(0));
}

// PageSegments of two page-id arrays (checked: 1-D, equal lengths).
std::vector<CopySegment> Segments(const PageRows& rows, const I64Array& src, const I64Array& dst) {
  if (src.ndim() != 1 || dst.ndim() != 1) {
    throw StatusError(Status::InvalidArgument("page ids must be 1-D"));
  }
  if (src.shape(0) != dst.shape(0)) {
    throw StatusError(Status::InvalidArgument(std::to_string(src.shape(0)) + " source pages, " +
                                              std::to_string(dst.shape(0)) + " destination pages"));
  }
  std::vector<CopySegment> segs;
  ThrowIfError(
      PageSegments(rows, src.data(), dst.data(), static_cast<size_t>(src.shape(0)), &segs));
  return segs;
}

int64_t TimeoutMs(double timeout_s) {
  if (!std::isfinite(timeout_s) || timeout_s < 0) {
    throw StatusError(Status::InvalidArgument("timeout_s must be a finite number >= 0, got " +
                                              std::to_string(timeout_s)));
  }
  return static_cast<int64_t>(std::ceil(std::min(timeout_s, 1e12) * 1000.0));
}

std::vector<uint32_t> PageIds(const std::vector<int64_t>& ids) {
  std::vector<uint32_t> out(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] > UINT32_MAX) {
      throw StatusError(Status::InvalidArgument("page id " + std::to_string(ids[i]) +
                                                " (page_ids[" + std::to_string(i) +
                                                "]) is out of range"));
    }
    out[i] = static_cast<uint32_t>(ids[i]);
  }
  return out;
}

std::vector<void*> BlobPtrs(const std::vector<uint64_t>& ptrs) {
  std::vector<void*> out(ptrs.size());
  for (size_t i = 0; i < ptrs.size(); ++i)
    out[i] = reinterpret_cast<void*>(static_cast<uintptr_t>(ptrs[i]));
  return out;
}

// Wraps `p` so that its last release runs without the GIL: destroying a CUDA engine waits (with a
// deadline) for its streams to go idle, which must not stall every other Python thread.
template <typename T>
std::shared_ptr<T> ReleasedWithoutGil(std::shared_ptr<T> p) {
  T* raw = p.get();
  return std::shared_ptr<T>(raw, [owner = std::move(p)](T*) mutable {
    if (PyGILState_Check()) {
      py::gil_scoped_release release;
      owner.reset();
    } else {
      owner.reset();
    }
  });
}

using SegmentTuple = std::tuple<uint64_t, uint64_t, uint64_t, uint64_t>;

std::shared_ptr<CopyEngine> MakeEngine(const std::vector<SegmentTuple>& segments, int device,
                                       int64_t pages_per_chunk,
                                       const std::vector<std::vector<int64_t>>& layer_segments,
                                       const std::string& method, uint64_t staging_bytes,
                                       int cpu_threads) {
  LayoutDesc layout;
  for (const auto& [base, stride, bytes, pages] : segments)
    layout.segments.push_back({base, stride, bytes, pages});
  layout.device = device;
  if (pages_per_chunk < 1 || pages_per_chunk > UINT32_MAX) {
    throw StatusError(Status::InvalidArgument("pages_per_chunk must be in [1, 2^32), got " +
                                              std::to_string(pages_per_chunk)));
  }
  layout.pages_per_chunk = static_cast<uint32_t>(pages_per_chunk);
  for (size_t l = 0; l < layer_segments.size(); ++l) {
    std::vector<uint32_t> segs;
    for (int64_t s : layer_segments[l]) {
      if (s < 0 || s > UINT32_MAX) {
        throw StatusError(Status::InvalidArgument("layer_segments[" + std::to_string(l) +
                                                  "] lists segment " + std::to_string(s) +
                                                  ", which is out of range"));
      }
      segs.push_back(static_cast<uint32_t>(s));
    }
    layout.layer_segments.push_back(std::move(segs));
  }
  CopyEngineOptions options;
  options.method = ParseMethod(method);
  options.staging_bytes = staging_bytes;
  options.cpu_threads = cpu_threads;
  std::unique_ptr<CopyEngine> engine;
  {
    py::gil_scoped_release release;
    engine = ValueOrThrow(CopyEngine::Create(layout, options));
  }
  return ReleasedWithoutGil(std::shared_ptr<CopyEngine>(std::move(engine)));
}

}  // namespace

void BindTransfer(py::module_& m) {
  m.def(
      "copy_segments",
      [](int device, const py::array_t<uint64_t, py::array::c_style | py::array::forcecast>& src,
         const py::array_t<uint64_t, py::array::c_style | py::array::forcecast>& dst,
         const py::array_t<uint64_t, py::array::c_style | py::array::forcecast>& nbytes,
         uintptr_t stream, const std::string& method) {
        const SegmentCopyMethod m = ParseSegmentMethod(method, "copy_segments");
        if (src.ndim() != 1 || dst.ndim() != 1 || nbytes.ndim() != 1 ||
            src.shape(0) != dst.shape(0) || src.shape(0) != nbytes.shape(0)) {
          ThrowIfError(
              Status(StatusCode::kInvalidArgument,
                     "copy_segments: src, dst and nbytes must be 1-D arrays of one length"));
        }
        std::vector<CopySegment> segs(static_cast<size_t>(src.shape(0)));
        for (size_t i = 0; i < segs.size(); ++i) segs[i] = {src.at(i), dst.at(i), nbytes.at(i)};
        Status s;
        {
          py::gil_scoped_release release;
          s = CopySegments(device, segs, stream, m);
        }
        ThrowIfError(s);
      },
      py::arg("device"), py::arg("src"), py::arg("dst"), py::arg("nbytes"), py::arg("stream"),
      py::arg("method") = "dma",
      "Queues device-to-device copies of byte ranges (src[i] -> dst[i], nbytes[i] bytes) on GPU "
      "`device`'s stream `stream` (an int): 'dma' through the copy engines (batched), 'kernel' as "
      "one copy kernel on `device` (reading sources on another GPU through peer access), 'push' "
      "as that kernel on the sources' GPU (see push_device), writing through peer access and "
      "fenced on `stream` both ways. The caller synchronizes the stream.");
  py::class_<PageRows>(m, "PageRows",
                       "Rows of pages of a pair of tensor lists (see PageCopier): row r starts at "
                       "src_rows[r] / dst_rows[r], its page p at p * page_bytes[r].")
      .def(py::init([](const U64Array& src_rows, const U64Array& dst_rows,
                       const U64Array& page_bytes, int64_t src_pages, int64_t dst_pages) {
             PageRows r;
             r.src_rows = ToVector(src_rows, "src_rows");
             r.dst_rows = ToVector(dst_rows, "dst_rows");
             r.page_bytes = ToVector(page_bytes, "page_bytes");
             r.src_pages = src_pages;
             r.dst_pages = dst_pages;
             if (r.dst_rows.size() != r.src_rows.size() ||
                 r.page_bytes.size() != r.src_rows.size()) {
               throw StatusError(Status::InvalidArgument(
                   "src_rows, dst_rows and page_bytes must have one length"));
             }
             return r;
           }),
           py::arg("src_rows"), py::arg("dst_rows"), py::arg("page_bytes"), py::arg("src_pages"),
           py::arg("dst_pages"))
      .def(
          "segments",
          [](const PageRows& rows, const I64Array& src, const I64Array& dst) {
            const std::vector<CopySegment> segs = Segments(rows, src, dst);
            py::array_t<uint64_t> out({static_cast<py::ssize_t>(segs.size()), py::ssize_t{3}});
            auto v = out.mutable_unchecked<2>();
            for (size_t i = 0; i < segs.size(); ++i) {
              v(i, 0) = segs[i].src;
              v(i, 1) = segs[i].dst;
              v(i, 2) = segs[i].bytes;
            }
            return out;
          },
          py::arg("src_pages"), py::arg("dst_pages"),
          "[n, 3] uint64 (source, destination, bytes): one range per run of pages contiguous on "
          "both sides, per row, rows in order.")
      .def(
          "copy",
          [](const PageRows& rows, int device, const I64Array& src, const I64Array& dst,
             uintptr_t stream, const std::string& method) {
            const SegmentCopyMethod m = ParseSegmentMethod(method, "PageRows.copy");
            const std::vector<CopySegment> segs = Segments(rows, src, dst);
            Status s;
            {
              py::gil_scoped_release release;
              s = CopySegments(device, segs, stream, m);
            }
            ThrowIfError(s);
          },
          py::arg("device"), py::arg("src_pages"), py::arg("dst_pages"), py::arg("stream"),
          py::arg("method") = "dma",
          "copy_segments(device, *segments(src_pages, dst_pages).T, stream, method), the ranges "
          "worked out here rather than in Python (a copy's host time is part of its cost).");
  m.def(
      "push_device",
      [](int device, uint64_t src) {
        int out = -1;
        Status s;
        {
          py::gil_scoped_release release;
          s = PushDevice(device, src, &out);
        }
        ThrowIfError(s);
        return out;
      },
      py::arg("device"), py::arg("src"),
      "The GPU whose kernel copy_segments(device, ..., method='push') runs for sources at address "
      "`src`: the GPU the CUDA runtime says holds them, else `device` (the copy is then "
      "'kernel').");
  py::class_<Transfer, std::shared_ptr<Transfer>>(m, "Transfer",
                                                  "One asynchronous gather or scatter. Keep the KV "
                                                  "tensors and blobs alive until wait() returns.")
      .def(
          "wait",
          [](Transfer& t, double timeout_s) {
            const int64_t ms = TimeoutMs(timeout_s);
            Status s;
            {
              py::gil_scoped_release release;
              s = t.Wait(ms);
            }
            ThrowIfError(s);
          },
          py::arg("timeout_s"),
          "Blocks until every byte has landed; DeadlineExceededError after timeout_s (the copy "
          "goes on).")
      .def(
          "wait_layer",
          [](Transfer& t, int layer, double timeout_s) {
            const int64_t ms = TimeoutMs(timeout_s);
            Status s;
            {
              py::gil_scoped_release release;
              s = t.WaitLayer(layer, ms);
            }
            ThrowIfError(s);
          },
          py::arg("layer"), py::arg("timeout_s"),
          "Blocks until layer `layer` has landed for every chunk of the transfer.")
      .def(
          "stream_wait_layer",
          [](Transfer& t, int layer, uintptr_t stream) {
            Status s;
            {
              py::gil_scoped_release release;
              s = t.StreamWaitLayer(layer, stream);
            }
            ThrowIfError(s);
          },
          py::arg("layer"), py::arg("stream"),
          "Makes CUDA stream `stream` (an int, e.g. torch.cuda.Stream.cuda_stream) wait for layer "
          "`layer` "
          "on the device, without blocking the host. UnavailableError on the CPU path.")
      .def_property_readonly("done", &Transfer::Done)
      .def_property_readonly("num_layers", &Transfer::num_layers)
      .def_property_readonly(
          "method", [](const Transfer& t) { return std::string(TransferMethodName(t.method())); });

  py::class_<CopyEngine, std::shared_ptr<CopyEngine>>(
      m, "CopyEngine",
      "Moves the pages of chunks between KV tensors (host or GPU) and contiguous host blobs.\n\n"
      "segments: [(base, page_stride, page_bytes, num_pages)], one per segment (layer x K/V, "
      "...);\n"
      "device: the GPU of the segments, or -1 for host memory (the CPU path);\n"
      "pages_per_chunk: pages of one chunk (one blob); layer_segments: [[segment index]] per "
      "layer\n"
      "(empty: one layer of every segment); method: 'auto', 'direct', 'staged', 'zero_copy' or "
      "'cpu'.")
      .def(py::init(&MakeEngine), py::arg("segments"), py::arg("device"),
           py::arg("pages_per_chunk"), py::arg("layer_segments"), py::arg("method") = "auto",
           py::arg("staging_bytes") = uint64_t{64} << 20, py::arg("cpu_threads") = 2)
      .def(
          "gather",
          [](CopyEngine& e, const std::vector<int64_t>& page_ids,
             const std::vector<uint64_t>& blob_ptrs, uintptr_t after_stream) {
            std::vector<uint32_t> ids = PageIds(page_ids);
            std::vector<void*> blobs = BlobPtrs(blob_ptrs);
            std::shared_ptr<Transfer> t;
            {
              py::gil_scoped_release release;
              t = ValueOrThrow(e.Gather(ids, blobs, after_stream, nullptr));
            }
            return ReleasedWithoutGil(std::move(t));
          },
          py::arg("page_ids"), py::arg("blob_ptrs"), py::arg("after_stream") = 0,
          "Copies chunk c's pages page_ids[c*ppc:(c+1)*ppc] into blob_ptrs[c] (blob_bytes each).")
      .def(
          "scatter",
          [](CopyEngine& e, const std::vector<uint64_t>& blob_ptrs,
             const std::vector<int64_t>& page_ids, uintptr_t after_stream) {
            std::vector<uint32_t> ids = PageIds(page_ids);
            std::vector<void*> blobs = BlobPtrs(blob_ptrs);
            std::shared_ptr<Transfer> t;
            {
              py::gil_scoped_release release;
              t = ValueOrThrow(e.Scatter(blobs, ids, after_stream, nullptr));
            }
            return ReleasedWithoutGil(std::move(t));
          },
          py::arg("blob_ptrs"), py::arg("page_ids"), py::arg("after_stream") = 0,
          "Copies blob_ptrs[c] into pages page_ids[c*ppc:(c+1)*ppc], layer by layer.")
      .def_property_readonly(
          "method", [](const CopyEngine& e) { return std::string(TransferMethodName(e.method())); })
      .def_property_readonly("blob_bytes", &CopyEngine::blob_bytes)
      .def_property_readonly("num_layers", [](const CopyEngine& e) {
        const auto& l = e.layout().layer_segments;
        return l.empty() ? 1 : static_cast<int>(l.size());
      });
}

}  // namespace kvtier::bindings
