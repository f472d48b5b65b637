// ChunkIndex: hash map of entries plus the eviction policy that tracks the READY ones; one mutex.
#include "index/chunk_index.h"

#include <cstdio>

#include "common/mutex.h"

namespace kvtier {

std::string ChunkKey::Hex() const {
  unsigned char b[16];
  ToBytes(b);
  char out[33];
  for (int i = 0; i < 16; ++i) std::snprintf(out + 2 * i, 3, "%02x", b[i]);
  return std::string(out, 32);
}

ChunkIndex::ChunkIndex(BlockAllocator* allocator, std::unique_ptr<EvictionPolicy> policy)
    : allocator_(allocator), policy_(policy != nullptr ? std::move(policy) : NewLruPolicy()) {
  map_.reserve(allocator->num_blocks());
}

bool ChunkIndex::EvictOneLocked() {
  // The policy tracks only READY entries, so "evictable" is "not pinned". A victim admitted for
  // write-back leaves the policy as DEMOTING (its block is not free yet), and the search goes on.
  auto* entries = &map_;       // the predicate runs inside PickVictim, still under mu_
  auto last_yes = map_.end();  // saves a second lookup of the victim
  auto unpinned = [entries, &last_yes](const ChunkKey& k) {
    auto it = entries->find(k);
    if (it == entries->end() || it->second.pins != 0) return false;
    last_yes = it;
    return true;
  };
  ChunkKey victim;
  while (true) {
    // Backpressure: with the write-back bound reached, evict nothing until write-backs end (the
    // caller waits for them), rather than drop chunks the admission rule wants on disk.
    if (demotion_filter_ != nullptr && wait_at_bound_ && demoting_ >= max_demotions_) return false;
    if (!policy_->PickVictim(unpinned, &victim)) break;
    auto e = last_yes != map_.end() && last_yes->first == victim ? last_yes : map_.find(victim);
    last_yes = map_.end();
    policy_->OnRemove(victim);
    if (demotion_filter_ != nullptr) {
      if (!demotion_filter_(demotion_ctx_, e->first, e->second.seen)) {
        ++counters_.demotions_not_admitted;
      } else if (demoting_ >= max_demotions_) {
        ++counters_.demotions_busy;
      } else {
        e->second.state = State::kDemoting;
        ++demoting_;
        ++counters_.demotions;
        new_demotions_.push_back(Demotion{e->first, e->second.block, e->second.seen});
        continue;
      }
    }
    BlockId block = e->second.block;
    NotifyLocked(e->first, false);
    map_.erase(e);
    (void)allocator_->Free(block);  // cannot fail: the index owns the block and nobody pins it
    ++counters_.evictions;
    return true;
  }
  return false;
}

void ChunkIndex::EnableDemotion(DemotionFilter filter, void* ctx, size_t max_in_flight,
                                bool wait_at_bound) {
  MutexLock lock(&mu_);
  wait_at_bound_ = wait_at_bound;
  demotion_filter_ = filter;
  demotion_ctx_ = ctx;
  max_demotions_ = max_in_flight;
}

std::vector<ChunkIndex::Demotion> ChunkIndex::TakeDemotions() {
  MutexLock lock(&mu_);
  std::vector<Demotion> out;
  out.swap(new_demotions_);
  return out;
}

Status ChunkIndex::FinishDemotion(const ChunkKey& key) {
  MutexLock lock(&mu_);
  auto it = map_.find(key);
  if (it == map_.end() || it->second.state != State::kDemoting) {
    return Status::FailedPrecondition("chunk " + key.Hex() + " is not being demoted");
  }
  --demoting_;
  NotifyLocked(key, false);  // DEMOTING -> DROPPING or gone: invisible either way
  if (it->second.pins != 0) {
    it->second.state = State::kDropping;  // the last Release frees it
    return Status::OK();
  }
  BlockId block = it->second.block;
  map_.erase(it);
  ++counters_.evictions;
  return allocator_->Free(block);
}

StatusOr<BlockId> ChunkIndex::BeginInsert(const ChunkKey& key) {
  MutexLock lock(&mu_);
  auto existing = map_.find(key);
  if (existing != map_.end()) {
    ++existing->second.seen;  // another request carried this chunk: it counts for admission
    return Status::AlreadyExists("chunk " + key.Hex() + " is already cached");
  }
  StatusOr<BlockId> block = allocator_->Allocate();
  while (!block.ok() && EvictOneLocked()) block = allocator_->Allocate();
  if (!block.ok()) {
    ++counters_.insert_rejected;
    return Status::ResourceExhausted(
        "tier full: every block is being written or pinned by a reader");
  }
  map_.emplace(key, Entry{*block, State::kWriting, 0, 1});
  ++writing_;
  return *block;
}

Status ChunkIndex::CommitInsert(const ChunkKey& key) {
  MutexLock lock(&mu_);
  auto it = map_.find(key);
  if (it == map_.end()) return Status::NotFound("chunk " + key.Hex() + " is not being inserted");
  if (it->second.state != State::kWriting) {
    return Status::FailedPrecondition("chunk " + key.Hex() + " is already READY");
  }
  it->second.state = State::kReady;
  NotifyLocked(key, true);
  policy_->OnInsert(key);
  --writing_;
  ++counters_.inserts;
  return Status::OK();
}

Status ChunkIndex::AbortInsert(const ChunkKey& key) {
  MutexLock lock(&mu_);
  auto it = map_.find(key);
  if (it == map_.end()) return Status::NotFound("chunk " + key.Hex() + " is not being inserted");
  if (it->second.state != State::kWriting) {
    return Status::FailedPrecondition("chunk " + key.Hex() + " is READY, not being inserted");
  }
  BlockId block = it->second.block;
  map_.erase(it);
  --writing_;
  ++counters_.aborts;
  return allocator_->Free(block);
}

size_t ChunkIndex::Lookup(const ChunkKey* keys, size_t n) {
  MutexLock lock(&mu_);
  ++counters_.lookups;
  size_t i = 0;
  for (; i < n; ++i) {
    auto it = map_.find(keys[i]);
    if (it == map_.end() || !Visible(it->second.state)) break;
  }
  counters_.hit_chunks += i;
  if (i < n) ++counters_.miss_chunks;
  return i;
}

size_t ChunkIndex::Acquire(const ChunkKey* keys, size_t n, std::vector<BlockId>* blocks) {
  MutexLock lock(&mu_);
  acquired_ready_.clear();
  size_t i = 0;
  for (; i < n; ++i) {
    auto it = map_.find(keys[i]);
    if (it == map_.end() || !Visible(it->second.state)) break;
    if (it->second.pins++ == 0) ++pinned_entries_;
    ++it->second.seen;
    blocks->push_back(it->second.block);
    acquired_ready_.push_back(it->second.state == State::kReady);
  }
  // Tail first, so that the head of the prefix ends up most recently used. DEMOTING entries are
  // readable but no longer the policy's.
  for (size_t j = i; j > 0; --j) {
    if (acquired_ready_[j - 1]) policy_->OnAccess(keys[j - 1]);
  }
  counters_.hit_chunks += i;
  if (i < n) ++counters_.miss_chunks;
  return i;
}

std::vector<ChunkIndex::Demotion> ChunkIndex::ReadyEntries() const {
  MutexLock lock(&mu_);
  std::vector<Demotion> out;
  for (const auto& [key, e] : map_) {
    if (e.state == State::kReady) out.push_back({key, e.block, e.seen});
  }
  return out;
}

size_t ChunkIndex::PinQuietly(const ChunkKey* keys, size_t n, std::vector<BlockId>* blocks,
                              std::vector<uint8_t>* pinned, uint32_t min_seen, bool once) {
  MutexLock lock(&mu_);
  blocks->assign(n, BlockId{});
  pinned->assign(n, 0);
  size_t count = 0;
  for (size_t i = 0; i < n; ++i) {
    auto it = map_.find(keys[i]);
    if (it == map_.end() || it->second.state != State::kReady) continue;
    if (it->second.seen < min_seen) continue;
    if (once) {
      if (it->second.pinned_once) continue;
      it->second.pinned_once = true;
    }
    if (it->second.pins++ == 0) ++pinned_entries_;
    (*blocks)[i] = it->second.block;
    (*pinned)[i] = 1;
    ++count;
  }
  return count;
}

Status ChunkIndex::Release(const ChunkKey* keys, size_t n) {
  MutexLock lock(&mu_);
  Status result;
  for (size_t i = 0; i < n; ++i) {
    auto it = map_.find(keys[i]);
    if (it == map_.end() || it->second.pins == 0) {
      result = Status::FailedPrecondition("chunk " + keys[i].Hex() +
                                          " is not pinned (release without acquire)");
      continue;
    }
    if (--it->second.pins == 0) {
      --pinned_entries_;
      if (it->second.state == State::kDropping) {
        BlockId block = it->second.block;
        map_.erase(it);
        ++counters_.evictions;
        (void)allocator_->Free(block);
      }
    }
  }
  return result;
}

Status ChunkIndex::Erase(const ChunkKey& key) {
  MutexLock lock(&mu_);
  auto it = map_.find(key);
  if (it == map_.end()) return Status::NotFound("chunk " + key.Hex() + " is not cached");
  if (it->second.state != State::kReady || it->second.pins != 0) {
    return Status::FailedPrecondition("chunk " + key.Hex() + " is being written or read");
  }
  BlockId block = it->second.block;
  policy_->OnRemove(key);
  NotifyLocked(key, false);
  map_.erase(it);
  return allocator_->Free(block);
}

void ChunkIndex::SetVisibilityObserver(VisibilityObserver observer, void* ctx) {
  MutexLock lock(&mu_);
  observer_ = observer;
  observer_ctx_ = ctx;
  for (const auto& [key, e] : map_) {
    if (Visible(e.state)) NotifyLocked(key, true);
  }
}

size_t ChunkIndex::demoting() const {
  MutexLock lock(&mu_);
  return demoting_;
}

bool ChunkIndex::IsWriting(const ChunkKey& key) const {
  MutexLock lock(&mu_);
  auto it = map_.find(key);
  return it != map_.end() && it->second.state == State::kWriting;
}

bool ChunkIndex::Contains(const ChunkKey& key) const {
  MutexLock lock(&mu_);
  auto it = map_.find(key);
  return it != map_.end() && Visible(it->second.state);
}

ChunkIndexStats ChunkIndex::stats() const {
  MutexLock lock(&mu_);
  ChunkIndexStats s = counters_;
  s.entries = map_.size();
  s.writing = writing_;
  s.ready = map_.size() - writing_;
  s.pinned = pinned_entries_;
  s.demoting = demoting_;
  return s;
}

}  // namespace kvtier
