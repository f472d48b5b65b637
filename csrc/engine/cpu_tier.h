// CpuTier: the pinned host pool, its chunk index and the copy engine, as one store/lookup/load
// unit, with an optional disk tier below it.
//
// Store gathers the pages of chunks not yet cached into freshly reserved blocks; the chunks become
// visible only when the copy has completed (the completion callback commits them). Load pins the
// leading cached chunks, scatters them into the caller's pages and unpins them when the copy is
// done.
//
// With a disk tier: a chunk evicted from the pool is written back to disk when the admission rule
// lets it (seen by at least `admit_min_seen` requests; the write goes straight from its pinned
// block, which stays readable until the write ends). Lookup walks the pool, then the disk, chunk by
// chunk. Load promotes the leading chunks found only on disk: each is read (and verified) into a
// fresh pool block, committed to the pool, then scattered like a pool hit.
//
// Write-backs run asynchronously: whether one has ended by the next call, how many end while an
// eviction waits for a block, and in which order concurrent ones end (each becomes the disk's most
// recent chunk when it ends) depend on the disk's speed. With
// DiskTierOptions::deterministic_writeback they depend on the calls alone: see there.
//
// Write-through (DiskTierOptions::write_through): a thread of the tier writes each chunk to disk
// soon after it becomes READY in the pool (a store's commit, a put, or a hit or repeated store
// that brings its `seen` count to admit_min_seen), holding a quiet pin on its block until the
// write ends, with the blob's CRC32C computed once (given to the disk and kept for leases). The
// chunk stays in the pool; when it is evicted later it is on disk already, so its block frees at
// once instead of waiting for a write-back: a store into a full pool no longer waits on the disk.
//
// Persist writes the pool's chunks that the disk does not hold yet to the disk, so that a restart
// finds them (write-back alone only saves what is evicted). It runs when called, and every
// persist_interval_ms on a timer thread: a process killed without a chance to persist loses at
// most the chunks stored since the last persist. It bypasses the admission rule: it is what
// survives a restart, and its writes are bounded by the pool's size per run.
//
// Events (CpuTierOptions::event_capacity > 0): the tier records a KV event each time a chunk
// becomes findable in the pool (a committed store, CommitPut, a promotion or prefetch from disk) or
// on disk (a completed write-back or persist write), and each time it stops being findable there
// (evicted, its write-back over, erased, dropped after a failed read); at creation, a `cleared`
// event per medium, then the chunks the disk recovered. TakeEvents hands them out oldest first.
//
// Thread safety: every method may be called from any thread concurrently.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "common/mutex.h"
#include "common/status.h"
#include "engine/event_log.h"
#include "index/chunk_index.h"
#include "memory/arena.h"
#include "memory/block_allocator.h"
#include "storage/disk_store.h"
#include "transfer/copy_engine.h"

namespace kvtier {

struct DiskTierOptions {
  bool enabled = false;
  DiskStoreOptions store;               // dir, capacity, backend...; blob_bytes is filled in
  uint32_t admit_min_seen = 2;          // write an evicted chunk back only if seen this many times
  size_t max_demotions_in_flight = 64;  // beyond it, evictions wait for write-backs to end
  // Disk timing that depends only on the calls (kvtier.sim mirrors it exactly): Store, Lookup,
  // LookupTiers, Load, Prefetch, BeginPut and AcquireBlobs first wait for the write-backs in
  // flight; an eviction that must wait for write-backs waits for all of them, not for one 200 us
  // poll; a promotion's write-backs end before its reads start; a prefetch waits for each read;
  // and the disk runs at queue depth 1 (one POSIX worker), so its requests end in the order they
  // were made. Each wait ends at the usual deadline (2 x io_timeout + 1 s); past it the call goes
  // on.
  bool deterministic_writeback = false;
  // Persist every this many ms on a timer thread (0: never; never in deterministic mode, where
  // the tiers' state must depend on the calls alone).
  int64_t persist_interval_ms = 0;
  // Write admitted chunks to disk as they arrive in the pool (see the top of this file), so that
  // evictions find them written. Costs the writes of chunks that would have left the pool without
  // a write-back (erased, or never evicted). Off in deterministic mode (its timing depends on the
  // disk), as the persist timer is; with an admission hook set, chunks are written at eviction, as
  // the hook decides. (kvtier's config, `disk.write_through`, turns it on by default.)
  bool write_through = false;
};

// What one CpuTier::Persist did.
struct PersistResult {
  size_t written = 0;        // chunks written to disk by this call
  size_t skipped = 0;        // on disk already (or left the pool before their turn)
  size_t failed = 0;         // writes refused or failed (disk busy or full, I/O error, deadline)
  size_t not_started = 0;    // left out: the deadline passed, or more chunks than disk slots
  size_t still_running = 0;  // writes not ended by the deadline (they end on their own)
  bool deadline_exceeded = false;
};

struct CpuTierOptions {
  uint64_t capacity_bytes = 1ull << 30;  // hard bound of the pool: floor(capacity / block) blocks
  CopyEngineOptions copy;
  DiskTierOptions disk;
  int64_t close_timeout_ms = 30000;     // how long the destructor waits for in-flight copies
  std::string eviction_policy = "lru";  // the pool's eviction order: "lru", "s3fifo" or "lfu"
  // Bound of the KV event log (EventLog): past it the oldest events are dropped and counted. 0
  // records nothing.
  size_t event_capacity = 0;
};

struct CpuTierStats {
  ChunkIndexStats index;
  BlockAllocatorStats blocks;
  uint64_t store_calls = 0;
  uint64_t chunks_stored = 0;          // gathers completed and committed
  uint64_t chunks_already_cached = 0;  // skipped by store: present (or being written) already
  uint64_t chunks_skipped_full = 0;    // skipped by store: no block could be freed
  uint64_t chunks_failed = 0;          // gathers that failed: aborted, never visible
  uint64_t load_calls = 0;
  uint64_t chunks_loaded = 0;
  uint64_t bytes_offloaded = 0;
  uint64_t bytes_loaded = 0;
  uint64_t in_flight = 0;
  // Disk tier (zero without one).
  bool has_disk = false;
  DiskStoreStats disk;
  uint64_t lookup_disk_chunks = 0;  // chunks a lookup found on disk only
  uint64_t chunks_promoted = 0;     // read from disk into the pool by a load
  uint64_t promotion_failures = 0;  // reads that failed (corrupt, I/O error, deadline): misses
  uint64_t demotions_written = 0;   // write-backs completed
  uint64_t demotions_failed = 0;    // write-backs refused or failed (the chunk was dropped)
  uint64_t demotions_rejected = 0;  // evicted chunks the admission hook did not admit
  uint64_t chunks_prefetched = 0;   // read from disk into the pool ahead of a load
  uint64_t persist_runs = 0;        // Persist calls, the timer's included
  uint64_t persist_written = 0;     // chunks Persist wrote
  uint64_t persist_failed = 0;      // Persist writes refused or failed
  uint64_t persist_deadline_exceeded = 0;  // Persist calls that ran out of time
  uint64_t write_through_written = 0;      // chunks write-through wrote
  uint64_t write_through_failed = 0;     // write-through writes refused (disk busy, full) or failed
  uint64_t write_through_queued = 0;     // chunks waiting for the write-through thread
  uint64_t write_through_in_flight = 0;  // its writes not ended yet (each pins a block)
  uint64_t blob_checksums_computed = 0;  // CRC32C passes over pool blocks (each one then kept)
  // KV events (zero with event_capacity 0).
  uint64_t event_capacity = 0;
  uint64_t events_recorded = 0;  // since creation, dropped ones included
  uint64_t events_dropped = 0;   // dropped because the log was full
  uint64_t events_pending = 0;   // recorded and not yet taken
};

// What a Store or Load started. `transfer` is null when nothing needed copying.
struct TierOp {
  std::shared_ptr<Transfer> transfer;
  size_t chunks = 0;          // chunks being copied (stored: new ones; loaded: leading hits)
  size_t already_cached = 0;  // store only
  size_t skipped_full = 0;    // store only
};

class CpuTier {
 public:
  static StatusOr<std::unique_ptr<CpuTier>> Create(const LayoutDesc& layout,
                                                   const CpuTierOptions& options);
  ~CpuTier();
  CpuTier(const CpuTier&) = delete;
  CpuTier& operator=(const CpuTier&) = delete;

  // keys[0..n) name n consecutive chunks; page_ids holds at least n * pages_per_chunk pages, chunk
  // i in page_ids[i*ppc, (i+1)*ppc). Stops at the first chunk that cannot get a block (the chunks
  // after it would be unreachable by a prefix lookup anyway).
  StatusOr<TierOp> Store(const ChunkKey* keys, size_t n, const std::vector<uint32_t>& page_ids,
                         uintptr_t after_stream);
  // Leading chunks of keys[0..n) that are READY.
  size_t Lookup(const ChunkKey* keys, size_t n);
  // Where each leading chunk is: 1 = pool, 2 = disk only; stops at the first chunk in neither.
  std::vector<uint8_t> LookupTiers(const ChunkKey* keys, size_t n);
  // Loads the leading READY chunks into page_ids[0 .. hits*ppc).
  StatusOr<TierOp> Load(const ChunkKey* keys, size_t n, const std::vector<uint32_t>& page_ids,
                        uintptr_t after_stream);

  // Blob-level access for transports that move whole chunks (the peer service):
  // BeginPut reserves a block for `key` (invisible until CommitPut) and returns its address, to be
  // filled with blob_bytes() bytes; AbortPut gives it back. AlreadyExists if cached or in flight.
  // REQUIRES: exactly one CommitPut or AbortPut per successful BeginPut.
  StatusOr<void*> BeginPut(const ChunkKey& key);
  Status CommitPut(const ChunkKey& key);
  Status AbortPut(const ChunkKey& key);
  // Pins the leading cached chunks of keys[0..n) (pool only) and returns their block addresses.
  // REQUIRES: ReleaseBlobs on the same keys once their bytes have been used.
  std::vector<const void*> AcquireBlobs(const ChunkKey* keys, size_t n);
  Status ReleaseBlobs(const ChunkKey* keys, size_t n);

  // Blob checksums. The tier keeps the CRC32C of a block's bytes once someone who wrote or read
  // them has it (a transport that checked what it received, or the first BlobChecksum), so a
  // transport that serves a chunk many times (the peers' NIXL leases) needs no pass over the blob
  // to name its checksum. A block's checksum is forgotten when the block is reserved again.
  // `blob` is a block's address, as BeginPut or AcquireBlobs returned it; InvalidArgument for any
  // other address.
  // REQUIRES: the caller holds `blob` (reserved by BeginPut and not yet committed or aborted, or
  // pinned by AcquireBlobs), and `crc32c` is the CRC32C of its blob_bytes() bytes as they are.
  Status NoteBlobChecksum(const void* blob, uint32_t crc32c);
  // The CRC32C of the blob_bytes() bytes of a held block: the one noted, else computed now (and
  // kept). REQUIRES: the caller holds `blob`, as for NoteBlobChecksum.
  StatusOr<uint32_t> BlobChecksum(const void* blob);
  // The CRC32C kept for a held block's blob, or nullopt where none is kept (nothing is computed).
  // REQUIRES: the caller holds `blob`, as for NoteBlobChecksum.
  StatusOr<std::optional<uint32_t>> KeptBlobChecksum(const void* blob);

  // Where each of keys[0..n) is, as bits: 1 = pool, 2 = disk (both: 3, neither: 0). Unlike
  // LookupTiers, it does not stop at the first chunk missing.
  std::vector<uint8_t> Media(const ChunkKey* keys, size_t n);
  // Removes and returns the oldest `max` KV events (all with max 0), oldest first; none when events
  // are off (event_capacity 0).
  std::vector<Event> TakeEvents(size_t max);

  // Replaces the built-in admission rule (seen >= admit_min_seen) for disk write-back: called
  // once per batch of evicted chunks, with no lock held, with their keys and times seen; returns
  // one flag per chunk (non-zero: write it to disk). An empty function restores the built-in.
  using AdmissionHook = std::function<std::vector<uint8_t>(const std::vector<ChunkKey>&,
                                                           const std::vector<uint32_t>&)>;
  void SetAdmissionHook(AdmissionHook hook);
  // Starts reading the leading chunks of keys[0..n) that are on disk only into the pool, without
  // waiting (a later Load finds them in the pool, or waits for the reads still running). Blocks
  // for all of them are reserved before any read starts, so a prefetch never evicts its own
  // chunks. Returns the number of reads started.
  size_t Prefetch(const ChunkKey* keys, size_t n);

  // Writes the pool's READY chunks that the disk does not hold to the disk tier, most-seen first,
  // at most as many as the disk has slots, in batches of max_demotions_in_flight (each chunk is
  // pinned while its write runs, so it is neither evicted nor reused). Returns by timeout_ms;
  // writes running then end on their own (Drain waits for them). One Persist at a time: a call
  // waits for the timer's (which yields after its current batch). Recency in either tier's
  // eviction order is not refreshed by it, except that written chunks become the disk's newest.
  // FailedPrecondition without a disk tier.
  StatusOr<PersistResult> Persist(int64_t timeout_ms);

  CpuTierStats stats() const;
  const Arena& arena() const { return *arena_; }
  uint64_t blob_bytes() const { return engine_->blob_bytes(); }
  uint32_t pages_per_chunk() const { return engine_->layout().pages_per_chunk; }
  size_t capacity_chunks() const { return allocator_->num_blocks(); }
  const DiskStore* disk() const { return disk_.get(); }
  TransferMethod method() const { return engine_->method(); }
  // Blocks until no copy is in flight, or the timeout passes (DeadlineExceeded).
  Status Drain(int64_t timeout_ms);

 private:
  CpuTier() = default;
  // Range and repetition of page ids: InvalidArgument naming the first bad entry.
  Status CheckPages(const std::vector<uint32_t>& page_ids, size_t needed) const;
  void FinishOp();
  void StartOp();
  // index_->BeginInsert, forgetting the checksum of the block it hands out (its bytes will change).
  StatusOr<BlockId> Reserve(const ChunkKey& key);
  // The block's CRC32C: the kept one, else computed now and kept. REQUIRES: the caller holds
  // the block (a pin, a reservation, or its write-back).
  uint32_t BlockChecksum(BlockId block);
  // The kept CRC32C of the block, if any.
  bool KnownChecksum(BlockId block, uint32_t* crc) const;
  // The block whose blob starts at `blob`; InvalidArgument for any other address.
  StatusOr<BlockId> BlockOf(const void* blob) const;
  // Hands READY chunks to the write-through thread (no-op unless write_through).
  void QueueWriteThrough(const ChunkKey* keys, size_t n);
  void WriteThroughLoop();
  // Starts the write-backs of the chunks the index marked DEMOTING since the last call.
  void PumpDemotions();
  // Reads keys[i] (on disk only) into pool blocks and commits them to the pool. Returns how many
  // leading ones arrived intact; blocks on the disk's deadline (io_timeout_ms) at most.
  size_t PromoteFromDisk(const ChunkKey* keys, size_t n);
  static bool AdmitForDemotion(void* self, const ChunkKey& key, uint32_t seen);
  // Persist's body; `periodic` runs yield (stop between batches) to a caller or to the destructor.
  PersistResult PersistLocked(std::chrono::steady_clock::time_point deadline, bool periodic);
  void PersistTimerLoop(std::chrono::milliseconds interval);
  // BeginInsert for `key`, waiting (to `deadline`) while write-backs to disk hold the blocks.
  StatusOr<BlockId> WaitForBlock(const ChunkKey& key,
                                 std::chrono::steady_clock::time_point deadline);
  // Waits (polling, until `deadline`) while another reader of the disk fills `key`'s block.
  void WaitWhileWriting(const ChunkKey& key, std::chrono::steady_clock::time_point deadline);
  // Deterministic mode only (else returns at once): waits until no write-back is in flight, or
  // `deadline` (the disk deadline from now when not given).
  void WaitForWriteBacks(std::chrono::steady_clock::time_point deadline);
  void WaitForWriteBacks() {
    if (deterministic_writeback_) WaitForWriteBacks(DiskDeadline());
  }
  // The write-back of `key` is over (written, failed or not admitted): frees its block and wakes
  // WaitForWriteBacks.
  void EndWriteBack(const ChunkKey& key);
  // The deadline of a wait on the disk: it answers every request by io_timeout; plus slack.
  std::chrono::steady_clock::time_point DiskDeadline() const {
    return std::chrono::steady_clock::now() +
           std::chrono::milliseconds(2 * disk_io_timeout_ms_ + 1000);
  }

  // Declaration order is destruction order reversed: the engine (whose callbacks touch the index
  // and counters) goes first, the memory last.
  std::unique_ptr<EventLog> events_;  // null when off; the index and the disk record into it
  std::unique_ptr<Arena> arena_;
  std::unique_ptr<BlockAllocator> allocator_;
  std::unique_ptr<ChunkIndex> index_;
  // Per block: kChecksumKnown | CRC32C of its blob, or 0 (not known). Written by the block's
  // holder only (Reserve, NoteBlobChecksum, BlobChecksum), so plain atomics suffice.
  std::unique_ptr<std::atomic<uint64_t>[]> blob_crc_;
  static constexpr uint64_t kChecksumKnown = uint64_t{1} << 32;
  uint64_t num_pages_ = 0;
  int64_t close_timeout_ms_ = 30000;

  std::unique_ptr<DiskStore> disk_;  // after index_: destroyed first, its callbacks see the index
  uint32_t admit_min_seen_ = 2;
  int64_t disk_io_timeout_ms_ = 10000;
  bool deterministic_writeback_ = false;
  mutable Mutex hook_mu_;
  AdmissionHook admission_hook_ GUARDED_BY(hook_mu_);
  std::atomic<bool> has_admission_hook_{false};
  std::atomic<uint64_t> demotions_rejected_{0}, chunks_prefetched_{0};
  std::atomic<uint64_t> lookup_disk_chunks_{0}, chunks_promoted_{0}, promotion_failures_{0},
      demotions_written_{0}, demotions_failed_{0};
  std::atomic<uint64_t> store_calls_{0}, chunks_stored_{0}, chunks_already_cached_{0},
      chunks_skipped_full_{0}, chunks_failed_{0}, load_calls_{0}, chunks_loaded_{0},
      bytes_offloaded_{0}, bytes_loaded_{0};
  mutable Mutex inflight_mu_;
  CondVar inflight_cv_;  // in_flight_ reached 0; deterministic mode: a write-back ended
  uint64_t in_flight_ GUARDED_BY(inflight_mu_) = 0;

  size_t max_demotions_in_flight_ = 64;
  std::timed_mutex persist_mu_;          // one Persist at a time
  std::atomic<int> persist_callers_{0};  // callers waiting for persist_mu_: the timer's run yields
  std::atomic<uint64_t> persist_runs_{0}, persist_written_{0}, persist_failed_{0},
      persist_deadline_exceeded_{0};
  Mutex timer_mu_;
  CondVar timer_cv_;
  bool timer_stop_ GUARDED_BY(timer_mu_) = false;
  std::atomic<bool> stopping_{false};
  std::thread persist_timer_;  // started last in Create, stopped first in the destructor

  // Write-through: keys queued by stores and loads (each queued key holds one StartOp, so Drain
  // waits for it), the writes in flight (bounded by max_demotions_in_flight_), the thread.
  bool write_through_ = false;
  mutable Mutex wt_mu_;
  CondVar wt_cv_;  // a key was queued, a write ended, or stop
  std::vector<ChunkKey> wt_queue_ GUARDED_BY(wt_mu_);
  bool wt_stop_ GUARDED_BY(wt_mu_) = false;
  std::atomic<size_t> wt_in_flight_{0};
  std::atomic<uint64_t> wt_written_{0}, wt_failed_{0}, blob_checksums_computed_{0};
  std::thread wt_thread_;

  std::unique_ptr<CopyEngine> engine_;
};

}  // namespace kvtier
