// ChunkIndex: chunk key -> block of a tier, with WRITING/READY states, reader pins and eviction in
// the order of a pluggable EvictionPolicy (LRU unless told otherwise).
//
// Thread safety: all methods may be called concurrently from any thread; one mutex guards the map
// and the eviction policy (which is only ever called under it), and blocks come from a thread-safe
// BlockAllocator owned by the caller.
//
// Entry life cycle
//   (absent) --BeginInsert--> WRITING      invisible to Lookup/Acquire; its block is reserved
//   WRITING  --CommitInsert--> READY        visible; the eviction policy starts tracking it
//   WRITING  --AbortInsert-->  (absent)     block freed; nothing was ever visible
//   READY    --Acquire-->      READY, pins + 1   (a reader copies the block's bytes; a policy hit)
//   READY    --Release-->      READY, pins - 1
//   READY, pins == 0 --evicted or Erase--> (absent)   block freed
//   READY, pins == 0 --evicted, demotion admitted--> DEMOTING   still visible and readable; the
//                     block is held for a write-back to the next tier (TakeDemotions)
//   DEMOTING --FinishDemotion--> (absent)   block freed (once the last reader releases it)
// Visible (Lookup, Acquire, Contains) are READY and DEMOTING entries: a visibility observer hears
// of CommitInsert, of an eviction that erases, of FinishDemotion and of Erase, once each.
// Invariants: a WRITING entry or a READY entry with pins > 0 is never evicted, so a block in use by
// a transfer is never reused; the index never holds more blocks than the allocator has. The policy
// tracks exactly the READY entries (see eviction_policy.h); Lookup does not touch it.
//
//   BeginInsert(key)
//     REQUIRES: the caller later calls exactly one of CommitInsert(key) / AbortInsert(key).
//   Acquire(keys, n, ...)
//     REQUIRES: the caller later calls Release once for each key it acquired.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "common/mutex.h"
#include "common/status.h"
#include "common/thread_annotations.h"
#include "index/chunk_key.h"
#include "index/eviction_policy.h"
#include "index/visibility_observer.h"
#include "memory/block_allocator.h"

namespace kvtier {

struct ChunkIndexStats {
  size_t entries = 0;
  size_t ready = 0;
  size_t writing = 0;
  size_t pinned = 0;         // READY entries with pins > 0
  uint64_t lookups = 0;      // Lookup calls
  uint64_t hit_chunks = 0;   // chunks found READY by Lookup/Acquire
  uint64_t miss_chunks = 0;  // Lookup/Acquire stopped at a chunk not READY (one per call at most)
  uint64_t inserts = 0;      // CommitInsert
  uint64_t aborts = 0;       // AbortInsert
  uint64_t evictions = 0;
  uint64_t insert_rejected = 0;         // BeginInsert refused: full and nothing evictable
  size_t demoting = 0;                  // entries held for a write-back right now
  uint64_t demotions = 0;               // evictions handed to the next tier
  uint64_t demotions_not_admitted = 0;  // evictions the admission rule dropped
  uint64_t demotions_busy = 0;  // evictions dropped because max_in_flight write-backs were running
};

// Decides whether an evicted chunk is written back to the next tier. `seen` counts the requests
// that contained the chunk while it was cached here (its store, and every later store or acquire).
// Called under the index lock: must be cheap and must not call back into the index.
using DemotionFilter = bool (*)(void* ctx, const ChunkKey& key, uint32_t seen);

class ChunkIndex {
 public:
  // The index hands out blocks of `allocator`, which must outlive it, and evicts in the order of
  // `policy` (LRU when null). The policy must be fresh: it tracks no keys.
  explicit ChunkIndex(BlockAllocator* allocator, std::unique_ptr<EvictionPolicy> policy = nullptr);
  ChunkIndex(const ChunkIndex&) = delete;
  ChunkIndex& operator=(const ChunkIndex&) = delete;

  // Reserves a block for `key` in state WRITING, evicting unpinned READY entries (the policy's
  // victims) if no block is free. AlreadyExists if the key is present (WRITING or READY);
  // ResourceExhausted if every block is WRITING or pinned (counted as insert_rejected).
  StatusOr<BlockId> BeginInsert(const ChunkKey& key) EXCLUDES(mu_);
  // WRITING -> READY (the policy starts tracking it). NotFound / FailedPrecondition on misuse.
  Status CommitInsert(const ChunkKey& key) EXCLUDES(mu_);
  // WRITING -> absent, block freed.
  Status AbortInsert(const ChunkKey& key) EXCLUDES(mu_);

  // Number of leading keys (keys[0..n)) that are READY. Does not change recency.
  size_t Lookup(const ChunkKey* keys, size_t n) EXCLUDES(mu_);
  // Pins the leading READY keys (at most n), appends their blocks to `blocks`, reports them to the
  // policy as hits, tail first (under LRU the first key ends most recent of all, since a prefix's
  // head is worth more than its tail), and returns how many were acquired.
  size_t Acquire(const ChunkKey* keys, size_t n, std::vector<BlockId>* blocks) EXCLUDES(mu_);
  // Drops one pin of each key. FailedPrecondition (and no change for that key) if not pinned.
  Status Release(const ChunkKey* keys, size_t n) EXCLUDES(mu_);
  // Removes a READY, unpinned entry. NotFound / FailedPrecondition otherwise.
  Status Erase(const ChunkKey& key) EXCLUDES(mu_);

  // Enables write-back: evicted entries that `filter` admits become DEMOTING (at most
  // `max_in_flight` at once; beyond that an eviction just drops the chunk, so a store never waits).
  // With `wait_at_bound`, an eviction that would need a write-back beyond `max_in_flight` is not
  // made at all (BeginInsert reports ResourceExhausted; the caller waits for write-backs to end)
  // instead of dropping the chunk.
  void EnableDemotion(DemotionFilter filter, void* ctx, size_t max_in_flight,
                      bool wait_at_bound = false) EXCLUDES(mu_);
  // Hands out the entries that became DEMOTING since the last call: (key, block) pairs whose bytes
  // stay valid until FinishDemotion(key).
  struct Demotion {
    ChunkKey key;
    BlockId block;
    uint32_t seen;  // requests that carried the chunk while it was cached here
  };
  std::vector<Demotion> TakeDemotions() EXCLUDES(mu_);
  // The write-back of `key` is over (done or failed): the entry goes, its block is freed as soon
  // as no reader holds it.
  Status FinishDemotion(const ChunkKey& key) EXCLUDES(mu_);

  // The READY entries as (key, block, seen), for a caller that copies them elsewhere (the disk
  // tier's persist). Neither pins them nor touches the policy: they may be evicted right after.
  std::vector<Demotion> ReadyEntries() const EXCLUDES(mu_);
  // Pins each of keys[0..n) that is READY and was seen by at least `min_seen` requests, without
  // reporting a hit to the policy (recency and `seen` stay as they are): pinned[i] = 1 and
  // blocks[i] = its block for those. Returns how many. With `once`, an entry pinned so before
  // (with `once`) in its stay in the index is skipped: the disk's write-through writes a chunk at
  // most once while it is in the pool, so a chunk the disk evicted is not written again on every
  // hit (its eviction from the pool writes it back instead, if admitted).
  // REQUIRES: the caller later calls Release once for each key it pinned.
  size_t PinQuietly(const ChunkKey* keys, size_t n, std::vector<BlockId>* blocks,
                    std::vector<uint8_t>* pinned, uint32_t min_seen = 0, bool once = false)
      EXCLUDES(mu_);

  // From now on `observer` is told each time an entry becomes visible (CommitInsert) or stops
  // being visible (evicted, FinishDemotion, Erase), under the index lock; the entries visible now
  // are reported first. Null stops it.
  void SetVisibilityObserver(VisibilityObserver observer, void* ctx) EXCLUDES(mu_);

  bool Contains(const ChunkKey& key) const EXCLUDES(mu_);  // READY or DEMOTING
  bool IsWriting(const ChunkKey& key) const EXCLUDES(mu_);
  size_t demoting() const EXCLUDES(mu_);  // entries held for a write-back right now
  ChunkIndexStats stats() const EXCLUDES(mu_);
  // The policy's name: "lru", "s3fifo", "lfu".
  const char* eviction_policy() const { return policy_->name(); }

 private:
  // kDropping: demotion finished while readers held the block; invisible, freed at last Release.
  enum class State : uint8_t { kWriting, kReady, kDemoting, kDropping };
  struct Entry {
    BlockId block;
    State state;
    uint32_t pins;
    uint32_t seen;
    bool pinned_once = false;  // PinQuietly(once) has pinned it
  };
  static bool Visible(State s) { return s == State::kReady || s == State::kDemoting; }

  // Frees the block of the policy's next victim (an unpinned READY entry); victims admitted for
  // write-back become DEMOTING on the way. False if no block could be freed.
  bool EvictOneLocked() REQUIRES_LOCK(mu_);
  void NotifyLocked(const ChunkKey& key, bool visible) REQUIRES_LOCK(mu_) {
    if (observer_ != nullptr) observer_(observer_ctx_, key, visible);
  }

  BlockAllocator* const allocator_;
  mutable Mutex mu_;
  std::unordered_map<ChunkKey, Entry, ChunkKeyHash> map_ GUARDED_BY(mu_);
  // Tracks the READY entries; called only under mu_. The pointer itself never changes.
  const std::unique_ptr<EvictionPolicy> policy_;
  size_t pinned_entries_ GUARDED_BY(mu_) = 0;
  size_t writing_ GUARDED_BY(mu_) = 0;
  DemotionFilter demotion_filter_ GUARDED_BY(mu_) = nullptr;
  void* demotion_ctx_ GUARDED_BY(mu_) = nullptr;
  size_t max_demotions_ GUARDED_BY(mu_) = 0;
  bool wait_at_bound_ GUARDED_BY(mu_) = false;
  size_t demoting_ GUARDED_BY(mu_) = 0;
  std::vector<Demotion> new_demotions_ GUARDED_BY(mu_);
  std::vector<uint8_t> acquired_ready_ GUARDED_BY(mu_);  // Acquire's scratch: which hits were READY
  ChunkIndexStats counters_ GUARDED_BY(mu_);
  VisibilityObserver observer_ GUARDED_BY(mu_) = nullptr;
  void* observer_ctx_ GUARDED_BY(mu_) = nullptr;
};

}  // namespace kvtier
