// Python view of csrc/storage: DiskStore with blocking convenience methods (for tests and tools;
// the tier engine uses the asynchronous C++ API), and aligned_buffer for O_DIRECT-ready memory.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "bindings/status_binding.h"
#include "common/mutex.h"
#include "storage/crc32c.h"
#include "storage/disk_store.h"
#include "storage/io_probe.h"

namespace py = pybind11;

namespace kvtier::bindings {
namespace {

ChunkKey KeyArg(const py::bytes& key, const char* name = "key") {
  std::string_view s = key;
  if (s.size() != 16) {
    throw StatusError(Status::InvalidArgument(std::string(name) + " must be 16 bytes, got " +
                                              std::to_string(s.size())));
  }
  return ChunkKey::FromBytes(s.data());
}

int64_t TimeoutMs(double seconds, const char* name) {
  if (!std::isfinite(seconds) || seconds <= 0) {
    throw StatusError(
        Status::InvalidArgument(std::string(name) + " must be a positive number of seconds"));
  }
  return std::max<int64_t>(1, static_cast<int64_t>(std::ceil(seconds * 1000.0)));
}

uint64_t NonNegative(int64_t v, const char* name) {
  if (v < 0)
    throw StatusError(Status::InvalidArgument(std::string(name) + " must not be negative, got " +
                                              std::to_string(v)));
  return static_cast<uint64_t>(v);
}

// An exported Python buffer; released (with the GIL held) when destroyed.
class HeldBuffer {
 public:
  HeldBuffer(const py::object& obj, bool writable, const char* name) {
    int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj.ptr(), &view_, flags) != 0) {
      PyErr_Clear();
      throw StatusError(Status::InvalidArgument(std::string(name) + " must be a C-contiguous" +
                                                (writable ? " writable" : "") +
                                                " buffer (e.g. kvtier._core.aligned_buffer(n))"));
    }
    held_ = true;
  }
  ~HeldBuffer() {
    if (held_) PyBuffer_Release(&view_);
  }
  HeldBuffer(const HeldBuffer&) = delete;
  HeldBuffer& operator=(const HeldBuffer&) = delete;
  void* data() const { return view_.buf; }
  size_t size() const { return static_cast<size_t>(view_.len); }

 private:
  Py_buffer view_{};
  bool held_ = false;
};

// The answer of one asynchronous call, waited for with the GIL released.
struct Answer {
  Mutex mu;
  CondVar cv;
  bool done GUARDED_BY(mu) = false;
  Status status GUARDED_BY(mu);
};

// Thread safety: Python threads may call any method at once (the blocking ones release the GIL);
// close() refuses new calls, waits for those running to return, then closes the store.
class PyDiskStore {
 public:
  // Keeps the store open for the duration of one call.
  class Call {
   public:
    explicit Call(PyDiskStore* owner) : owner_(owner) {
      MutexLock lk(&owner_->mu_);
      if (!owner_->store_ || owner_->closing_)
        throw StatusError(Status::FailedPrecondition("the DiskStore is closed"));
      ++owner_->active_calls_;
    }
    ~Call() {
      MutexLock lk(&owner_->mu_);
      if (--owner_->active_calls_ == 0) owner_->idle_cv_.NotifyAll();
    }
    Call(const Call&) = delete;
    Call& operator=(const Call&) = delete;
    DiskStore& store() const { return *owner_->store_; }

   private:
    PyDiskStore* owner_;
  };

  explicit PyDiskStore(const DiskStoreOptions& options) {
    py::gil_scoped_release release;
    store_ = ValueOrThrow(DiskStore::Open(options));
  }

  // A store dropped without close() is closed here (no call can be running: none holds a
  // reference).
  ~PyDiskStore() { Close(); }

  void Write(const py::bytes& key, const py::object& data, double timeout_s) {
    Call call(this);
    DiskStore& store = call.store();
    ChunkKey k = KeyArg(key);
    int64_t timeout_ms = TimeoutMs(timeout_s, "timeout_s");
    auto buf = std::make_unique<HeldBuffer>(data, false, "data");
    CheckBuffer(*buf, "data");
    auto answer = std::make_shared<Answer>();
    Status submitted;
    {
      py::gil_scoped_release release;
      submitted = store.Write(k, buf->data(), Notifier(answer));
    }
    ThrowIfError(submitted);
    Finish(answer, std::move(buf), timeout_ms, "write");
  }

  void Read(const py::bytes& key, const py::object& out, double timeout_s) {
    Call call(this);
    DiskStore& store = call.store();
    ChunkKey k = KeyArg(key);
    int64_t timeout_ms = TimeoutMs(timeout_s, "timeout_s");
    auto buf = std::make_unique<HeldBuffer>(out, true, "out");
    CheckBuffer(*buf, "out");
    auto answer = std::make_shared<Answer>();
    Status submitted;
    {
      py::gil_scoped_release release;
      submitted = store.Read(k, buf->data(), Notifier(answer));
    }
    ThrowIfError(submitted);
    Finish(answer, std::move(buf), timeout_ms, "read");
  }

  size_t Lookup(const py::bytes& keys) {
    Call call(this);
    DiskStore& store = call.store();
    std::string_view s = keys;
    if (s.size() % 16 != 0) {
      throw StatusError(
          Status::InvalidArgument("keys must be n * 16 bytes, got " + std::to_string(s.size())));
    }
    std::vector<ChunkKey> ks(s.size() / 16);
    for (size_t i = 0; i < ks.size(); ++i) ks[i] = ChunkKey::FromBytes(s.data() + 16 * i);
    return store.Lookup(ks.data(), ks.size());
  }

  bool Contains(const py::bytes& key) {
    Call call(this);
    return call.store().Contains(KeyArg(key));
  }

  void Erase(const py::bytes& key) {
    Call call(this);
    ThrowIfError(call.store().Erase(KeyArg(key)));
  }

  void Flush(double timeout_s) {
    Call call(this);
    DiskStore& store = call.store();
    int64_t timeout_ms = TimeoutMs(timeout_s, "timeout_s");
    Status s;
    {
      py::gil_scoped_release release;
      s = store.Flush(timeout_ms);
    }
    ThrowIfError(s);
    held_.clear();  // no request is in flight: abandoned buffers are free again
  }

  void Close() {
    {
      MutexLock lk(&mu_);
      if (!store_ || closing_) return;
      closing_ = true;
    }
    {
      // Calls in other threads end by their deadlines; the store then waits for its own I/O.
      py::gil_scoped_release release;
      MutexLock lk(&mu_);
      idle_cv_.Wait(lk, [&]() REQUIRES_LOCK(mu_) { return active_calls_ == 0; });
      std::unique_ptr<DiskStore> store = std::move(store_);
      lk.Unlock();
      store.reset();
    }
    held_.clear();
  }

  bool closed() {
    MutexLock lk(&mu_);
    return !store_ || closing_;
  }

  py::dict Stats() {
    Call call(this);
    DiskStoreStats s = call.store().stats();
    py::dict d;
    d["backend"] = s.backend;
    d["backend_fallback_reason"] = s.backend_fallback_reason;
    d["direct_io"] = s.direct_io;
    d["preallocated"] = s.preallocated;
    d["fs_type"] = s.fs_type;
    d["slot_bytes"] = s.slot_bytes;
    d["blob_bytes"] = s.blob_bytes;
    d["slots_total"] = s.slots_total;
    d["slots_used"] = s.slots_used;
    d["slots_writing"] = s.slots_writing;
    d["slots_pinned"] = s.slots_pinned;
    d["writes"] = s.writes;
    d["write_bytes"] = s.write_bytes;
    d["reads"] = s.reads;
    d["read_bytes"] = s.read_bytes;
    d["write_failures"] = s.write_failures;
    d["read_failures"] = s.read_failures;
    d["corrupt_detected"] = s.corrupt_detected;
    d["evictions"] = s.evictions;
    d["erases"] = s.erases;
    d["writes_rejected_busy"] = s.writes_rejected_busy;
    d["enospc"] = s.enospc;
    d["writes_refused_nospace"] = s.writes_refused_nospace;
    d["nospace"] = s.nospace;
    d["deadline_exceeded"] = s.deadline_exceeded;
    d["abandoned_in_flight"] = s.abandoned_in_flight;
    d["in_flight"] = s.in_flight;
    d["io_resubmits"] = s.io_resubmits;
    d["recovered_slots"] = s.recovered_slots;
    d["skipped_slots_at_open"] = s.skipped_slots_at_open;
    d["foreign_slots_at_open"] = s.foreign_slots_at_open;
    d["duplicate_slots_at_open"] = s.duplicate_slots_at_open;
    d["payloads_verified_at_open"] = s.payloads_verified_at_open;
    d["reformatted_at_open"] = s.reformatted_at_open;
    d["reformat_reason"] = s.reformat_reason;
    d["open_seconds"] = s.open_seconds;
    return d;
  }

  // A property read: (blob_bytes, path, ...) of the open store.
  template <typename F>
  auto Property(F&& f) {
    Call call(this);
    return f(call.store());
  }

 private:
  void CheckBuffer(const HeldBuffer& buf, const char* name) {
    if (buf.size() != store_->blob_bytes()) {
      throw StatusError(Status::InvalidArgument(
          std::string(name) + " must be exactly blob_bytes = " +
          std::to_string(store_->blob_bytes()) + " bytes, got " + std::to_string(buf.size())));
    }
    if (reinterpret_cast<uintptr_t>(buf.data()) % kDiskBlockBytes != 0) {
      throw StatusError(
          Status::InvalidArgument(std::string(name) +
                                  " must be 4096-byte aligned for O_DIRECT; allocate it with "
                                  "kvtier._core.aligned_buffer(n)"));
    }
  }

  static DiskStore::Callback Notifier(const std::shared_ptr<Answer>& answer) {
    return [answer](const Status& s) {
      MutexLock lk(&answer->mu);
      answer->status = s;
      answer->done = true;
      answer->cv.NotifyAll();
    };
  }

  // Waits for the answer with the GIL released. If the wait times out, or the store abandoned
  // the request at its deadline, the device may still use the buffer: keep it exported until a
  // flush() succeeds or the store closes.
  void Finish(const std::shared_ptr<Answer>& answer, std::unique_ptr<HeldBuffer> buf,
              int64_t timeout_ms, const char* what) {
    bool done;
    Status status;
    {
      py::gil_scoped_release release;
      MutexLock lk(&answer->mu);
      done = answer->cv.WaitFor(lk, std::chrono::milliseconds(timeout_ms),
                                [&]() REQUIRES_LOCK(answer->mu) { return answer->done; });
      status = answer->status;
    }
    if (!done) {
      held_.push_back(std::move(buf));
      throw StatusError(
          Status::DeadlineExceeded(std::string(what) + " did not complete within timeout_s"));
    }
    if (status.code() == StatusCode::kDeadlineExceeded) held_.push_back(std::move(buf));
    ThrowIfError(status);
  }

  Mutex mu_;
  CondVar idle_cv_;
  std::unique_ptr<DiskStore> store_;  // set in the constructor, reset once by Close
  bool closing_ GUARDED_BY(mu_) = false;
  int active_calls_ GUARDED_BY(mu_) = 0;
  // Buffers of requests given up on (timeout_s) or abandoned at their deadline: the device may
  // still use them, so they stay exported until a flush() succeeds or the store closes.
  // Touched with the GIL held only.
  std::vector<std::unique_ptr<HeldBuffer>> held_;
};

IoBackendKind ParseBackend(const std::string& s) {
  if (s == "auto") return IoBackendKind::kAuto;
  if (s == "io_uring") return IoBackendKind::kIoUring;
  if (s == "posix") return IoBackendKind::kPosix;
  throw StatusError(
      Status::InvalidArgument("backend must be 'auto', 'io_uring' or 'posix', got '" + s + "'"));
}

VerifyAtOpen ParseVerify(const std::string& s) {
  if (s == "auto") return VerifyAtOpen::kAuto;
  if (s == "headers") return VerifyAtOpen::kHeaders;
  if (s == "full") return VerifyAtOpen::kFull;
  throw StatusError(Status::InvalidArgument(
      "verify_at_open must be 'auto', 'headers' or 'full', got '" + s + "'"));
}

}  // namespace

void BindStorage(py::module_& m) {
  m.def(
      "crc32c",
      [](py::buffer data, uint32_t value) {
        py::buffer_info info = data.request();
        const size_t len = static_cast<size_t>(info.size) * static_cast<size_t>(info.itemsize);
        py::gil_scoped_release release;
        return Crc32c(value, info.ptr, len);
      },
      py::arg("data"), py::arg("value") = 0,
      "CRC32C (Castagnoli) of a buffer, continuing from `value`; the CPU's instruction where it "
      "has one.");

  m.def(
      "aligned_buffer",
      [](int64_t nbytes) {
        uint64_t n = NonNegative(nbytes, "nbytes");
        void* p = nullptr;
        if (posix_memalign(&p, kDiskBlockBytes, std::max<uint64_t>(n, 1)) != 0) {
          throw StatusError(
              Status::ResourceExhausted("cannot allocate " + std::to_string(n) + " aligned bytes"));
        }
        std::memset(p, 0, n);
        py::capsule owner(p, [](void* q) { std::free(q); });
        return py::array_t<uint8_t>({static_cast<py::ssize_t>(n)}, {1}, static_cast<uint8_t*>(p),
                                    owner);
      },
      py::arg("nbytes"),
      "A zeroed numpy uint8 array of nbytes whose data is 4096-byte aligned (what O_DIRECT "
      "needs).");

  py::class_<PyDiskStore>(
      m, "DiskStore",
      "The disk tier's slot store: one preallocated cache file in `dir`, O_DIRECT I/O, "
      "checksummed slots, LRU at capacity, recovery at open. Blocking methods release the GIL.")
      .def(py::init([](const std::string& dir, int64_t capacity_bytes, int64_t blob_bytes,
                       const py::bytes& layout_fingerprint, const std::string& backend,
                       int64_t queue_depth, int64_t posix_threads, double io_timeout_s,
                       bool preallocate, bool allow_buffered_io, const std::string& verify_at_open,
                       double nospace_retry_s, double close_timeout_s,
                       const std::string& geometry_label, bool reset_on_mismatch) {
             DiskStoreOptions o;
             o.geometry_label = geometry_label;
             o.reset_on_mismatch = reset_on_mismatch;
             o.dir = dir;
             o.capacity_bytes = NonNegative(capacity_bytes, "capacity_bytes");
             o.blob_bytes = NonNegative(blob_bytes, "blob_bytes");
             std::string_view fp = layout_fingerprint;
             if (fp.size() != 16) {
               throw StatusError(Status::InvalidArgument(
                   "layout_fingerprint must be 16 bytes, got " + std::to_string(fp.size())));
             }
             std::memcpy(o.layout_fingerprint.data(), fp.data(), 16);
             o.backend = ParseBackend(backend);
             if (queue_depth < 1 || queue_depth > 4096) {
               throw StatusError(Status::InvalidArgument("queue_depth must be in [1, 4096], got " +
                                                         std::to_string(queue_depth)));
             }
             if (posix_threads < 1 || posix_threads > 1024) {
               throw StatusError(Status::InvalidArgument(
                   "posix_threads must be in [1, 1024], got " + std::to_string(posix_threads)));
             }
             o.queue_depth = static_cast<unsigned>(queue_depth);
             o.posix_threads = static_cast<unsigned>(posix_threads);
             o.io_timeout_ms = TimeoutMs(io_timeout_s, "io_timeout_s");
             o.preallocate = preallocate;
             o.allow_buffered_io = allow_buffered_io;
             o.verify_at_open = ParseVerify(verify_at_open);
             if (!std::isfinite(nospace_retry_s) || nospace_retry_s < 0) {
               throw StatusError(
                   Status::InvalidArgument("nospace_retry_s must be a non-negative number"));
             }
             o.nospace_retry_ms = static_cast<int64_t>(nospace_retry_s * 1000.0);
             o.close_timeout_ms = TimeoutMs(close_timeout_s, "close_timeout_s");
             return std::make_unique<PyDiskStore>(o);
           }),
           py::arg("dir"), py::arg("capacity_bytes"), py::arg("blob_bytes"),
           py::arg("layout_fingerprint"), py::arg("backend") = "auto", py::arg("queue_depth") = 32,
           py::arg("posix_threads") = 4, py::arg("io_timeout_s") = 10.0,
           py::arg("preallocate") = true, py::arg("allow_buffered_io") = false,
           py::arg("verify_at_open") = "auto", py::arg("nospace_retry_s") = 1.0,
           py::arg("close_timeout_s") = 15.0, py::arg("geometry_label") = "",
           py::arg("reset_on_mismatch") = false)
      .def("write", &PyDiskStore::Write, py::arg("key"), py::arg("data"),
           py::arg("timeout_s") = 30.0,
           "Stores `data` (blob_bytes, 4096-aligned) under the 16-byte `key`; returns once it is "
           "on disk "
           "and visible.")
      .def("read", &PyDiskStore::Read, py::arg("key"), py::arg("out"), py::arg("timeout_s") = 30.0,
           "Reads `key` into `out` (blob_bytes, 4096-aligned, writable) and verifies its "
           "checksums; raises "
           "CorruptionError (and drops the entry) on a mismatch, NotFoundError when absent.")
      .def("lookup", &PyDiskStore::Lookup, py::arg("keys"),
           "Number of leading keys (bytes of n * 16) on disk.")
      .def("contains", &PyDiskStore::Contains, py::arg("key"))
      .def("erase", &PyDiskStore::Erase, py::arg("key"))
      .def("flush", &PyDiskStore::Flush, py::arg("timeout_s") = 30.0,
           "Waits until no request is in flight.")
      .def("stats", &PyDiskStore::Stats)
      .def("close", &PyDiskStore::Close,
           "Waits for I/O in flight (close_timeout_s) and closes the cache file.")
      .def_property_readonly("closed", &PyDiskStore::closed)
      .def_property_readonly(
          "backend",
          [](PyDiskStore& s) {
            return s.Property([](DiskStore& d) { return std::string(d.backend_name()); });
          })
      .def_property_readonly(
          "path", [](PyDiskStore& s) { return s.Property([](DiskStore& d) { return d.path(); }); })
      .def_property_readonly(
          "blob_bytes",
          [](PyDiskStore& s) { return s.Property([](DiskStore& d) { return d.blob_bytes(); }); })
      .def_property_readonly(
          "slot_bytes",
          [](PyDiskStore& s) { return s.Property([](DiskStore& d) { return d.slot_bytes(); }); })
      .def_property_readonly(
          "num_slots",
          [](PyDiskStore& s) { return s.Property([](DiskStore& d) { return d.num_slots(); }); })
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](PyDiskStore& s, py::args) { s.Close(); });
  m.attr("DISK_CACHE_FILE_NAME") = kDiskCacheFileName;
  m.def(
      "disk_cache_reset",
      [](const std::string& dir) {
        std::string held;
        Status s;
        {
          py::gil_scoped_release release;
          s = DiskStore::Reset(dir, &held);
        }
        ThrowIfError(s);
        return held;
      },
      py::arg("dir"),
      "Deletes the disk cache file in `dir` (whatever geometry it holds) and returns what it held. "
      "NotFoundError: none there; FailedPreconditionError: a running kvtier has it open.");
  m.def(
      "probe_direct_io",
      [](const std::string& dir) {
        Status s;
        {
          py::gil_scoped_release release;
          s = ProbeDirectIo(dir);
        }
        return py::make_tuple(s.ok(), s.message());
      },
      py::arg("dir"),
      "(works, reason): whether files in `dir` can be opened with O_DIRECT (the disk tier needs "
      "it).");
}

}  // namespace kvtier::bindings
