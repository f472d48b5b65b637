// DiskStore: the disk tier's storage core. Chunk blobs in fixed-size slots of one preallocated
// cache file, written and read with O_DIRECT straight from and into the caller's (pinned)
// memory, each slot checksummed so that a torn, stale or foreign slot is never served.
//
// Thread safety: every method may be called concurrently from any thread, including from inside
// a completion callback, except the destructor (not from a callback, and not concurrently with
// other calls). One mutex guards the slot table, the key index and the LRU list; checksums and
// I/O run outside it.
//
// File and format: `<dir>/kvtier-disk-cache.kvt`, a 4 KiB file header then slots of
// SlotBytesFor(blob_bytes) bytes (storage/slot_format.h). The file is locked with flock while a
// DiskStore has it open: a second DiskStore on the same dir fails with FailedPrecondition.
//
// Slot life cycle
//   FREE --Write--> WRITING --write completed--> READY --Erase / evicted--> FREE
//                           --write failed-----> FREE (never visible)
//   READY --Read--> READY with readers+1 (pinned: neither evicted, erased nor reused)
// Invariants:
//   - Only READY chunks are visible to Lookup / Contains / Read. A chunk becomes READY only after
//     its one vectored write (header + payload) completed in full; a failed, torn or timed-out
//     write is never visible.
//   - Read checks the slot header (magic, version, key, layout fingerprint, file epoch,
//     sequence, length, header CRC) and the payload CRC32C before reporting OK. A mismatch is
//     Corruption: the entry is dropped and counted (corrupt_detected); wrong bytes are never OK.
//   - When a new key needs a slot and none is free, the least recently used READY slot without
//     readers is evicted; its key leaves the index before the new write is submitted.
//   - At most floor((capacity_bytes - 4 KiB) / slot_bytes) slots: the file never grows beyond
//     capacity_bytes.
//
// Callbacks (`done`): when Write / Read return OK, `done` is called exactly once, on the I/O
// completion thread (or a POSIX worker / watchdog), possibly before Write / Read return. When
// they return an error, `done` is never called. Callbacks must not block for long: they hold up
// other completions. Do not destroy the DiskStore from a callback.
//
// Deadlines: every request carries io_timeout_ms. A request unfinished by then completes with
// DeadlineExceeded at the deadline. The device may still be moving its bytes ("abandoned"):
// REQUIRES of the caller: after a DeadlineExceeded, keep the buffer alive and do not reuse it
// until Flush() returns OK (Flush waits for abandoned requests too; stats().abandoned_in_flight
// counts them). The slot of an abandoned request stays out of use until the OS lets go of it.
//
// Geometry: the file header records what the file is for: blob_bytes, the layout fingerprint and
// the caller's geometry_label (kvtier's cache puts its chunk_tokens there). Open on a
// file recorded for anything else leaves the file untouched and fails with GeometryMismatch,
// naming both geometries, unless reset_on_mismatch asks for a wipe; Reset(dir) wipes on purpose.
// A file that is not readable as a cache file (bad magic, a damaged header) is reformatted.
//
// Recovery (Open on an existing file): the slot headers are scanned with batched reads at the
// queue depth; valid slots of this file epoch and layout fingerprint come back, the newest
// sequence winning duplicates, in LRU order of their sequence numbers. Payload CRCs are checked
// at open when the file is at most verify_at_open_max_bytes (read whole, in large sequential
// reads); above that only headers are read and payloads are verified on first read (a torn slot
// is then visible to Lookup until a Read reports it as Corruption and drops it).
//
// Disk full: a write failing with ENOSPC (possible when the file is not preallocated, or on
// copy-on-write file systems) fails that write with ResourceExhausted (the chunk never becomes
// visible), counts `enospc`, and pauses admission: further writes fail at once with
// ResourceExhausted (`writes_refused_nospace`) except one probe write every nospace_retry_ms,
// whose success resumes admission. Chunks already cached stay readable throughout.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "common/status.h"
#include "index/chunk_key.h"
#include "index/visibility_observer.h"
#include "storage/io_backend.h"
#include "storage/slot_format.h"

namespace kvtier {

enum class VerifyAtOpen : int {
  kAuto = 0,     // kFull when the file is at most verify_at_open_max_bytes, else kHeaders
  kHeaders = 1,  // read slot headers only; payload CRCs are checked on first read
  kFull = 2,     // read every slot whole and check payload CRCs before the store opens
};

struct DiskStoreOptions {
  std::string dir;              // must exist and be writable; the cache file is created in it
  uint64_t capacity_bytes = 0;  // hard bound on the cache file's size
  uint64_t blob_bytes = 0;      // payload bytes of every chunk (1 B .. 1 GiB)
  LayoutFingerprint layout_fingerprint{};
  // Free text naming what else the chunks' format depends on (chunk_tokens), recorded in the file
  // header and compared at Open like blob_bytes and layout_fingerprint (at most 1 KiB).
  std::string geometry_label;
  // A file recorded for another geometry is wiped (reformatted) instead of refused.
  bool reset_on_mismatch = false;
  IoBackendKind backend = IoBackendKind::kAuto;
  unsigned queue_depth = 32;      // io_uring: requests in the kernel at once (1 .. 4096)
  unsigned posix_threads = 4;     // POSIX backend: worker threads (1 .. 1024)
  int64_t io_timeout_ms = 10000;  // deadline of every request
  // fallocate the whole file at Open (disk full then shows at Open, not on writes). false, or
  // a file system without fallocate: the file is sparse and slots take space when first written.
  bool preallocate = true;
  // A file system that refuses O_DIRECT (tmpfs) is an InvalidArgument error at Open unless this
  // is set; then the store uses buffered I/O and stats().direct_io is false.
  bool allow_buffered_io = false;
  VerifyAtOpen verify_at_open = VerifyAtOpen::kAuto;
  uint64_t verify_at_open_max_bytes = 1ull << 30;
  int64_t nospace_retry_ms = 1000;   // after ENOSPC, one probe write per this interval
  int64_t close_timeout_ms = 15000;  // the destructor waits this long for I/O in flight
  IoFaultInjector fault_injector;    // tests only: see storage/io_backend.h
};

struct DiskStoreStats {
  std::string backend;                  // "io_uring" or "posix"
  std::string backend_fallback_reason;  // why auto did not get io_uring (empty if it did)
  bool direct_io = true;     // false only with allow_buffered_io on a file system refusing O_DIRECT
  bool preallocated = true;  // the file's blocks were reserved with fallocate
  std::string fs_type;       // of the cache dir: "ext4", "xfs", "tmpfs", ...
  uint64_t slot_bytes = 0;
  uint64_t blob_bytes = 0;
  size_t slots_total = 0;
  size_t slots_used = 0;  // READY
  size_t slots_writing = 0;
  size_t slots_pinned = 0;   // READY with readers
  uint64_t writes = 0;       // completed OK
  uint64_t write_bytes = 0;  // payload bytes of completed writes
  uint64_t reads = 0;        // completed and verified OK
  uint64_t read_bytes = 0;
  uint64_t write_failures = 0;
  uint64_t read_failures = 0;     // I/O errors and deadlines on reads (not corruption)
  uint64_t corrupt_detected = 0;  // reads that failed a header or payload check
  uint64_t evictions = 0;
  uint64_t erases = 0;
  uint64_t writes_rejected_busy = 0;    // no free slot and every slot writing or pinned
  uint64_t enospc = 0;                  // writes that failed for lack of space
  uint64_t writes_refused_nospace = 0;  // refused at once while admission was paused
  bool nospace = false;                 // admission paused after ENOSPC
  uint64_t deadline_exceeded = 0;
  size_t abandoned_in_flight = 0;  // requests past their deadline the OS still holds
  size_t in_flight = 0;            // requests submitted and not yet released
  uint64_t io_resubmits = 0;       // short transfers, EAGAIN, EINTR
  // Open
  uint64_t recovered_slots = 0;
  uint64_t skipped_slots_at_open = 0;    // torn or corrupt (header or, when verified, payload)
  uint64_t foreign_slots_at_open = 0;    // another layout fingerprint: ignored, reclaimed
  uint64_t duplicate_slots_at_open = 0;  // an older copy of a key found twice
  bool payloads_verified_at_open = false;
  bool reformatted_at_open =
      false;  // the file was unreadable, or of another geometry and reset_on_mismatch
  std::string reformat_reason;
  double open_seconds = 0;  // Open's wall time, recovery scan included
};

class DiskStore {
 public:
  using Callback = std::function<void(const Status&)>;
  using BatchCallback = std::function<void(size_t index, const Status&)>;

  // Creates or reopens the cache file in options.dir and rebuilds the index from it.
  // InvalidArgument: a bad option (named), a dir that does not exist or is not a directory, or a
  // file system that refuses O_DIRECT without allow_buffered_io. IoError: the OS refused to
  // create, open, size or read the file (path and reason named). ResourceExhausted: not enough
  // space to preallocate. FailedPrecondition: another DiskStore holds the file. Unavailable:
  // backend kIoUring where io_uring cannot be used. GeometryMismatch: the file holds chunks of
  // another geometry (both named) and reset_on_mismatch is off; nothing was changed.
  static StatusOr<std::unique_ptr<DiskStore>> Open(const DiskStoreOptions& options);

  // Deletes the cache file of `dir`, whatever geometry it holds; `*held` (if given) then describes
  // what it held. NotFound: no cache file there. FailedPrecondition: a DiskStore has it open.
  static Status Reset(const std::string& dir, std::string* held = nullptr);

  // Waits up to close_timeout_ms for requests in flight; requests the OS still holds after that
  // get done(Unavailable) if they had no answer yet, and their memory is leaked, not freed.
  ~DiskStore();
  DiskStore(const DiskStore&) = delete;
  DiskStore& operator=(const DiskStore&) = delete;

  // Stores blob_bytes at `src` under `key`. The chunk is visible once `done` got OK.
  // REQUIRES: src is 4 KiB aligned, holds blob_bytes, and stays untouched until `done` (or, after
  // DeadlineExceeded, until Flush returns OK).
  // Errors (done not called): InvalidArgument (src), AlreadyExists (key cached or being written),
  // ResourceExhausted (every slot writing or pinned; or admission paused after ENOSPC),
  // FailedPrecondition (closing).
  Status Write(const ChunkKey& key, const void* src, Callback done);
  // The same, with the blob's CRC32C known to the caller (Crc32c(0, src, blob_bytes)): no pass
  // over it here. A wrong value makes the chunk fail every read's check: a miss, never wrong data.
  Status Write(const ChunkKey& key, const void* src, uint32_t payload_crc, Callback done);

  // Reads `key`'s blob into `dst` (blob_bytes) and verifies it; done(OK) means dst holds exactly
  // the bytes written. done(Corruption) drops the entry; done(IoError) too. Marks the chunk most
  // recently used. REQUIRES: dst 4 KiB aligned, blob_bytes long, untouched until `done`.
  // Errors (done not called): InvalidArgument (dst), NotFound (not READY), FailedPrecondition.
  Status Read(const ChunkKey& key, void* dst, Callback done);

  // Reads n chunks in one submission. All keys must be READY, else NotFound and nothing starts.
  // Recency is refreshed last key first, so keys[0] (a prefix's head) ends most recent.
  // `done(i, status)` is called once per key.
  Status ReadBatch(const ChunkKey* keys, void* const* dsts, size_t n, BatchCallback done);

  // Number of leading keys (keys[0..n)) that are READY. Does not change recency.
  size_t Lookup(const ChunkKey* keys, size_t n) const;
  bool Contains(const ChunkKey& key) const;

  // Removes a READY chunk without readers: it is invisible at once, and its slot header is
  // zeroed on disk (asynchronously) so it does not come back at the next Open; the slot is
  // reused after that. NotFound / FailedPrecondition (being written or read) otherwise.
  Status Erase(const ChunkKey& key);

  // From now on `observer` is told, under the store's lock, each time a chunk becomes visible (its
  // write completed) or stops being visible (evicted for another write, erased, or dropped by a
  // read that failed its checks); the chunks visible now (those recovered at Open included) are
  // reported first, least recently used first. Null stops it.
  void SetVisibilityObserver(VisibilityObserver observer, void* ctx);

  // Waits until no request is in flight (abandoned ones included), or timeout_ms
  // (DeadlineExceeded). Does not sync the device's volatile cache: durability across power loss
  // is not promised (a slot lost that way fails its checksum and is skipped at Open).
  Status Flush(int64_t timeout_ms);

  DiskStoreStats stats() const;
  IoBackendKind backend() const;
  const char* backend_name() const;
  const std::string& path() const;
  uint64_t blob_bytes() const;
  uint64_t slot_bytes() const;
  size_t num_slots() const;

  class Impl;

 private:
  explicit DiskStore(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The cache file's name inside DiskStoreOptions::dir.
constexpr const char* kDiskCacheFileName = "kvtier-disk-cache.kvt";

// "chunk_bytes 8192, layout 000102..0f, <label>": a geometry as the errors name it.
std::string DescribeDiskGeometry(uint64_t blob_bytes, const LayoutFingerprint* layout_fingerprint,
                                 const std::string& label);

}  // namespace kvtier
