// CpuTier: reserve -> copy -> commit (store) and acquire -> copy -> release (load).
#include "engine/cpu_tier.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <thread>

#include "common/mutex.h"
#include "storage/crc32c.h"

namespace kvtier {

StatusOr<std::unique_ptr<CpuTier>> CpuTier::Create(const LayoutDesc& layout,
                                                   const CpuTierOptions& options) {
  KVTIER_RETURN_IF_ERROR(ValidateLayout(layout));
  const uint64_t blob = ChunkBlobBytes(layout);
  if (blob == 0) return Status::InvalidArgument("layout has zero bytes per chunk");
  // Blocks are 4 KiB aligned so the disk tier can DMA straight from and into them (O_DIRECT).
  const uint64_t block_bytes = (blob + 4095) / 4096 * 4096;
  const uint64_t blocks = options.capacity_bytes / block_bytes;
  if (blocks == 0) {
    return Status::InvalidArgument("CPU tier capacity " + std::to_string(options.capacity_bytes) +
                                   " bytes is smaller than one chunk (" + std::to_string(blob) +
                                   " bytes)");
  }
  if (blocks > UINT32_MAX)
    return Status::InvalidArgument("CPU tier capacity holds more than 2^32 chunks");
  auto policy = MakeEvictionPolicy(options.eviction_policy);
  if (!policy.ok()) return policy.status();

  std::unique_ptr<CpuTier> tier(new CpuTier());
  tier->close_timeout_ms_ = options.close_timeout_ms;
  // Host layouts need no pinning; a GPU layout gets page-locked memory so DMA
  // runs at PCIe speed.
  ArenaKind kind = layout.device >= 0 ? ArenaKind::kPinnedHost : ArenaKind::kHost;
  auto arena = Arena::Create(kind, blocks * block_bytes, std::max(layout.device, 0));
  if (!arena.ok()) return arena.status();
  tier->arena_ = std::move(arena).value();
  if (!tier->arena_->fallback_reason().empty()) {
    std::fprintf(stderr, "kvtier: warning: %s\n", tier->arena_->fallback_reason().c_str());
  }
  tier->allocator_ = std::make_unique<BlockAllocator>(blocks, block_bytes, tier->arena_->base());
  tier->index_ = std::make_unique<ChunkIndex>(tier->allocator_.get(), std::move(policy).value());
  tier->blob_crc_ = std::make_unique<std::atomic<uint64_t>[]>(blocks);
  for (uint64_t b = 0; b < blocks; ++b) tier->blob_crc_[b].store(0, std::memory_order_relaxed);
  if (options.event_capacity > 0) {
    // A consumer that knew an earlier run of this instance starts over: both media are empty,
    // then hold what the disk recovers (reported when its observer is set, below).
    tier->events_ = std::make_unique<EventLog>(options.event_capacity);
    tier->events_->Record(EventKind::kCleared, EventMedium::kCpu, ChunkKey{});
    if (options.disk.enabled)
      tier->events_->Record(EventKind::kCleared, EventMedium::kDisk, ChunkKey{});
    tier->index_->SetVisibilityObserver(&EventLog::OnCpuVisibility, tier->events_.get());
  }
  tier->num_pages_ = UINT64_MAX;
  for (const SegmentDesc& s : layout.segments)
    tier->num_pages_ = std::min(tier->num_pages_, s.num_pages);
  if (options.disk.enabled) {
    DiskStoreOptions disk_options = options.disk.store;
    disk_options.blob_bytes = blob;
    if (options.disk.deterministic_writeback) {
      // One request at a time, so they end in the order they were made: a write makes its chunk
      // the disk's most recent when it ends, and a read commits its chunk to the pool then.
      disk_options.queue_depth = 1;
      disk_options.posix_threads = 1;
    }
    auto disk = DiskStore::Open(disk_options);
    if (!disk.ok()) return disk.status();
    tier->disk_ = std::move(disk).value();
    if (tier->events_)
      tier->disk_->SetVisibilityObserver(&EventLog::OnDiskVisibility, tier->events_.get());
    tier->admit_min_seen_ = options.disk.admit_min_seen;
    tier->disk_io_timeout_ms_ = disk_options.io_timeout_ms;
    tier->deterministic_writeback_ = options.disk.deterministic_writeback;
    tier->max_demotions_in_flight_ = std::max<size_t>(1, options.disk.max_demotions_in_flight);
    tier->index_->EnableDemotion(&CpuTier::AdmitForDemotion, tier.get(),
                                 tier->max_demotions_in_flight_,
                                 /*wait_at_bound=*/true);
  }
  // Off in deterministic mode, as the persist timer is: its writes end when the disk finishes
  // them, not at points the calls decide.
  tier->write_through_ =
      options.disk.enabled && options.disk.write_through && !options.disk.deterministic_writeback;
  auto engine = CopyEngine::Create(layout, options.copy);
  if (!engine.ok()) return engine.status();
  tier->engine_ = std::move(engine).value();
  if (tier->write_through_) {
    CpuTier* t = tier.get();
    t->wt_thread_ = std::thread([t] { t->WriteThroughLoop(); });
  }
  if (tier->disk_ && options.disk.persist_interval_ms > 0 &&
      !options.disk.deterministic_writeback) {
    CpuTier* t = tier.get();
    const auto interval = std::chrono::milliseconds(options.disk.persist_interval_ms);
    t->persist_timer_ = std::thread([t, interval] { t->PersistTimerLoop(interval); });
  }
  return tier;
}

void CpuTier::PersistTimerLoop(std::chrono::milliseconds interval) {
  MutexLock lock(&timer_mu_);
  while (!timer_cv_.WaitFor(lock, interval,
                            [this]() REQUIRES_LOCK(timer_mu_) { return timer_stop_; })) {
    lock.Unlock();
    {
      // A caller's Persist holds the lock: it is doing this run's work.
      std::unique_lock<std::timed_mutex> persist_lock(persist_mu_, std::try_to_lock);
      if (persist_lock.owns_lock()) {
        // Each run ends by the next tick, so runs never pile up behind a slow disk.
        (void)PersistLocked(std::chrono::steady_clock::now() + interval, /*periodic=*/true);
      }
    }
    lock.Lock();
  }
}

StatusOr<PersistResult> CpuTier::Persist(int64_t timeout_ms) {
  if (!disk_) return Status::FailedPrecondition("Persist needs a disk tier (none is configured)");
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::milliseconds(std::max<int64_t>(0, timeout_ms));
  ++persist_callers_;  // the timer's run stops after its current batch
  std::unique_lock<std::timed_mutex> lock(persist_mu_, deadline);
  --persist_callers_;
  if (!lock.owns_lock()) {
    ++persist_runs_;
    ++persist_deadline_exceeded_;
    PersistResult r;
    r.deadline_exceeded = true;
    return r;
  }
  return PersistLocked(deadline, /*periodic=*/false);
}

PersistResult CpuTier::PersistLocked(std::chrono::steady_clock::time_point deadline,
                                     bool periodic) {
  ++persist_runs_;
  WaitForWriteBacks();
  PersistResult r;
  std::vector<ChunkIndex::Demotion> todo;
  for (const ChunkIndex::Demotion& e : index_->ReadyEntries()) {
    if (disk_->Contains(e.key)) {
      ++r.skipped;
    } else {
      todo.push_back(e);
    }
  }
  // The most-seen first; more than the disk holds would only evict each other.
  std::stable_sort(
      todo.begin(), todo.end(),
      [](const ChunkIndex::Demotion& a, const ChunkIndex::Demotion& b) { return a.seen > b.seen; });
  if (todo.size() > disk_->num_slots()) {
    r.not_started += todo.size() - disk_->num_slots();
    todo.resize(disk_->num_slots());
  }
  struct Shared {
    Mutex mu;
    CondVar cv;
    size_t pending = 0, written = 0, failed = 0;
  };
  auto shared = std::make_shared<Shared>();
  std::vector<BlockId> blocks;
  std::vector<uint8_t> pinned;
  for (size_t start = 0; start < todo.size(); start += max_demotions_in_flight_) {
    const bool yield = periodic && (stopping_.load() || persist_callers_.load() > 0);
    if (yield || std::chrono::steady_clock::now() >= deadline) {
      r.not_started += todo.size() - start;
      r.deadline_exceeded = !yield;
      break;
    }
    const size_t n = std::min(max_demotions_in_flight_, todo.size() - start);
    std::vector<ChunkKey> keys;
    for (size_t i = 0; i < n; ++i) keys.push_back(todo[start + i].key);
    index_->PinQuietly(keys.data(), n, &blocks, &pinned);
    for (size_t i = 0; i < n; ++i) {
      if (!pinned[i]) {  // evicted (and written back, if admitted) since the snapshot
        ++r.skipped;
        continue;
      }
      const ChunkKey k = keys[i];
      StartOp();
      {
        MutexLock lock(&shared->mu);
        ++shared->pending;
      }
      // The callback releases the pin, not the waiter: the waiter may give up at its deadline.
      auto finish = [this, shared, k](const Status& st) {
        (void)index_->Release(&k, 1);
        if (st.ok()) {
          ++persist_written_;
        } else {
          ++persist_failed_;
        }
        {
          MutexLock lock(&shared->mu);
          ++(st.ok() ? shared->written : shared->failed);
          if (--shared->pending == 0) shared->cv.NotifyAll();
        }
        FinishOp();
      };
      uint32_t crc;
      Status s = KnownChecksum(blocks[i], &crc)
                     ? disk_->Write(k, allocator_->BlockAddress(blocks[i]), crc, finish)
                     : disk_->Write(k, allocator_->BlockAddress(blocks[i]), finish);
      if (!s.ok()) {
        if (s.code() == StatusCode::kAlreadyExists) {  // a write-back of it started meanwhile
          (void)index_->Release(&k, 1);
          {
            MutexLock lock(&shared->mu);
            --shared->pending;
          }
          ++r.skipped;
          FinishOp();
        } else {
          finish(s);
        }
      }
    }
    MutexLock lock(&shared->mu);
    if (!shared->cv.WaitUntil(lock, deadline, [&] { return shared->pending == 0; })) {
      r.not_started += todo.size() - (start + n);
      r.deadline_exceeded = true;
      break;
    }
  }
  {
    MutexLock lock(&shared->mu);
    r.written = shared->written;
    r.failed = shared->failed;
    r.still_running = shared->pending;
  }
  if (r.deadline_exceeded) ++persist_deadline_exceeded_;
  return r;
}

bool CpuTier::AdmitForDemotion(void* self, const ChunkKey& key, uint32_t seen) {
  auto* tier = static_cast<CpuTier*>(self);
  // Written through already: the block frees now, with no write-back to wait for. (Under the
  // index's lock; the disk never calls into the index under its own.)
  if (tier->write_through_ && tier->disk_->Contains(key)) return false;
  // With a hook, every eviction is staged for write-back; the hook decides in PumpDemotions.
  return tier->has_admission_hook_.load() || seen >= tier->admit_min_seen_;
}

void CpuTier::SetAdmissionHook(AdmissionHook hook) {
  MutexLock lock(&hook_mu_);
  admission_hook_ = std::move(hook);
  has_admission_hook_ = static_cast<bool>(admission_hook_);
}

StatusOr<BlockId> CpuTier::WaitForBlock(const ChunkKey& key,
                                        std::chrono::steady_clock::time_point deadline) {
  StatusOr<BlockId> b = Reserve(key);
  while (!b.ok() && b.status().code() == StatusCode::kResourceExhausted &&
         std::chrono::steady_clock::now() < deadline) {
    PumpDemotions();
    // Nothing in flight frees a block (a write-through write's end releases its pin).
    if (index_->demoting() == 0 && wt_in_flight_.load() == 0) return Reserve(key);
    if (deterministic_writeback_) {
      WaitForWriteBacks(deadline);  // all of them: how many end in one poll depends on the disk
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    b = Reserve(key);
  }
  return b;
}

void CpuTier::WaitForWriteBacks(std::chrono::steady_clock::time_point deadline) {
  if (!deterministic_writeback_) return;
  MutexLock lock(&inflight_mu_);
  (void)inflight_cv_.WaitUntil(lock, deadline, [this] { return index_->demoting() == 0; });
}

void CpuTier::EndWriteBack(const ChunkKey& key) {
  (void)index_->FinishDemotion(key);
  if (!deterministic_writeback_) return;
  // Under the lock, so a waiter between its check of demoting() and its sleep cannot miss it.
  MutexLock lock(&inflight_mu_);
  inflight_cv_.NotifyAll();
}

void CpuTier::WaitWhileWriting(const ChunkKey& key,
                               std::chrono::steady_clock::time_point deadline) {
  while (index_->IsWriting(key) && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
}

size_t CpuTier::Prefetch(const ChunkKey* keys, size_t n) {
  if (!disk_) return 0;
  WaitForWriteBacks();
  const auto deadline = DiskDeadline();
  // Reserve a block for every chunk first, as a load's promotion does: a reservation is WRITING
  // and never evicted, so reserving a later chunk cannot evict an earlier one whose read has
  // already landed (with write-backs in flight the eviction search takes every READY chunk).
  std::vector<ChunkKey> reserved_keys;
  std::vector<BlockId> blocks;
  for (size_t i = 0; i < n; ++i) {
    if (index_->Contains(keys[i]) || index_->IsWriting(keys[i])) continue;
    if (!disk_->Contains(keys[i])) break;
    // Room may have to come from write-backs of evicted chunks: wait for them, to the deadline.
    StatusOr<BlockId> block = WaitForBlock(keys[i], deadline);
    if (!block.ok()) break;
    reserved_keys.push_back(keys[i]);
    blocks.push_back(*block);
  }
  PumpDemotions();  // the reservations may have marked victims for write-back
  // Deterministic mode: they end before the reads start (as in PromoteFromDisk).
  WaitForWriteBacks(deadline);
  size_t started = 0;
  for (size_t j = 0; j < reserved_keys.size(); ++j) {
    const ChunkKey k = reserved_keys[j];
    StartOp();
    Status s = disk_->Read(k, allocator_->BlockAddress(blocks[j]), [this, k](const Status& st) {
      if (st.ok()) {
        (void)index_->CommitInsert(k);
        ++chunks_prefetched_;
      } else {
        (void)index_->AbortInsert(k);
        ++promotion_failures_;
      }
      FinishOp();
    });
    if (!s.ok()) {  // evicted from disk by the write-backs just made: a miss, as in a load
      (void)index_->AbortInsert(k);
      ++promotion_failures_;
      FinishOp();
      continue;
    }
    ++started;
    // Deterministic mode: the disk runs one read at a time, in order.
    if (deterministic_writeback_) WaitWhileWriting(k, deadline);
  }
  return started;
}

void CpuTier::StartOp() {
  MutexLock lock(&inflight_mu_);
  ++in_flight_;
}

void CpuTier::QueueWriteThrough(const ChunkKey* keys, size_t n) {
  if (!write_through_ || n == 0 || has_admission_hook_.load()) return;
  for (size_t i = 0; i < n; ++i) StartOp();  // each queued key: Drain waits for its write
  {
    MutexLock lock(&wt_mu_);
    wt_queue_.insert(wt_queue_.end(), keys, keys + n);
  }
  wt_cv_.NotifyAll();
}

void CpuTier::WriteThroughLoop() {
  std::vector<ChunkKey> batch;
  std::vector<BlockId> blocks;
  std::vector<uint8_t> pinned;
  MutexLock lock(&wt_mu_);
  while (true) {
    wt_cv_.Wait(lock, [this]() REQUIRES_LOCK(wt_mu_) { return wt_stop_ || !wt_queue_.empty(); });
    batch.clear();
    batch.swap(wt_queue_);
    if (wt_stop_) {  // the destructor drained first: these were queued after it gave up
      lock.Unlock();
      for (size_t i = 0; i < batch.size(); ++i) FinishOp();
      return;
    }
    lock.Unlock();
    for (const ChunkKey& k : batch) {
      // Not yet on disk, still READY, admitted by the rule an eviction applies, and not written
      // through before while in the pool (a chunk the disk evicted since is written back at its
      // eviction from the pool, if admitted, not again on each hit).
      if (disk_->Contains(k) ||
          index_->PinQuietly(&k, 1, &blocks, &pinned, admit_min_seen_, /*once=*/true) == 0) {
        FinishOp();
        continue;
      }
      {
        MutexLock wait(&wt_mu_);  // at most max_demotions_in_flight_ writes at once
        (void)wt_cv_.WaitUntil(wait, DiskDeadline(), [this]() REQUIRES_LOCK(wt_mu_) {
          return wt_stop_ || wt_in_flight_.load() < max_demotions_in_flight_;
        });
      }
      ++wt_in_flight_;
      // The callback, not this loop, releases the pin: the block stays put until the write ends.
      auto done = [this, k](const Status& st) {
        (void)index_->Release(&k, 1);
        ++(st.ok() ? wt_written_ : wt_failed_);
        {
          MutexLock l(&wt_mu_);
          --wt_in_flight_;
        }
        wt_cv_.NotifyAll();
        FinishOp();
      };
      // One pass over the blob gives the disk its checksum and keeps it for leases (NIXL).
      Status s =
          disk_->Write(k, allocator_->BlockAddress(blocks[0]), BlockChecksum(blocks[0]), done);
      if (!s.ok()) {  // done will not run; AlreadyExists: a write-back or persist got there first
        (void)index_->Release(&k, 1);
        if (s.code() != StatusCode::kAlreadyExists) ++wt_failed_;
        {
          MutexLock l(&wt_mu_);
          --wt_in_flight_;
        }
        wt_cv_.NotifyAll();
        FinishOp();
      }
    }
    lock.Lock();
  }
}

void CpuTier::PumpDemotions() {
  if (!disk_) return;
  std::vector<ChunkIndex::Demotion> demotions = index_->TakeDemotions();
  if (demotions.empty()) return;
  std::vector<uint8_t> admit(demotions.size(), 1);
  if (has_admission_hook_) {
    std::vector<ChunkKey> keys;
    std::vector<uint32_t> seen;
    for (const auto& d : demotions) {
      keys.push_back(d.key);
      seen.push_back(d.seen);
    }
    MutexLock lock(&hook_mu_);
    if (admission_hook_) {
      std::vector<uint8_t> verdict = admission_hook_(keys, seen);
      for (size_t i = 0; i < admit.size(); ++i) admit[i] = i < verdict.size() && verdict[i];
    }
  }
  for (size_t i = 0; i < demotions.size(); ++i) {
    const ChunkKey k = demotions[i].key;
    if (!admit[i]) {
      ++demotions_rejected_;
      EndWriteBack(k);
      continue;
    }
    StartOp();
    auto done = [this, k](const Status& st) {
      if (st.ok()) {
        ++demotions_written_;
      } else {
        ++demotions_failed_;
      }
      EndWriteBack(k);
      FinishOp();
    };
    const BlockId block = demotions[i].block;
    uint32_t crc;
    Status s = KnownChecksum(block, &crc)
                   ? disk_->Write(k, allocator_->BlockAddress(block), crc, std::move(done))
                   : disk_->Write(k, allocator_->BlockAddress(block), std::move(done));
    if (!s.ok()) {  // already on disk (AlreadyExists) or refused: the pool copy just goes
      if (s.code() == StatusCode::kAlreadyExists) {
        ++demotions_written_;
      } else {
        ++demotions_failed_;
      }
      EndWriteBack(k);
      FinishOp();
    }
  }
}

size_t CpuTier::PromoteFromDisk(const ChunkKey* keys, size_t n) {
  // Reserve a pool block for each chunk (WRITING: invisible, not evictable) and read into it.
  struct Shared {
    Mutex mu;
    CondVar cv;
    size_t pending = 0;
    std::vector<Status> results;
  };
  auto shared = std::make_shared<Shared>();
  std::vector<BlockId> blocks;
  const auto wait_deadline = DiskDeadline();
  for (size_t i = 0; i < n; ++i) {
    StatusOr<BlockId> b = Reserve(keys[i]);
    // A pool full of chunks being written back to disk frees blocks as those writes end: a load
    // waits for that (to its deadline) rather than turn a disk hit into a recompute.
    if (!b.ok() && b.status().code() == StatusCode::kResourceExhausted)
      b = WaitForBlock(keys[i], wait_deadline);
    if (!b.ok()) {
      // A prefetch may be reading this very chunk: let it finish, then the caller's Acquire
      // finds it in the pool. Anything else (the pool full of pinned blocks) ends the run.
      if (b.status().code() == StatusCode::kAlreadyExists) WaitWhileWriting(keys[i], wait_deadline);
      break;
    }
    blocks.push_back(*b);
  }
  PumpDemotions();  // BeginInsert may have marked victims for write-back
  // Deterministic mode: they end before the reads start, so whether a write-back or a read makes
  // its chunk the disk's most recent does not depend on the disk's speed.
  WaitForWriteBacks(wait_deadline);
  const size_t reserved = blocks.size();
  shared->results.assign(reserved, Status::Internal("read not finished"));
  shared->pending = reserved;
  for (size_t i = 0; i < reserved; ++i) {
    ChunkKey k = keys[i];
    StartOp();
    Status s =
        disk_->Read(k, allocator_->BlockAddress(blocks[i]), [this, shared, i, k](const Status& st) {
          // Commit or abort here, not in the waiter: the waiter may have given up on its deadline.
          if (st.ok()) {
            (void)index_->CommitInsert(k);
            ++chunks_promoted_;
          } else {
            (void)index_->AbortInsert(k);
            ++promotion_failures_;
          }
          {
            MutexLock lock(&shared->mu);
            shared->results[i] = st;
            if (--shared->pending == 0) shared->cv.NotifyAll();
          }
          FinishOp();
        });
    if (!s.ok()) {  // evicted from disk since the lookup: a miss from here on
      (void)index_->AbortInsert(k);
      ++promotion_failures_;
      MutexLock lock(&shared->mu);
      shared->results[i] = s;
      --shared->pending;
      FinishOp();
    }
  }
  MutexLock lock(&shared->mu);
  // The disk store answers every request by its own deadline; allow it that, plus slack.
  const auto deadline = DiskDeadline();
  if (!shared->cv.WaitUntil(lock, deadline, [&] { return shared->pending == 0; })) return 0;
  size_t ok = 0;
  while (ok < reserved && shared->results[ok].ok()) ++ok;
  return ok;
}

CpuTier::~CpuTier() {
  if (persist_timer_.joinable()) {
    stopping_ = true;  // a run in progress stops after its current batch
    {
      MutexLock lock(&timer_mu_);
      timer_stop_ = true;
    }
    timer_cv_.NotifyAll();
    persist_timer_.join();
  }
  Status s = Drain(close_timeout_ms_);
  if (!s.ok())
    std::fprintf(stderr, "kvtier: CpuTier closing with copies in flight: %s\n",
                 s.ToString().c_str());
  if (wt_thread_.joinable()) {
    {
      MutexLock lock(&wt_mu_);
      wt_stop_ = true;
    }
    wt_cv_.NotifyAll();
    wt_thread_.join();
  }
  engine_.reset();  // synchronizes its streams / workers; callbacks still see a live index
  disk_.reset();    // waits for its I/O; its callbacks still see the index and counters
}

Status CpuTier::CheckPages(const std::vector<uint32_t>& page_ids, size_t needed) const {
  if (page_ids.size() < needed) {
    return Status::InvalidArgument("page_ids has " + std::to_string(page_ids.size()) +
                                   " entries, " + std::to_string(needed) + " needed");
  }
  std::vector<uint8_t> seen(num_pages_ < (1u << 26) ? num_pages_ : 0, 0);
  for (size_t i = 0; i < needed; ++i) {
    if (page_ids[i] >= num_pages_) {
      return Status::InvalidArgument("page_ids[" + std::to_string(i) +
                                     "] = " + std::to_string(page_ids[i]) +
                                     " is out of range [0, " + std::to_string(num_pages_) + ")");
    }
    if (!seen.empty()) {
      if (seen[page_ids[i]]) {
        return Status::InvalidArgument("page_ids[" + std::to_string(i) +
                                       "] = " + std::to_string(page_ids[i]) + " is repeated");
      }
      seen[page_ids[i]] = 1;
    }
  }
  return Status::OK();
}

void CpuTier::FinishOp() {
  MutexLock lock(&inflight_mu_);
  if (--in_flight_ == 0) inflight_cv_.NotifyAll();
}

StatusOr<TierOp> CpuTier::Store(const ChunkKey* keys, size_t n,
                                const std::vector<uint32_t>& page_ids, uintptr_t after_stream) {
  const uint32_t ppc = pages_per_chunk();
  KVTIER_RETURN_IF_ERROR(CheckPages(page_ids, n * ppc));
  WaitForWriteBacks();
  ++store_calls_;
  TierOp op;
  std::vector<ChunkKey> fresh;
  std::vector<ChunkKey> seen_again;  // cached already: this store counts as a sighting
  std::vector<uint32_t> pages;
  std::vector<void*> blobs;
  for (size_t i = 0; i < n; ++i) {
    StatusOr<BlockId> block = Reserve(keys[i]);
    if (!block.ok() && block.status().code() == StatusCode::kResourceExhausted && disk_) {
      block = WaitForBlock(keys[i], DiskDeadline());
    }
    if (!block.ok()) {
      if (block.status().code() == StatusCode::kAlreadyExists) {
        ++op.already_cached;
        seen_again.push_back(keys[i]);
        continue;
      }
      op.skipped_full = n - i;  // full of pinned / in-flight blocks: the rest would be unreachable
      break;
    }
    fresh.push_back(keys[i]);
    blobs.push_back(allocator_->BlockAddress(*block));
    pages.insert(pages.end(), page_ids.begin() + i * ppc, page_ids.begin() + (i + 1) * ppc);
  }
  chunks_already_cached_ += op.already_cached;
  chunks_skipped_full_ += op.skipped_full;
  op.chunks = fresh.size();
  PumpDemotions();  // the reservations above may have marked LRU chunks for write-back
  QueueWriteThrough(seen_again.data(), seen_again.size());  // may have reached admit_min_seen
  if (fresh.empty()) return op;

  StartOp();
  const uint64_t bytes = fresh.size() * blob_bytes();
  auto on_complete = [this, fresh, bytes](const Status& s) {
    for (const ChunkKey& k : fresh) {
      if (s.ok()) {
        (void)index_->CommitInsert(k);
      } else {
        (void)index_->AbortInsert(k);
      }
    }
    if (s.ok()) {
      chunks_stored_ += fresh.size();
      bytes_offloaded_ += bytes;
      QueueWriteThrough(fresh.data(), fresh.size());
    } else {
      chunks_failed_ += fresh.size();
    }
    FinishOp();
  };
  auto transfer = engine_->Gather(pages, blobs, after_stream, on_complete);
  if (!transfer.ok()) {
    // Nothing started and the callback will not run: undo the reservations ourselves.
    for (const ChunkKey& k : fresh) (void)index_->AbortInsert(k);
    chunks_failed_ += fresh.size();
    FinishOp();
    return transfer.status();
  }
  op.transfer = std::move(transfer).value();
  return op;
}

size_t CpuTier::Lookup(const ChunkKey* keys, size_t n) {
  WaitForWriteBacks();
  size_t hits = index_->Lookup(keys, n);
  if (!disk_) return hits;
  size_t on_disk = 0;
  for (; hits < n; ++hits) {
    if (index_->Contains(keys[hits])) continue;
    if (!disk_->Contains(keys[hits])) break;
    ++on_disk;
  }
  lookup_disk_chunks_ += on_disk;
  return hits;
}

StatusOr<TierOp> CpuTier::Load(const ChunkKey* keys, size_t n,
                               const std::vector<uint32_t>& page_ids, uintptr_t after_stream) {
  const uint32_t ppc = pages_per_chunk();
  // Validate every page the caller offered before touching the index, so bad input changes nothing.
  KVTIER_RETURN_IF_ERROR(CheckPages(page_ids, std::min(page_ids.size(), n * ppc)));
  WaitForWriteBacks();
  ++load_calls_;
  TierOp op;
  std::vector<BlockId> blocks;
  const size_t wanted = std::min(n, page_ids.size() / ppc);
  size_t hits = index_->Acquire(keys, wanted, &blocks);
  // Chunks found only on disk are promoted into the pool, then acquired like pool hits; the walk
  // goes on while the pool and the disk together hold the prefix.
  while (disk_ && hits < wanted) {
    size_t run = 0;
    while (hits + run < wanted && !index_->Contains(keys[hits + run]) &&
           (index_->IsWriting(keys[hits + run]) || disk_->Contains(keys[hits + run]))) {
      ++run;
    }
    if (run > 0) {
      PromoteFromDisk(keys + hits, run);
    } else if (!index_->Contains(keys[hits])) {
      break;  // in neither tier: the prefix ends here
    }
    // else a prefetch committed the chunk since the Acquire above: acquire it now.
    // Whatever is in the pool now (promoted here, or filled by a prefetch that was running).
    size_t got = index_->Acquire(keys + hits, wanted - hits, &blocks);
    if (got == 0) break;
    hits += got;
  }
  op.chunks = hits;
  if (hits == 0) return op;

  std::vector<ChunkKey> held(keys, keys + hits);
  std::vector<void*> blobs;
  blobs.reserve(hits);
  for (BlockId b : blocks) blobs.push_back(allocator_->BlockAddress(b));
  std::vector<uint32_t> pages(page_ids.begin(), page_ids.begin() + hits * ppc);
  StartOp();
  const uint64_t bytes = hits * blob_bytes();
  auto on_complete = [this, held, bytes](const Status& s) {
    (void)index_->Release(held.data(), held.size());
    if (s.ok()) {
      chunks_loaded_ += held.size();
      bytes_loaded_ += bytes;
      QueueWriteThrough(held.data(), held.size());  // a hit may have made a chunk admissible
    }
    FinishOp();
  };
  auto transfer = engine_->Scatter(blobs, pages, after_stream, on_complete);
  if (!transfer.ok()) {
    (void)index_->Release(held.data(), held.size());
    FinishOp();
    return transfer.status();
  }
  op.transfer = std::move(transfer).value();
  return op;
}

std::vector<uint8_t> CpuTier::LookupTiers(const ChunkKey* keys, size_t n) {
  WaitForWriteBacks();
  std::vector<uint8_t> tiers;
  for (size_t i = 0; i < n; ++i) {
    if (index_->Contains(keys[i])) {
      tiers.push_back(1);
    } else if (disk_ && disk_->Contains(keys[i])) {
      tiers.push_back(2);
    } else {
      break;
    }
  }
  return tiers;
}

std::vector<uint8_t> CpuTier::Media(const ChunkKey* keys, size_t n) {
  WaitForWriteBacks();
  std::vector<uint8_t> media(n, 0);
  for (size_t i = 0; i < n; ++i) {
    if (index_->Contains(keys[i])) media[i] |= 1;
    if (disk_ && disk_->Contains(keys[i])) media[i] |= 2;
  }
  return media;
}

std::vector<Event> CpuTier::TakeEvents(size_t max) {
  if (!events_) return {};
  return events_->Take(max);
}

StatusOr<void*> CpuTier::BeginPut(const ChunkKey& key) {
  WaitForWriteBacks();
  StatusOr<BlockId> block = Reserve(key);
  PumpDemotions();
  if (!block.ok()) return block.status();
  return allocator_->BlockAddress(*block);
}

Status CpuTier::CommitPut(const ChunkKey& key) {
  KVTIER_RETURN_IF_ERROR(index_->CommitInsert(key));
  ++chunks_stored_;
  QueueWriteThrough(&key, 1);
  return Status::OK();
}

Status CpuTier::AbortPut(const ChunkKey& key) { return index_->AbortInsert(key); }

std::vector<const void*> CpuTier::AcquireBlobs(const ChunkKey* keys, size_t n) {
  WaitForWriteBacks();
  std::vector<BlockId> blocks;
  index_->Acquire(keys, n, &blocks);
  std::vector<const void*> out;
  out.reserve(blocks.size());
  for (BlockId b : blocks) out.push_back(allocator_->BlockAddress(b));
  return out;
}

Status CpuTier::ReleaseBlobs(const ChunkKey* keys, size_t n) { return index_->Release(keys, n); }

StatusOr<BlockId> CpuTier::Reserve(const ChunkKey& key) {
  StatusOr<BlockId> block = index_->BeginInsert(key);
  if (block.ok()) blob_crc_[*block].store(0, std::memory_order_release);
  return block;
}

StatusOr<BlockId> CpuTier::BlockOf(const void* blob) const {
  const auto base = reinterpret_cast<uintptr_t>(arena_->base());
  const auto addr = reinterpret_cast<uintptr_t>(blob);
  const size_t block_bytes = allocator_->block_bytes();
  if (addr < base || (addr - base) % block_bytes != 0 ||
      (addr - base) / block_bytes >= allocator_->num_blocks()) {
    return Status::InvalidArgument("address is not the start of a block of this tier's pool");
  }
  return static_cast<BlockId>((addr - base) / block_bytes);
}

Status CpuTier::NoteBlobChecksum(const void* blob, uint32_t crc32c) {
  StatusOr<BlockId> block = BlockOf(blob);
  if (!block.ok()) return block.status();
  blob_crc_[*block].store(kChecksumKnown | crc32c, std::memory_order_release);
  return Status::OK();
}

StatusOr<uint32_t> CpuTier::BlobChecksum(const void* blob) {
  StatusOr<BlockId> block = BlockOf(blob);
  if (!block.ok()) return block.status();
  return BlockChecksum(*block);
}

StatusOr<std::optional<uint32_t>> CpuTier::KeptBlobChecksum(const void* blob) {
  StatusOr<BlockId> block = BlockOf(blob);
  if (!block.ok()) return block.status();
  uint32_t crc;
  if (!KnownChecksum(*block, &crc)) return std::optional<uint32_t>();
  return std::optional<uint32_t>(crc);
}

uint32_t CpuTier::BlockChecksum(BlockId block) {
  uint32_t crc;
  if (KnownChecksum(block, &crc)) return crc;
  crc = Crc32c(0, allocator_->BlockAddress(block), blob_bytes());
  ++blob_checksums_computed_;
  blob_crc_[block].store(kChecksumKnown | crc, std::memory_order_release);
  return crc;
}

bool CpuTier::KnownChecksum(BlockId block, uint32_t* crc) const {
  const uint64_t known = blob_crc_[block].load(std::memory_order_acquire);
  if (!(known & kChecksumKnown)) return false;
  *crc = static_cast<uint32_t>(known);
  return true;
}

Status CpuTier::Drain(int64_t timeout_ms) {
  MutexLock lock(&inflight_mu_);
  bool done =
      inflight_cv_.WaitFor(lock, std::chrono::milliseconds(timeout_ms),
                           [this]() REQUIRES_LOCK(inflight_mu_) { return in_flight_ == 0; });
  if (!done)
    return Status::DeadlineExceeded(std::to_string(in_flight_) + " copies still in flight");
  return Status::OK();
}

CpuTierStats CpuTier::stats() const {
  CpuTierStats s;
  s.index = index_->stats();
  s.blocks = allocator_->stats();
  s.store_calls = store_calls_;
  s.chunks_stored = chunks_stored_;
  s.chunks_already_cached = chunks_already_cached_;
  s.chunks_skipped_full = chunks_skipped_full_;
  s.chunks_failed = chunks_failed_;
  s.load_calls = load_calls_;
  s.chunks_loaded = chunks_loaded_;
  s.bytes_offloaded = bytes_offloaded_;
  s.bytes_loaded = bytes_loaded_;
  {
    MutexLock lock(&inflight_mu_);
    s.in_flight = in_flight_;
  }
  if (disk_) {
    s.has_disk = true;
    s.disk = disk_->stats();
  }
  s.lookup_disk_chunks = lookup_disk_chunks_;
  s.chunks_promoted = chunks_promoted_;
  s.promotion_failures = promotion_failures_;
  s.demotions_written = demotions_written_;
  s.demotions_failed = demotions_failed_;
  s.demotions_rejected = demotions_rejected_;
  s.chunks_prefetched = chunks_prefetched_;
  s.persist_runs = persist_runs_;
  s.persist_written = persist_written_;
  s.persist_failed = persist_failed_;
  s.persist_deadline_exceeded = persist_deadline_exceeded_;
  s.blob_checksums_computed = blob_checksums_computed_;
  s.write_through_written = wt_written_;
  s.write_through_failed = wt_failed_;
  s.write_through_in_flight = wt_in_flight_.load();
  {
    MutexLock lock(&wt_mu_);
    s.write_through_queued = wt_queue_.size();
  }
  if (events_) {
    s.event_capacity = events_->capacity();
    s.events_recorded = events_->recorded();
    s.events_dropped = events_->dropped();
    s.events_pending = events_->pending();
  }
  return s;
}

}  // namespace kvtier
