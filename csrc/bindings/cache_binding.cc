// Python view of csrc/engine: CpuTier (store / lookup / load through the pinned pool).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "bindings/status_binding.h"
#include "engine/cpu_tier.h"

namespace py = pybind11;

namespace kvtier::bindings {
namespace {

TransferMethod ParseMethod(const std::string& m) {
  if (m == "auto") return TransferMethod::kAuto;
  if (m == "direct") return TransferMethod::kDirect;
  if (m == "staged") return TransferMethod::kStaged;
  if (m == "zero_copy") return TransferMethod::kZeroCopy;
  if (m == "cpu") return TransferMethod::kCpu;
  throw StatusError(Status::InvalidArgument(
      "method must be one of 'auto', 'direct', 'staged', 'zero_copy', 'cpu', got '" + m + "'"));
}

std::vector<ChunkKey> ParseKeys(const py::bytes& keys) {
  std::string_view view = keys;
  if (view.size() % 16 != 0) {
    throw StatusError(Status::InvalidArgument("keys must be a multiple of 16 bytes, got " +
                                              std::to_string(view.size())));
  }
  std::vector<ChunkKey> out(view.size() / 16);
  for (size_t i = 0; i < out.size(); ++i) out[i] = ChunkKey::FromBytes(view.data() + 16 * i);
  return out;
}

std::vector<uint32_t> ParsePages(const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& pages) {
  if (pages.ndim() != 1) {
    throw StatusError(Status::InvalidArgument("page_ids must be 1-D, got " + std::to_string(pages.ndim()) + "-D"));
  }
  std::vector<uint32_t> out(pages.size());
  const int64_t* p = pages.data();
  for (py::ssize_t i = 0; i < pages.size(); ++i) {
    if (p[i] < 0 || p[i] > UINT32_MAX) {
      throw StatusError(Status::InvalidArgument("page_ids[" + std::to_string(i) + "] = " + std::to_string(p[i]) +
                                                " is out of range"));
    }
    out[i] = static_cast<uint32_t>(p[i]);
  }
  return out;
}

py::dict IndexStatsDict(const ChunkIndexStats& s) {
  py::dict d;
  d["entries"] = s.entries;
  d["ready"] = s.ready;
  d["writing"] = s.writing;
  d["pinned"] = s.pinned;
  d["lookups"] = s.lookups;
  d["hit_chunks"] = s.hit_chunks;
  d["miss_chunks"] = s.miss_chunks;
  d["inserts"] = s.inserts;
  d["aborts"] = s.aborts;
  d["evictions"] = s.evictions;
  d["insert_rejected"] = s.insert_rejected;
  return d;
}

}  // namespace

void BindCache(py::module_& m) {
  py::class_<TierOp>(m, "TierOp", "What a CpuTier store or load started.")
      .def_readonly("transfer", &TierOp::transfer)
      .def_readonly("chunks", &TierOp::chunks)
      .def_readonly("already_cached", &TierOp::already_cached)
      .def_readonly("skipped_full", &TierOp::skipped_full);

  py::class_<CpuTier, std::shared_ptr<CpuTier>>(m, "CpuTier")
      .def(py::init([](const std::vector<std::tuple<uint64_t, uint64_t, uint64_t, uint64_t>>& segments, int device,
                       uint32_t pages_per_chunk, const std::vector<std::vector<uint32_t>>& layer_segments,
                       uint64_t capacity_bytes, const std::string& method, uint64_t staging_bytes,
                       int cpu_threads, uint32_t fail_every_nth) {
             LayoutDesc layout;
             for (const auto& [base, stride, bytes, pages] : segments) layout.segments.push_back({base, stride, bytes, pages});
             layout.device = device;
             layout.pages_per_chunk = pages_per_chunk;
             layout.layer_segments = layer_segments;
             CpuTierOptions options;
             options.capacity_bytes = capacity_bytes;
             options.copy.method = ParseMethod(method);
             options.copy.staging_bytes = staging_bytes;
             options.copy.cpu_threads = cpu_threads;
             options.copy.fail_every_nth = fail_every_nth;
             std::unique_ptr<CpuTier> tier;
             {
               py::gil_scoped_release release;
               tier = ValueOrThrow(CpuTier::Create(layout, options));
             }
             return std::shared_ptr<CpuTier>(std::move(tier));
           }),
           py::arg("segments"), py::arg("device"), py::arg("pages_per_chunk"), py::arg("layer_segments"),
           py::arg("capacity_bytes"), py::arg("method") = "auto", py::arg("staging_bytes") = 64ull << 20,
           py::arg("cpu_threads") = 2, py::arg("fail_every_nth") = 0)
      .def("store", [](CpuTier& t, const py::bytes& keys, const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& page_ids, uintptr_t after_stream) {
             std::vector<ChunkKey> k = ParseKeys(keys);
             std::vector<uint32_t> p = ParsePages(page_ids);
             py::gil_scoped_release release;
             return ValueOrThrow(t.Store(k.data(), k.size(), p, after_stream));
           }, py::arg("keys"), py::arg("page_ids"), py::arg("after_stream") = 0)
      .def("lookup", [](CpuTier& t, const py::bytes& keys) {
             std::vector<ChunkKey> k = ParseKeys(keys);
             py::gil_scoped_release release;
             return t.Lookup(k.data(), k.size());
           }, py::arg("keys"))
      .def("load", [](CpuTier& t, const py::bytes& keys, const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& page_ids, uintptr_t after_stream) {
             std::vector<ChunkKey> k = ParseKeys(keys);
             std::vector<uint32_t> p = ParsePages(page_ids);
             py::gil_scoped_release release;
             return ValueOrThrow(t.Load(k.data(), k.size(), p, after_stream));
           }, py::arg("keys"), py::arg("page_ids"), py::arg("after_stream") = 0)
      .def("drain", [](CpuTier& t, double timeout_s) {
             Status s;
             {
               py::gil_scoped_release release;
               s = t.Drain(static_cast<int64_t>(timeout_s * 1000));
             }
             ThrowIfError(s);
           }, py::arg("timeout_s"))
      .def_property_readonly("blob_bytes", &CpuTier::blob_bytes)
      .def_property_readonly("capacity_chunks", &CpuTier::capacity_chunks)
      .def_property_readonly("pages_per_chunk", &CpuTier::pages_per_chunk)
      .def_property_readonly("method", [](const CpuTier& t) { return TransferMethodName(t.method()); })
      .def_property_readonly("pinned", [](const CpuTier& t) { return t.arena().kind() == ArenaKind::kPinnedHost; })
      .def_property_readonly("arena_kind", [](const CpuTier& t) { return ArenaKindName(t.arena().kind()); })
      .def("stats", [](const CpuTier& t) {
        CpuTierStats s = t.stats();
        py::dict d;
        d["index"] = IndexStatsDict(s.index);
        py::dict b;
        b["num_blocks"] = s.blocks.num_blocks;
        b["block_bytes"] = s.blocks.block_bytes;
        b["free_blocks"] = s.blocks.free_blocks;
        b["used_blocks"] = s.blocks.used_blocks;
        b["peak_used_blocks"] = s.blocks.peak_used_blocks;
        d["blocks"] = b;
        d["store_calls"] = s.store_calls;
        d["chunks_stored"] = s.chunks_stored;
        d["chunks_already_cached"] = s.chunks_already_cached;
        d["chunks_skipped_full"] = s.chunks_skipped_full;
        d["chunks_failed"] = s.chunks_failed;
        d["load_calls"] = s.load_calls;
        d["chunks_loaded"] = s.chunks_loaded;
        d["bytes_offloaded"] = s.bytes_offloaded;
        d["bytes_loaded"] = s.bytes_loaded;
        d["in_flight"] = s.in_flight;
        return d;
      });
}

}  // namespace kvtier::bindings
