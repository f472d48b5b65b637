// Opening a DiskStore: option and directory checks, creating / reopening and sizing the cache file,
// and the recovery scan that rebuilds the index from the slot headers.
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <random>
#include <unordered_map>
#include <utility>
#include <vector>

#include "common/mutex.h"
#include "storage/crc32c.h"
#include "storage/disk_store.h"
#include "storage/disk_store_impl.h"

namespace kvtier {
namespace {

using disk_internal::AlignedBuffer;
using disk_internal::AllocAligned;
using disk_internal::kNoSlot;

constexpr uint64_t kMaxBlobBytes = 1ull << 30;
// Full-verification scan: bytes per read, and bytes of scan buffers in flight at once.
constexpr uint64_t kScanRunBytes = 4ull << 20;
constexpr uint64_t kScanBufferBudget = 64ull << 20;
std::string Errno(int err) { return std::strerror(err); }

std::string FsTypeName(int64_t magic) {
  switch (static_cast<uint64_t>(magic)) {
    case 0xEF53:
      return "ext4";
    case 0x58465342:
      return "xfs";
    case 0x9123683E:
      return "btrfs";
    case 0x01021994:
      return "tmpfs";
    case 0x858458F6:
      return "ramfs";
    case 0x794C7630:
      return "overlayfs";
    case 0x6969:
      return "nfs";
    case 0x2FC12FC1:
      return "zfs";
    case 0xF2F52010:
      return "f2fs";
    case 0x65735546:
      return "fuse";
    default: {
      char buf[32];
      std::snprintf(buf, sizeof(buf), "fs 0x%llx", static_cast<unsigned long long>(magic));
      return buf;
    }
  }
}

std::string FsTypeOf(const std::string& dir) {
  struct statfs sfs {};
  if (statfs(dir.c_str(), &sfs) != 0) return "unknown fs";
  return FsTypeName(static_cast<int64_t>(sfs.f_type));
}

uint64_t FreeBytes(const std::string& dir) {
  struct statfs sfs {};
  if (statfs(dir.c_str(), &sfs) != 0) return 0;
  return static_cast<uint64_t>(sfs.f_bavail) * static_cast<uint64_t>(sfs.f_bsize);
}

uint64_t RandomEpoch() {
  std::random_device rd;
  uint64_t e = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  return e == 0 ? 1 : e;
}

}  // namespace
namespace {

Status ValidateOptions(const DiskStoreOptions& o) {
  if (o.dir.empty()) return Status::InvalidArgument("DiskStoreOptions.dir is empty");
  if (o.blob_bytes == 0 || o.blob_bytes > kMaxBlobBytes) {
    return Status::InvalidArgument("blob_bytes must be in [1, 1 GiB], got " +
                                   std::to_string(o.blob_bytes));
  }
  uint64_t need = kDiskBlockBytes + SlotBytesFor(o.blob_bytes);
  if (o.capacity_bytes < need) {
    return Status::InvalidArgument("capacity_bytes " + std::to_string(o.capacity_bytes) +
                                   " is smaller than the file header plus one slot (" +
                                   std::to_string(need) + " bytes for blob_bytes " +
                                   std::to_string(o.blob_bytes) + ")");
  }
  if (o.queue_depth == 0 || o.queue_depth > 4096) {
    return Status::InvalidArgument("queue_depth must be in [1, 4096], got " +
                                   std::to_string(o.queue_depth));
  }
  if (o.posix_threads == 0 || o.posix_threads > 1024) {
    return Status::InvalidArgument("posix_threads must be in [1, 1024], got " +
                                   std::to_string(o.posix_threads));
  }
  if (o.io_timeout_ms <= 0) {
    return Status::InvalidArgument("io_timeout_ms must be positive, got " +
                                   std::to_string(o.io_timeout_ms));
  }
  if (o.close_timeout_ms < 0 || o.nospace_retry_ms < 0) {
    return Status::InvalidArgument("close_timeout_ms and nospace_retry_ms must not be negative");
  }
  if (o.geometry_label.size() > kMaxGeometryLabelBytes) {
    return Status::InvalidArgument("geometry_label is " + std::to_string(o.geometry_label.size()) +
                                   " bytes, at most " + std::to_string(kMaxGeometryLabelBytes) +
                                   " allowed");
  }
  if (o.backend != IoBackendKind::kAuto && o.backend != IoBackendKind::kIoUring &&
      o.backend != IoBackendKind::kPosix) {
    return Status::InvalidArgument("unknown backend kind " +
                                   std::to_string(static_cast<int>(o.backend)));
  }
  return Status::OK();
}

Status CheckDir(const std::string& dir) {
  struct stat st {};
  if (stat(dir.c_str(), &st) != 0) {
    if (errno == ENOENT) return Status::InvalidArgument("cache dir '" + dir + "' does not exist");
    return Status::IoError("cannot stat cache dir '" + dir + "': " + Errno(errno));
  }
  if (!S_ISDIR(st.st_mode))
    return Status::InvalidArgument("cache dir '" + dir + "' is not a directory");
  if (access(dir.c_str(), W_OK | X_OK) != 0) {
    return Status::InvalidArgument("cache dir '" + dir + "' is not writable: " + Errno(errno));
  }
  return Status::OK();
}

std::string CachePath(const std::string& dir) {
  return dir + (!dir.empty() && dir.back() == '/' ? "" : "/") + kDiskCacheFileName;
}

}  // namespace

std::string DescribeDiskGeometry(uint64_t blob_bytes, const LayoutFingerprint* fp,
                                 const std::string& label) {
  static const char* hex = "0123456789abcdef";
  std::string out = "chunk_bytes " + std::to_string(blob_bytes) + ", layout ";
  if (fp == nullptr) {
    out += "not recorded";
  } else {
    for (uint8_t b : *fp) {
      out += hex[b >> 4];
      out += hex[b & 15];
    }
  }
  if (!label.empty()) out += ", " + label;
  return out;
}

Status DiskStore::Reset(const std::string& dir, std::string* held) {
  KVTIER_RETURN_IF_ERROR(CheckDir(dir));
  const std::string path = CachePath(dir);
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT)
      return Status::NotFound("no kvtier cache file in '" + dir + "' (" + path + ")");
    return Status::IoError("cannot open cache file '" + path + "': " + Errno(errno));
  }
  Status result;
  if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
    result = errno == EWOULDBLOCK
                 ? Status::FailedPrecondition("cache file '" + path +
                                              "' is in use by a running kvtier (flock); "
                                              "close it first")
                 : Status::IoError("cannot lock cache file '" + path + "': " + Errno(errno));
  } else {
    if (held != nullptr) {
      std::vector<unsigned char> block(kDiskBlockBytes, 0);
      FileHeader header;
      const bool readable =
          pread(fd, block.data(), kDiskBlockBytes, 0) == static_cast<ssize_t>(kDiskBlockBytes) &&
          DecodeFileHeader(block.data(), &header).ok();
      *held = !readable ? "an unreadable header"
                        : std::to_string(header.num_slots) + " slots of " +
                              DescribeDiskGeometry(
                                  header.blob_bytes,
                                  header.has_geometry ? &header.layout_fingerprint : nullptr,
                                  header.geometry_label);
    }
    // Unlinked while locked: a DiskStore opening it now creates a fresh file.
    if (unlink(path.c_str()) != 0)
      result = Status::IoError("cannot delete cache file '" + path + "': " + Errno(errno));
  }
  close(fd);
  return result;
}

Status DiskStore::Impl::OpenFile() {
  KVTIER_RETURN_IF_ERROR(CheckDir(opts.dir));
  fs_type = FsTypeOf(opts.dir);
  path = CachePath(opts.dir);
  struct stat before {};
  bool existed = stat(path.c_str(), &before) == 0;
  fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_DIRECT, 0644);
  if (fd < 0 && errno == EINVAL) {
    // O_CREAT ran before the O_DIRECT check: do not leave an empty file behind.
    if (!existed) unlink(path.c_str());
    if (!opts.allow_buffered_io) {
      return Status::InvalidArgument(
          "cache dir '" + opts.dir + "' is on a file system that refuses O_DIRECT (" + fs_type +
          "); put the disk tier on a block-device file system (ext4, xfs) or allow "
          "buffered I/O (allow_buffered_io)");
    }
    direct_io = false;
    fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  }
  if (fd < 0) return Status::IoError("cannot open cache file '" + path + "': " + Errno(errno));
  // A process that just died may hold the lock a moment longer (its io_uring is torn down
  // asynchronously after it exits): poll for up to a second before calling the file in use.
  const int64_t lock_deadline = MonotonicNowNs() + 1'000'000'000;
  while (flock(fd, LOCK_EX | LOCK_NB) != 0) {
    int err = errno;
    if (err == EWOULDBLOCK && MonotonicNowNs() < lock_deadline) {
      usleep(10'000);
      continue;
    }
    if (err == EWOULDBLOCK) {
      return Status::FailedPrecondition("cache file '" + path +
                                        "' is in use by another DiskStore (flock)");
    }
    return Status::IoError("cannot lock cache file '" + path + "': " + Errno(err));
  }
  struct stat st {};
  if (fstat(fd, &st) != 0)
    return Status::IoError("cannot stat cache file '" + path + "': " + Errno(errno));
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  file_is_new = size == 0;

  // Keep the existing slots when the file header is intact and the geometry is the same; refuse
  // a file of another geometry unless told to wipe it.
  FileHeader header;
  bool keep = false;
  auto mismatch = [&](const std::string& held, const std::string& asked) -> Status {
    if (opts.reset_on_mismatch) {
      reformat_reason = "reset_on_mismatch: it held " + held + "; now " + asked;
      return Status::OK();
    }
    return Status::GeometryMismatch(
        "cache dir '" + opts.dir + "' holds a disk cache of another geometry: it holds " + held +
        "; asked for " + asked +
        ". Nothing was changed: open it with its own settings, use another directory, "
        "or wipe it (`kvtier cache reset " +
        opts.dir + "`, or disk.reset_on_mismatch: true)");
  };
  const std::string asked =
      DescribeDiskGeometry(opts.blob_bytes, &opts.layout_fingerprint, opts.geometry_label);
  AlignedBuffer block = AllocAligned(kDiskBlockBytes);
  if (!block) return Status::ResourceExhausted("out of memory for a 4 KiB buffer");
  if (size >= kDiskBlockBytes) {
    ssize_t n = pread(fd, block.get(), kDiskBlockBytes, 0);
    if (n != static_cast<ssize_t>(kDiskBlockBytes)) {
      return Status::IoError("cannot read the header of cache file '" + path +
                             "': " + (n < 0 ? Errno(errno) : std::string("short read")));
    }
    Status decoded = DecodeFileHeader(block.get(), &header);
    if (decoded.code() == StatusCode::kGeometryMismatch) {  // another format version
      KVTIER_RETURN_IF_ERROR(
          mismatch(decoded.message(), "format version " + std::to_string(kDiskFormatVersion)));
    } else if (!decoded.ok()) {
      reformat_reason = decoded.message();  // not readable as a cache file: nothing to keep
    } else if (header.slot_bytes != slot_bytes || header.blob_bytes != opts.blob_bytes ||
               (header.has_geometry && (header.layout_fingerprint != opts.layout_fingerprint ||
                                        header.geometry_label != opts.geometry_label))) {
      KVTIER_RETURN_IF_ERROR(
          mismatch(DescribeDiskGeometry(header.blob_bytes,
                                        header.has_geometry ? &header.layout_fingerprint : nullptr,
                                        header.geometry_label),
                   asked));
    } else {
      keep =
          true;  // a header without a geometry record gets one below; recovery skips foreign slots
    }
  } else if (size > 0) {
    reformat_reason = "file shorter than its header";
  }
  reformatted = !keep && !file_is_new;
  epoch = keep ? header.epoch : RandomEpoch();
  scan_slots = keep ? std::min<uint64_t>(header.num_slots, num_slots) : 0;

  const uint64_t target = kDiskBlockBytes + num_slots * slot_bytes;
  auto cleanup_new = [&] {
    if (file_is_new) unlink(path.c_str());
  };
  if (opts.preallocate) {
    // Read before fallocate: a failed fallocate may keep the blocks it got, leaving 0 free.
    const uint64_t free_before = FreeBytes(opts.dir);
    if (fallocate(fd, 0, 0, static_cast<off_t>(std::max(target, size))) != 0) {
      int err = errno;
      if (err == ENOSPC || err == EDQUOT) {
        cleanup_new();
        return Status::ResourceExhausted("cannot preallocate " + std::to_string(target) +
                                         " bytes for cache file '" + path + "': " + Errno(err) +
                                         " (" + std::to_string(free_before) +
                                         " bytes free); lower capacity_bytes");
      }
      if (err != EOPNOTSUPP) {
        cleanup_new();
        return Status::IoError("cannot preallocate cache file '" + path + "': " + Errno(err));
      }
      preallocated = false;  // e.g. a file system without fallocate: sparse file instead
    }
  } else {
    preallocated = false;
  }
  if (size != target && ftruncate(fd, static_cast<off_t>(target)) != 0) {
    int err = errno;
    cleanup_new();
    if (err == EFBIG) {
      return Status::ResourceExhausted("cannot size cache file '" + path + "' to " +
                                       std::to_string(target) + " bytes: " + Errno(err));
    }
    return Status::IoError("cannot size cache file '" + path + "': " + Errno(err));
  }
  if (!keep || header.num_slots != num_slots || !header.has_geometry) {
    FileHeader fresh{slot_bytes, opts.blob_bytes, num_slots, epoch};
    fresh.has_geometry = true;
    fresh.layout_fingerprint = opts.layout_fingerprint;
    fresh.geometry_label = opts.geometry_label;
    EncodeFileHeader(fresh, block.get());
    ssize_t n = pwrite(fd, block.get(), kDiskBlockBytes, 0);
    if (n != static_cast<ssize_t>(kDiskBlockBytes) || fdatasync(fd) != 0) {
      int err = errno;
      cleanup_new();
      return Status::IoError("cannot write the header of cache file '" + path +
                             "': " + (n < 0 ? Errno(err) : std::string("short write")));
    }
  }
  return Status::OK();
}

void DiskStore::Impl::InitFreeSlots() {
  MutexLock lk(&mu_);
  slots_.assign(num_slots, Slot{});
  free_slots_.clear();
  for (size_t i = num_slots; i-- > 0;) free_slots_.push_back(static_cast<uint32_t>(i));
}

namespace {

// One recovery read: a run of whole slots (full verification) or one slot header.
struct ScanOp final : IoCompletion {
  struct Shared {
    Mutex mu;
    CondVar cv;
    std::vector<ScanOp*> finished;  // released, ready to process and reuse
  };
  Shared* shared = nullptr;
  AlignedBuffer buf;
  uint64_t first_slot = 0;
  uint32_t count = 0;
  Status status;
  IoRequest req;

  void OnIoDone(const Status& s) override { status = s; }
  void OnIoReleased() override {
    MutexLock lk(&shared->mu);
    shared->finished.push_back(this);
    shared->cv.NotifyOne();
  }
};

struct Candidate {
  uint32_t slot;
  ChunkKey key;
  uint64_t sequence;
  uint32_t payload_crc;
};

}  // namespace

Status DiskStore::Impl::Recover(uint64_t scan) {
  const bool full = opts.verify_at_open == VerifyAtOpen::kFull ||
                    (opts.verify_at_open == VerifyAtOpen::kAuto &&
                     kDiskBlockBytes + scan * slot_bytes <= opts.verify_at_open_max_bytes);
  {
    MutexLock lk(&mu_);  // uncontended: the store is not shared until Open returns
    counters_.payloads_verified_at_open = full;
  }
  const uint64_t run_slots = full ? std::max<uint64_t>(1, kScanRunBytes / slot_bytes) : 1;
  const uint64_t op_bytes = full ? run_slots * slot_bytes : kDiskBlockBytes;
  const size_t n_ops = static_cast<size_t>(std::clamp<uint64_t>(
      kScanBufferBudget / op_bytes, 1,
      std::min<uint64_t>(opts.queue_depth, (scan + run_slots - 1) / run_slots)));

  // Heap-allocated: if the device stops answering, the scan gives up and leaks it with the ops.
  auto shared_owner = std::make_unique<ScanOp::Shared>();
  ScanOp::Shared& shared = *shared_owner;
  std::vector<std::unique_ptr<ScanOp>> ops;
  for (size_t i = 0; i < n_ops; ++i) {
    auto op = std::make_unique<ScanOp>();
    op->shared = &shared;
    op->buf = AllocAligned(op_bytes);
    if (!op->buf) return Status::ResourceExhausted("out of memory for recovery scan buffers");
    op->req.completion = op.get();
    ops.push_back(std::move(op));
  }

  std::unordered_map<ChunkKey, Candidate, ChunkKeyHash> best;
  uint64_t max_sequence = 0, skipped = 0, foreign = 0, duplicates = 0;
  uint64_t next = 0;
  size_t outstanding = 0;
  std::vector<IoRequest*> batch;

  auto start = [&](ScanOp* op) {
    op->first_slot = next;
    op->count = static_cast<uint32_t>(std::min<uint64_t>(run_slots, scan - next));
    next += op->count;
    op->status = Status::OK();
    IoRequest& r = op->req;
    r.op = IoOp::kRead;
    r.offset = SlotOffset(op->first_slot, slot_bytes);
    r.iov[0] = {op->buf.get(), full ? op->count * slot_bytes : kDiskBlockBytes};
    r.iovcnt = 1;
    r.deadline_ns = MonotonicNowNs() + opts.io_timeout_ms * 1'000'000;
    batch.push_back(&r);
    ++outstanding;
  };
  auto examine = [&](ScanOp* op) {
    if (!op->status.ok()) {  // unreadable run: its slots are skipped (the store is a cache)
      skipped += op->count;
      return;
    }
    for (uint32_t i = 0; i < op->count; ++i) {
      const unsigned char* hdr = op->buf.get() + (full ? i * slot_bytes : 0);
      SlotHeader h;
      SlotHeaderCheck check = DecodeSlotHeader(hdr, &h);
      if (check == SlotHeaderCheck::kEmpty) continue;
      if (check == SlotHeaderCheck::kCorrupt || h.epoch != epoch ||
          h.payload_bytes != opts.blob_bytes) {
        ++skipped;
        continue;
      }
      max_sequence = std::max(max_sequence, h.sequence);
      if (h.layout_fingerprint != opts.layout_fingerprint) {
        ++foreign;
        continue;
      }
      if (full && Crc32c(0, hdr + kDiskBlockBytes, opts.blob_bytes) != h.payload_crc) {
        ++skipped;  // torn: the header landed, the payload did not (or was overwritten)
        continue;
      }
      Candidate c{static_cast<uint32_t>(op->first_slot + i), h.key, h.sequence, h.payload_crc};
      auto [it, inserted] = best.emplace(h.key, c);
      if (!inserted) {
        ++duplicates;
        if (c.sequence > it->second.sequence) it->second = c;
      }
    }
  };

  for (auto& op : ops) {
    if (next < scan) start(op.get());
  }
  if (!batch.empty()) backend->Submit(batch.data(), batch.size());
  // Every request ends by its deadline; the OS releases it soon after unless the device hangs.
  const int64_t wait_ns = (opts.io_timeout_ms + opts.close_timeout_ms) * 1'000'000;
  while (outstanding > 0) {
    std::vector<ScanOp*> finished;
    {
      MutexLock lk(&shared.mu);
      if (!shared.cv.WaitFor(lk, std::chrono::nanoseconds(wait_ns),
                             [&] { return !shared.finished.empty(); })) {
        // Leave the buffers to the device: the caller shuts the backend down and leaks them.
        for (auto& op : ops) (void)op.release();
        (void)shared_owner.release();
        return Status::DeadlineExceeded("recovery scan of '" + path +
                                        "': the device stopped answering");
      }
      finished.swap(shared.finished);
    }
    batch.clear();
    for (ScanOp* op : finished) {
      --outstanding;
      examine(op);
      if (next < scan) start(op);
    }
    if (!batch.empty()) backend->Submit(batch.data(), batch.size());
  }

  std::vector<Candidate> winners;
  winners.reserve(best.size());
  for (auto& [key, c] : best) winners.push_back(c);
  std::sort(winners.begin(), winners.end(),
            [](const Candidate& a, const Candidate& b) { return a.sequence < b.sequence; });

  MutexLock lk(&mu_);
  std::vector<bool> used(num_slots, false);
  index_.reserve(winners.size());
  for (const Candidate& c : winners) {  // oldest first: the newest ends most recently used
    Slot& s = slots_[c.slot];
    s.key = c.key;
    s.sequence = c.sequence;
    s.payload_crc = c.payload_crc;
    s.state = SlotState::kReady;
    index_.emplace(c.key, c.slot);
    LruPushMruLocked(c.slot);
    used[c.slot] = true;
  }
  free_slots_.clear();
  for (size_t i = num_slots; i-- > 0;) {
    if (!used[i]) free_slots_.push_back(static_cast<uint32_t>(i));
  }
  next_sequence_ = max_sequence + 1;
  counters_.recovered_slots = winners.size();
  counters_.skipped_slots_at_open = skipped;
  counters_.foreign_slots_at_open = foreign;
  counters_.duplicate_slots_at_open = duplicates;
  return Status::OK();
}

StatusOr<std::unique_ptr<DiskStore>> DiskStore::Open(const DiskStoreOptions& options) {
  const int64_t t0 = MonotonicNowNs();
  KVTIER_RETURN_IF_ERROR(ValidateOptions(options));
  auto impl = std::make_unique<Impl>();
  impl->opts = options;
  impl->slot_bytes = SlotBytesFor(options.blob_bytes);
  impl->head_bytes = options.blob_bytes / kDiskBlockBytes * kDiskBlockBytes;
  impl->tail_bytes = options.blob_bytes - impl->head_bytes;
  impl->num_slots = static_cast<size_t>(std::min<uint64_t>(
      (options.capacity_bytes - kDiskBlockBytes) / impl->slot_bytes, kNoSlot - 1));
  KVTIER_RETURN_IF_ERROR(impl->OpenFile());

  IoBackendOptions bo;
  bo.queue_depth = options.queue_depth;
  bo.posix_threads = options.posix_threads;
  bo.fault_injector = options.fault_injector;
  auto backend = CreateIoBackend(options.backend, impl->fd, bo, &impl->backend_fallback_reason);
  if (!backend.ok()) return backend.status();
  impl->backend = std::move(backend).value();

  impl->InitFreeSlots();
  if (impl->scan_slots > 0) {
    Status recovered = impl->Recover(impl->scan_slots);
    if (!recovered.ok()) {
      (void)impl->backend->Shutdown(MonotonicNowNs());
      return recovered;
    }
  }
  impl->open_seconds = static_cast<double>(MonotonicNowNs() - t0) * 1e-9;
  return std::unique_ptr<DiskStore>(new DiskStore(std::move(impl)));
}

}  // namespace kvtier
