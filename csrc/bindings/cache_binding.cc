// Python view of csrc/engine: CpuTier (store / lookup / load through the pinned pool).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <string>

#include "bindings/status_binding.h"
#include "engine/cpu_tier.h"

namespace py = pybind11;

namespace kvtier::bindings {
namespace {

constexpr size_t kEventRecordBytes = 18;

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

std::vector<uint32_t> ParsePages(
    const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& pages) {
  if (pages.ndim() != 1) {
    throw StatusError(Status::InvalidArgument("page_ids must be 1-D, got " +
                                              std::to_string(pages.ndim()) + "-D"));
  }
  std::vector<uint32_t> out(pages.size());
  const int64_t* p = pages.data();
  for (py::ssize_t i = 0; i < pages.size(); ++i) {
    if (p[i] < 0 || p[i] > UINT32_MAX) {
      throw StatusError(Status::InvalidArgument(
          "page_ids[" + std::to_string(i) + "] = " + std::to_string(p[i]) + " is out of range"));
    }
    out[i] = static_cast<uint32_t>(p[i]);
  }
  return out;
}

// The address of a whole blob view (begin_put's or acquire_blobs'); InvalidArgument naming `what`
// for a buffer of another size (an address outside the pool is the tier's to refuse).
const void* BlobAddress(const CpuTier& t, const py::buffer& blob, const char* what) {
  py::buffer_info info = blob.request();
  const auto nbytes = static_cast<uint64_t>(info.size * info.itemsize);
  if (nbytes != t.blob_bytes()) {
    throw StatusError(
        Status::InvalidArgument(std::string(what) + ": blob is " + std::to_string(nbytes) +
                                " bytes, a block's blob is " + std::to_string(t.blob_bytes())));
  }
  return info.ptr;
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
                       int cpu_threads, uint32_t fail_every_nth, const std::string& disk_dir,
                       uint64_t disk_bytes, const py::bytes& layout_fingerprint, const std::string& disk_backend,
                       uint32_t disk_admit_min_seen, unsigned disk_queue_depth, double disk_io_timeout_s,
                       const std::string& eviction_policy, bool deterministic_writeback,
                       uint32_t disk_max_writebacks_in_flight, const std::string& disk_geometry_label,
                       bool disk_reset_on_mismatch, double disk_persist_interval_s, int64_t event_capacity,
                       bool disk_write_through) {
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
             options.eviction_policy = eviction_policy;
             if (event_capacity < 0) {
               throw StatusError(Status::InvalidArgument("event_capacity must be >= 0 (0: no events), got " +
                                                         std::to_string(event_capacity)));
             }
             options.event_capacity = static_cast<size_t>(event_capacity);
             if (!disk_dir.empty()) {
               std::string_view fp = layout_fingerprint;
               if (fp.size() != 16) {
                 throw StatusError(Status::InvalidArgument("layout_fingerprint must be 16 bytes, got " +
                                                           std::to_string(fp.size())));
               }
               options.disk.enabled = true;
               options.disk.store.dir = disk_dir;
               options.disk.store.capacity_bytes = disk_bytes;
               std::copy(fp.begin(), fp.end(), options.disk.store.layout_fingerprint.begin());
               if (disk_backend == "auto") options.disk.store.backend = IoBackendKind::kAuto;
               else if (disk_backend == "io_uring") options.disk.store.backend = IoBackendKind::kIoUring;
               else if (disk_backend == "posix") options.disk.store.backend = IoBackendKind::kPosix;
               else throw StatusError(Status::InvalidArgument("disk_backend must be 'auto', 'io_uring' or 'posix', got '" + disk_backend + "'"));
               options.disk.admit_min_seen = disk_admit_min_seen;
               options.disk.store.queue_depth = disk_queue_depth;
               options.disk.store.io_timeout_ms = static_cast<int64_t>(disk_io_timeout_s * 1000);
               options.disk.deterministic_writeback = deterministic_writeback;
               options.disk.write_through = disk_write_through;
               if (disk_max_writebacks_in_flight == 0) {
                 throw StatusError(Status::InvalidArgument("disk_max_writebacks_in_flight must be at least 1"));
               }
               options.disk.max_demotions_in_flight = disk_max_writebacks_in_flight;
               options.disk.store.geometry_label = disk_geometry_label;
               options.disk.store.reset_on_mismatch = disk_reset_on_mismatch;
               if (!(disk_persist_interval_s >= 0) || disk_persist_interval_s > 1e9) {
                 throw StatusError(Status::InvalidArgument("disk_persist_interval_s must be a number >= 0 (0: off), got " +
                                                           std::to_string(disk_persist_interval_s)));
               }
               options.disk.persist_interval_ms = static_cast<int64_t>(disk_persist_interval_s * 1000.0);
               if (disk_persist_interval_s > 0 && options.disk.persist_interval_ms == 0) options.disk.persist_interval_ms = 1;
             }
             std::unique_ptr<CpuTier> tier;
             {
               py::gil_scoped_release release;
               tier = ValueOrThrow(CpuTier::Create(layout, options));
             }
             return std::shared_ptr<CpuTier>(std::move(tier));
           }),
           py::arg("segments"), py::arg("device"), py::arg("pages_per_chunk"), py::arg("layer_segments"),
           py::arg("capacity_bytes"), py::arg("method") = "auto", py::arg("staging_bytes") = 64ull << 20,
           py::arg("cpu_threads") = 2, py::arg("fail_every_nth") = 0, py::arg("disk_dir") = "",
           py::arg("disk_bytes") = 0, py::arg("layout_fingerprint") = py::bytes(), py::arg("disk_backend") = "auto",
           py::arg("disk_admit_min_seen") = 2, py::arg("disk_queue_depth") = 32, py::arg("disk_io_timeout_s") = 10.0,
           py::arg("eviction_policy") = "lru", py::arg("deterministic_writeback") = false,
           py::arg("disk_max_writebacks_in_flight") = 64, py::arg("disk_geometry_label") = "",
           py::arg("disk_reset_on_mismatch") = false, py::arg("disk_persist_interval_s") = 0.0,
           py::arg("event_capacity") = 0, py::arg("disk_write_through") = false)
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
      .def("prefetch", [](CpuTier& t, const py::bytes& keys) {
             std::vector<ChunkKey> k = ParseKeys(keys);
             py::gil_scoped_release release;
             return t.Prefetch(k.data(), k.size());
           }, py::arg("keys"), "Start reading the leading disk-only chunks into the pool; returns reads started.")
      .def("set_admission_hook", [](CpuTier& t, py::object hook) {
             if (hook.is_none()) {
               t.SetAdmissionHook(nullptr);
               return;
             }
             // Called from C++ with no kvtier lock held: take the GIL, call, never let an exception
             // escape into C++ (a failing hook admits nothing and the error is printed).
             auto shared = std::make_shared<py::object>(std::move(hook));
             t.SetAdmissionHook([shared](const std::vector<ChunkKey>& keys, const std::vector<uint32_t>& seen) {
               py::gil_scoped_acquire gil;
               std::vector<uint8_t> out(keys.size(), 0);
               try {
                 py::list key_list, seen_list;
                 for (size_t i = 0; i < keys.size(); ++i) {
                   char b[16];
                   keys[i].ToBytes(b);
                   key_list.append(py::bytes(b, 16));
                   seen_list.append(seen[i]);
                 }
                 py::object verdict = (*shared)(key_list, seen_list);
                 size_t i = 0;
                 for (py::handle v : verdict) {
                   if (i >= out.size()) break;
                   out[i++] = py::bool_(py::reinterpret_borrow<py::object>(v)) ? 1 : 0;
                 }
               } catch (py::error_already_set& e) {
                 e.restore();
                 PyErr_Print();
               }
               return out;
             });
           }, py::arg("hook"), "hook(keys: list[bytes], seen: list[int]) -> list[bool], per batch of evicted chunks; None restores the built-in rule.")
      .def("lookup_tiers", [](CpuTier& t, const py::bytes& keys) {
             std::vector<ChunkKey> k = ParseKeys(keys);
             std::vector<uint8_t> tiers;
             {
               py::gil_scoped_release release;
               tiers = t.LookupTiers(k.data(), k.size());
             }
             return py::bytes(reinterpret_cast<const char*>(tiers.data()), tiers.size());
           }, py::arg("keys"), "Per leading chunk: 1 = pool, 2 = disk only (bytes).")
      .def("media", [](CpuTier& t, const py::bytes& keys) {
             std::vector<ChunkKey> k = ParseKeys(keys);
             std::vector<uint8_t> media;
             {
               py::gil_scoped_release release;
               media = t.Media(k.data(), k.size());
             }
             return py::bytes(reinterpret_cast<const char*>(media.data()), media.size());
           }, py::arg("keys"), "Per key, where it is as bits: 1 = pool, 2 = disk (bytes); does not stop at a miss.")
      .def("take_events", [](CpuTier& t, int64_t max) {
             if (max < 0) {
               throw StatusError(Status::InvalidArgument("max must be >= 0 (0: all), got " + std::to_string(max)));
             }
             std::vector<Event> events;
             {
               py::gil_scoped_release release;
               events = t.TakeEvents(static_cast<size_t>(max));
             }
             // One record of kEventRecordBytes per event: kind, medium, then the 16-byte key.
             std::string packed(events.size() * kEventRecordBytes, '\0');
             for (size_t i = 0; i < events.size(); ++i) {
               char* r = packed.data() + i * kEventRecordBytes;
               r[0] = static_cast<char>(events[i].kind);
               r[1] = static_cast<char>(events[i].medium);
               events[i].key.ToBytes(r + 2);
             }
             return py::bytes(packed);
           }, py::arg("max") = 0,
           "Take the oldest KV events (all with max=0) as packed 18-byte records: kind (0 stored, 1 removed, 2 cleared), medium (1 cpu, 2 disk), 16-byte key.")
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
      .def("persist", [](CpuTier& t, double timeout_s) {
             if (!(timeout_s >= 0)) {
               throw StatusError(Status::InvalidArgument("timeout_s must be a number >= 0, got " + std::to_string(timeout_s)));
             }
             StatusOr<PersistResult> r = Status::Internal("not run");
             {
               py::gil_scoped_release release;
               r = t.Persist(static_cast<int64_t>(std::min(timeout_s, 1e9) * 1000));
             }
             PersistResult v = ValueOrThrow(std::move(r));
             py::dict d;
             d["written"] = v.written;
             d["skipped"] = v.skipped;
             d["failed"] = v.failed;
             d["not_started"] = v.not_started;
             d["still_running"] = v.still_running;
             d["deadline_exceeded"] = v.deadline_exceeded;
             return d;
           }, py::arg("timeout_s"),
           "Write the pool's chunks the disk does not hold to disk (by timeout_s); returns what it did.")
      .def("begin_put", [](std::shared_ptr<CpuTier> t, const py::bytes& key) {
             std::vector<ChunkKey> k = ParseKeys(key);
             if (k.size() != 1) throw StatusError(Status::InvalidArgument("begin_put takes one 16-byte key"));
             void* p = ValueOrThrow(t->BeginPut(k[0]));
             // A writable view of the reserved block; it keeps the tier alive while it exists.
             auto* keep = new std::shared_ptr<CpuTier>(t);
             py::capsule owner(keep, [](void* q) { delete static_cast<std::shared_ptr<CpuTier>*>(q); });
             py::array_t<uint8_t> arr({static_cast<py::ssize_t>(t->blob_bytes())}, {1}, static_cast<uint8_t*>(p), owner);
             return py::memoryview(arr);
           }, py::arg("key"), "Reserve a block for key; returns a writable memoryview of blob_bytes to fill.")
      .def("commit_put", [](CpuTier& t, const py::bytes& key) {
             std::vector<ChunkKey> k = ParseKeys(key);
             if (k.size() != 1) throw StatusError(Status::InvalidArgument("commit_put takes one 16-byte key"));
             ThrowIfError(t.CommitPut(k[0]));
           }, py::arg("key"))
      .def("begin_puts", [](CpuTier& t, const py::bytes& keys) {
             std::vector<ChunkKey> k = ParseKeys(keys);
             std::vector<uint64_t> addrs;
             addrs.reserve(k.size());
             Status error;
             {
               py::gil_scoped_release release;
               for (const ChunkKey& key : k) {
                 StatusOr<void*> p = t.BeginPut(key);
                 if (p.ok()) {
                   addrs.push_back(reinterpret_cast<uint64_t>(*p));
                 } else if (p.status().code() == StatusCode::kAlreadyExists) {
                   addrs.push_back(0);
                 } else if (p.status().code() == StatusCode::kResourceExhausted) {
                   break;
                 } else {
                   error = p.status();
                   break;
                 }
               }
               if (!error.ok()) {  // nothing stays reserved
                 for (size_t i = 0; i < addrs.size(); ++i) {
                   if (addrs[i] != 0) (void)t.AbortPut(k[i]);
                 }
               }
             }
             ThrowIfError(error);
             py::array_t<uint64_t> out(static_cast<py::ssize_t>(addrs.size()));
             std::copy(addrs.begin(), addrs.end(), out.mutable_data());
             return out;
           }, py::arg("keys"),
           "begin_put of each key in order, up to the first that gets no block (the tier full): "
           "the addresses of their blocks (blob_bytes each, valid until commit or abort), 0 for a "
           "key already cached; shorter than keys where the tier ran out of blocks. On another "
           "error nothing stays reserved.")
      .def("commit_puts", [](CpuTier& t, const py::bytes& keys) {
             std::vector<ChunkKey> k = ParseKeys(keys);
             for (size_t i = 0; i < k.size(); ++i) {
               Status s = t.CommitPut(k[i]);
               if (!s.ok()) {
                 ThrowIfError(Status(s.code(), "commit_puts: keys[" + std::to_string(i) + "]: " + s.message()));
               }
             }
           }, py::arg("keys"), "commit_put of each key in order; an error names the key's index (those before are committed).")
      .def("abort_put", [](CpuTier& t, const py::bytes& key) {
             std::vector<ChunkKey> k = ParseKeys(key);
             if (k.size() != 1) throw StatusError(Status::InvalidArgument("abort_put takes one 16-byte key"));
             ThrowIfError(t.AbortPut(k[0]));
           }, py::arg("key"))
      .def("acquire_blobs", [](std::shared_ptr<CpuTier> t, const py::bytes& keys) {
             std::vector<ChunkKey> k = ParseKeys(keys);
             std::vector<const void*> ptrs;
             {
               py::gil_scoped_release release;
               ptrs = t->AcquireBlobs(k.data(), k.size());
             }
             py::list out;
             for (const void* p : ptrs) {
               auto* keep = new std::shared_ptr<CpuTier>(t);
               py::capsule owner(keep, [](void* q) { delete static_cast<std::shared_ptr<CpuTier>*>(q); });
               py::array_t<uint8_t> arr({static_cast<py::ssize_t>(t->blob_bytes())}, {1},
                                        static_cast<const uint8_t*>(p), owner);
               py::detail::array_proxy(arr.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
               out.append(py::memoryview(arr));
             }
             return out;
           }, py::arg("keys"), "Pin the leading cached chunks (pool only); read-only views of their blobs.")
      .def("release_blobs", [](CpuTier& t, const py::bytes& keys) {
             std::vector<ChunkKey> k = ParseKeys(keys);
             ThrowIfError(t.ReleaseBlobs(k.data(), k.size()));
           }, py::arg("keys"))
      .def("note_blob_checksum", [](CpuTier& t, const py::buffer& blob, uint32_t crc32c) {
             const void* p = BlobAddress(t, blob, "note_blob_checksum");
             ThrowIfError(t.NoteBlobChecksum(p, crc32c));
           }, py::arg("blob"), py::arg("crc32c"),
           "Record the CRC32C of a block's bytes, for a view from begin_put (not yet committed or "
           "aborted) or acquire_blobs (not yet released) whose bytes it is the CRC32C of; the tier "
           "keeps it until the block is reserved again.")
      .def("blob_checksum", [](CpuTier& t, const py::buffer& blob) {
             const void* p = BlobAddress(t, blob, "blob_checksum");
             StatusOr<uint32_t> crc = Status::Internal("not run");
             {
               py::gil_scoped_release release;
               crc = t.BlobChecksum(p);
             }
             return ValueOrThrow(std::move(crc));
           }, py::arg("blob"),
           "The CRC32C of a held block's blob (a view from begin_put or acquire_blobs): the one "
           "noted, else computed now and kept.")
      .def("kept_blob_checksum", [](CpuTier& t, const py::buffer& blob) -> std::optional<uint32_t> {
             const void* p = BlobAddress(t, blob, "kept_blob_checksum");
             return ValueOrThrow(t.KeptBlobChecksum(p));
           }, py::arg("blob"),
           "The CRC32C kept for a held block's blob (as blob_checksum), or None where none is kept "
           "(nothing is computed).")
      .def_property_readonly("blob_bytes", &CpuTier::blob_bytes)
      .def_property_readonly("capacity_chunks", &CpuTier::capacity_chunks)
      .def_property_readonly("pages_per_chunk", &CpuTier::pages_per_chunk)
      .def_property_readonly("method", [](const CpuTier& t) { return TransferMethodName(t.method()); })
      .def_property_readonly("pinned", [](const CpuTier& t) { return t.arena().kind() == ArenaKind::kPinnedHost; })
      .def_property_readonly("arena_kind", [](const CpuTier& t) { return ArenaKindName(t.arena().kind()); })
      .def_property_readonly(
          "arena_region",
          [](const CpuTier& t) {
            return py::make_tuple(reinterpret_cast<uintptr_t>(t.arena().base()), t.arena().size());
          },
          "(address, bytes) of the host arena holding every blob: what a transport registers once.")
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
        if (s.has_disk) {
          py::dict k;
          k["backend"] = s.disk.backend;
          k["direct_io"] = s.disk.direct_io;
          k["slots_total"] = s.disk.slots_total;
          k["slots_used"] = s.disk.slots_used;
          k["writes"] = s.disk.writes;
          k["write_bytes"] = s.disk.write_bytes;
          k["reads"] = s.disk.reads;
          k["read_bytes"] = s.disk.read_bytes;
          k["write_failures"] = s.disk.write_failures;
          k["read_failures"] = s.disk.read_failures;
          k["corrupt_detected"] = s.disk.corrupt_detected;
          k["evictions"] = s.disk.evictions;
          k["enospc"] = s.disk.enospc;
          k["nospace"] = s.disk.nospace;
          k["recovered_slots"] = s.disk.recovered_slots;
          k["skipped_slots_at_open"] = s.disk.skipped_slots_at_open;
          k["open_seconds"] = s.disk.open_seconds;
          k["lookup_chunks"] = s.lookup_disk_chunks;
          k["chunks_promoted"] = s.chunks_promoted;
          k["promotion_failures"] = s.promotion_failures;
          k["demotions_written"] = s.demotions_written;
          k["demotions_failed"] = s.demotions_failed;
          k["demotions_rejected"] = s.demotions_rejected;
          k["chunks_prefetched"] = s.chunks_prefetched;
          k["persist_runs"] = s.persist_runs;
          k["persist_written"] = s.persist_written;
          k["persist_failed"] = s.persist_failed;
          k["persist_deadline_exceeded"] = s.persist_deadline_exceeded;
          k["write_through_written"] = s.write_through_written;
          k["write_through_failed"] = s.write_through_failed;
          k["write_through_queued"] = s.write_through_queued;
          k["write_through_in_flight"] = s.write_through_in_flight;
          k["reformatted_at_open"] = s.disk.reformatted_at_open;
          k["reformat_reason"] = s.disk.reformat_reason;
          d["disk"] = k;
        }
        d["blob_checksums_computed"] = s.blob_checksums_computed;
        d["event_capacity"] = s.event_capacity;
        d["events_recorded"] = s.events_recorded;
        d["events_dropped"] = s.events_dropped;
        d["events_pending"] = s.events_pending;
        d["index"]["demoting"] = s.index.demoting;
        d["index"]["demotions"] = s.index.demotions;
        d["index"]["demotions_not_admitted"] = s.index.demotions_not_admitted;
        d["index"]["demotions_busy"] = s.index.demotions_busy;
        return d;
      });
}

}  // namespace kvtier::bindings
