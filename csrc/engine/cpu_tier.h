// CpuTier: the pinned host pool, its chunk index and the copy engine, as one store/lookup/load unit.
//
// Store gathers the pages of chunks not yet cached into freshly reserved blocks; the chunks become
// visible only when the copy has completed (the completion callback commits them). Load pins the
// leading cached chunks, scatters them into the caller's pages and unpins them when the copy is done.
//
// Thread safety: every method may be called from any thread concurrently.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "common/status.h"
#include "index/chunk_index.h"
#include "memory/arena.h"
#include "memory/block_allocator.h"
#include "transfer/copy_engine.h"

namespace kvtier {

struct CpuTierOptions {
  uint64_t capacity_bytes = 1ull << 30;  // hard bound of the pool: floor(capacity / blob) blocks
  CopyEngineOptions copy;
  int64_t close_timeout_ms = 30000;      // how long the destructor waits for in-flight copies
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
  static StatusOr<std::unique_ptr<CpuTier>> Create(const LayoutDesc& layout, const CpuTierOptions& options);
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
  // Loads the leading READY chunks into page_ids[0 .. hits*ppc).
  StatusOr<TierOp> Load(const ChunkKey* keys, size_t n, const std::vector<uint32_t>& page_ids,
                        uintptr_t after_stream);

  CpuTierStats stats() const;
  const Arena& arena() const { return *arena_; }
  uint64_t blob_bytes() const { return engine_->blob_bytes(); }
  uint32_t pages_per_chunk() const { return engine_->layout().pages_per_chunk; }
  size_t capacity_chunks() const { return allocator_->num_blocks(); }
  TransferMethod method() const { return engine_->method(); }
  // Blocks until no copy is in flight, or the timeout passes (DeadlineExceeded).
  Status Drain(int64_t timeout_ms);

 private:
  CpuTier() = default;
  // Range and repetition of page ids: InvalidArgument naming the first bad entry.
  Status CheckPages(const std::vector<uint32_t>& page_ids, size_t needed) const;
  void FinishOp();

  // Declaration order is destruction order reversed: the engine (whose callbacks touch the index
  // and counters) goes first, the memory last.
  std::unique_ptr<Arena> arena_;
  std::unique_ptr<BlockAllocator> allocator_;
  std::unique_ptr<ChunkIndex> index_;
  uint64_t num_pages_ = 0;
  int64_t close_timeout_ms_ = 30000;

  std::atomic<uint64_t> store_calls_{0}, chunks_stored_{0}, chunks_already_cached_{0},
      chunks_skipped_full_{0}, chunks_failed_{0}, load_calls_{0}, chunks_loaded_{0},
      bytes_offloaded_{0}, bytes_loaded_{0};
  mutable std::mutex inflight_mu_;
  std::condition_variable inflight_cv_;
  uint64_t in_flight_ = 0;  // guarded by inflight_mu_

  std::unique_ptr<CopyEngine> engine_;
};

}  // namespace kvtier
