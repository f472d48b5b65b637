// CpuTier's write-back timing: the asynchronous default against deterministic_writeback, with
// the disk's write-backs slowed down by its fault injector; Persist, by call and by timer; and the
// KV events the tiers record (one per change of what a medium holds); the blob checksums it keeps.
// Runs on both I/O backends; io_uring skips loudly where the kernel refuses it.
#include "engine/cpu_tier.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "storage/crc32c.h"
#include "storage/disk_test_util.h"
#include "storage/slot_format.h"
#include "storage/uring_backend.h"

namespace kvtier {
namespace {

constexpr uint64_t kPageBytes = 4096;  // one page a chunk: 4 KiB blobs, 4 KiB blocks
constexpr uint64_t kPages = 64;
constexpr int64_t kTimeoutMs = 30000;

ChunkKey Key(uint64_t i) { return ChunkKey{0x9e3779b97f4a7c15ull * (i + 1), i ^ 0x5eedull}; }

std::vector<ChunkKey> Keys(uint64_t first, uint64_t n) {
  std::vector<ChunkKey> out;
  for (uint64_t i = first; i < first + n; ++i) out.push_back(Key(i));
  return out;
}

class CpuTierWriteBackTest : public ::testing::TestWithParam<IoBackendKind> {
 protected:
  void SetUp() override {
    if (GetParam() == IoBackendKind::kIoUring) {
      const std::string why = test::UringUnavailable();
      if (!why.empty()) GTEST_SKIP() << "SKIPPED (io_uring unavailable here): " << why;
    }
  }

  // A pool of 4 blocks over a disk of `disk_slots` slots; chunks seen twice are written back.
  // The n-th write to reach the disk is held for write_delay(n) before it ends.
  std::unique_ptr<CpuTier> MakeTier(bool deterministic, size_t disk_slots,
                                    std::function<std::chrono::milliseconds(uint64_t)> write_delay,
                                    std::function<void(CpuTierOptions&)> tweak = nullptr) {
    LayoutDesc layout;
    layout.device = -1;
    layout.pages_per_chunk = 1;
    layout.segments.push_back(
        {reinterpret_cast<uint64_t>(kv_.data()), kPageBytes, kPageBytes, kPages});
    CpuTierOptions o;
    o.capacity_bytes = 4 * kPageBytes;
    o.copy.method = TransferMethod::kCpu;
    o.disk.enabled = true;
    o.disk.admit_min_seen = 2;
    o.disk.deterministic_writeback = deterministic;
    o.disk.store.dir = dir_.path();
    o.disk.store.capacity_bytes = kDiskBlockBytes + disk_slots * SlotBytesFor(kPageBytes);
    o.disk.store.backend = GetParam();
    o.disk.store.io_timeout_ms = 5000;
    o.disk.store.fault_injector = [this, write_delay](IoOp op, uint64_t, size_t, int res) {
      if (op == IoOp::kWrite && res > 0)
        std::this_thread::sleep_for(write_delay(writes_.fetch_add(1)));
      return res;
    };
    if (tweak) tweak(o);
    auto tier = CpuTier::Create(layout, o);
    EXPECT_TRUE(tier.ok()) << tier.status().ToString();
    return tier.ok() ? std::move(tier).value() : nullptr;
  }

  // Stores keys (chunk i from page i) and waits for the copy.
  static void StoreAndWait(CpuTier& tier, const std::vector<ChunkKey>& keys) {
    std::vector<uint32_t> pages;
    for (size_t i = 0; i < keys.size(); ++i) pages.push_back(static_cast<uint32_t>(i));
    auto op = tier.Store(keys.data(), keys.size(), pages, 0);
    ASSERT_TRUE(op.ok()) << op.status().ToString();
    if (op->transfer) ASSERT_TRUE(op->transfer->Wait(kTimeoutMs).ok());
  }

  // Fills the pool with a (stored twice: admitted to disk) and x (once), then stores b, whose
  // blocks come from x: a's chunks are evicted on the way and their write-backs start when the
  // store returns.
  static void EvictAdmitted(CpuTier& tier, const std::vector<ChunkKey>& a,
                            const std::vector<ChunkKey>& x, const std::vector<ChunkKey>& b) {
    StoreAndWait(tier, a);
    StoreAndWait(tier, a);
    StoreAndWait(tier, x);
    StoreAndWait(tier, b);
  }

  std::vector<uint8_t> kv_ = std::vector<uint8_t>(kPages * kPageBytes, 7);
  test::TempDir dir_{"kvtier_cpu_tier_test"};
  std::atomic<uint64_t> writes_{0};
};

TEST_P(CpuTierWriteBackTest, AsynchronousWriteBacksMayStillRunAtTheNextCall) {
  if (GetParam() == IoBackendKind::kIoUring) {
    // Its completion thread runs the fault injector under the backend's lock, so a held write
    // holds up the next submission too: the store itself would wait.
    GTEST_SKIP() << "SKIPPED (io_uring: the injector cannot slow a write-back without the caller)";
  }
  auto tier = MakeTier(false, 16, [](uint64_t) { return std::chrono::milliseconds(100); });
  ASSERT_NE(tier, nullptr);
  EvictAdmitted(*tier, Keys(0, 2), Keys(5, 2), Keys(10, 2));
  EXPECT_EQ(tier->Lookup(Keys(10, 2).data(), 2), 2u);
  EXPECT_LT(tier->stats().demotions_written, 2u);  // each write-back takes 100 ms
  ASSERT_TRUE(tier->Drain(kTimeoutMs).ok());
  EXPECT_EQ(tier->stats().demotions_written, 2u);
}

TEST_P(CpuTierWriteBackTest, DeterministicModeEndsWriteBacksBeforeTheNextCall) {
  auto tier = MakeTier(true, 16, [](uint64_t) { return std::chrono::milliseconds(50); });
  ASSERT_NE(tier, nullptr);
  const auto t0 = std::chrono::steady_clock::now();
  EvictAdmitted(*tier, Keys(0, 2), Keys(5, 2), Keys(10, 2));
  EXPECT_EQ(tier->Lookup(Keys(10, 2).data(), 2), 2u);
  CpuTierStats s = tier->stats();  // no Drain: the Lookup waited for the write-backs
  EXPECT_EQ(s.demotions_written, 2u);
  EXPECT_EQ(s.index.demoting, 0u);
  EXPECT_EQ(s.disk.slots_used, 2u);
  // One at a time (queue depth 1, one POSIX worker): two writes of 50 ms each.
  EXPECT_GE(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(100));
  EXPECT_EQ(tier->LookupTiers(Keys(0, 2).data(), 2), std::vector<uint8_t>(2, 2));  // on disk only
}

TEST_P(CpuTierWriteBackTest, DeterministicWriteBacksEndInTheOrderTheyWereStaged) {
  // The first write-back is held longest: ended concurrently, it would become the disk's most
  // recent chunk and the last to be evicted. In deterministic mode it is the least recent.
  auto tier = MakeTier(
      true, 4, [](uint64_t n) { return std::chrono::milliseconds(n < 4 ? 30 * (4 - n) : 0); });
  ASSERT_NE(tier, nullptr);
  const std::vector<ChunkKey> a = Keys(0, 4), b = Keys(10, 4);
  StoreAndWait(*tier, a);
  StoreAndWait(*tier, a);
  StoreAndWait(*tier, b);  // evicts a[0..3], written back in that order: the disk's 4 slots fill
  StoreAndWait(*tier, {b[0]});       // b[0] seen twice
  StoreAndWait(*tier, Keys(20, 1));  // evicts b[0] (written back: the disk evicts its LRU chunk)
  EXPECT_EQ(tier->LookupTiers(&b[0], 1), std::vector<uint8_t>{2});
  EXPECT_TRUE(tier->LookupTiers(&a[0], 1).empty());  // a[0], the first written, went first
  for (int i = 1; i < 4; ++i) EXPECT_EQ(tier->LookupTiers(&a[i], 1), std::vector<uint8_t>{2}) << i;
}

// Write-through, with write-back alone beside it: the same stores, once with each.
TEST_P(CpuTierWriteBackTest, WriteThroughWritesOnArrivalSoEvictionsFreeBlocksAtOnce) {
  for (bool write_through : {true, false}) {
    SCOPED_TRACE(write_through ? "write_through" : "write-back");
    test::TempDir dir("kvtier_cpu_tier_wt");
    auto tier = MakeTier(
        false, 16, [](uint64_t) { return std::chrono::milliseconds(0); },
        [&](CpuTierOptions& o) {
          o.disk.store.dir = dir.path();
          o.disk.admit_min_seen = 1;
          o.disk.write_through = write_through;
        });
    ASSERT_NE(tier, nullptr);
    StoreAndWait(*tier, Keys(0, 4));  // the pool's 4 blocks
    ASSERT_TRUE(tier->Drain(kTimeoutMs).ok());
    EXPECT_EQ(tier->stats().write_through_written, write_through ? 4u : 0u);
    EXPECT_EQ(tier->stats().disk.writes, write_through ? 4u : 0u);
    // Into the full pool: two chunks evicted. Written already, they leave no write-back behind.
    StoreAndWait(*tier, Keys(10, 2));
    if (write_through) EXPECT_EQ(tier->stats().index.demoting, 0u) << "an eviction is writing";
    ASSERT_TRUE(tier->Drain(kTimeoutMs).ok());
    CpuTierStats s = tier->stats();
    // Write-through: each chunk written once, on arrival (4 + 2), and two evicted. Write-back:
    // an eviction whose block frees only when its write ends goes on to the next victim, so all
    // four went out, each written back.
    EXPECT_EQ(s.disk.writes, write_through ? 6u : 4u);
    EXPECT_EQ(s.write_through_written, write_through ? 6u : 0u);
    EXPECT_EQ(s.write_through_failed, 0u);
    // Either way the evicted chunks are on disk and the rest in the pool.
    std::vector<uint8_t> tiers = tier->LookupTiers(Keys(0, 4).data(), 4);
    EXPECT_EQ(std::count(tiers.begin(), tiers.end(), 2), write_through ? 2 : 4);
    EXPECT_EQ(tiers.size(), 4u);
  }
}

// Write-through makes the one pass over each blob: the disk write takes it, the tier keeps it,
// and a lease's later BlobChecksum reads nothing.
TEST_P(CpuTierWriteBackTest, WriteThroughChecksumsEachBlobOnceAndKeepsIt) {
  auto tier = MakeTier(
      false, 16, [](uint64_t) { return std::chrono::milliseconds(0); },
      [](CpuTierOptions& o) {
        o.disk.admit_min_seen = 1;
        o.disk.write_through = true;
      });
  ASSERT_NE(tier, nullptr);
  const std::vector<ChunkKey> keys = Keys(0, 2);
  StoreAndWait(*tier, keys);
  ASSERT_TRUE(tier->Drain(kTimeoutMs).ok());
  EXPECT_EQ(tier->stats().write_through_written, 2u);
  EXPECT_EQ(tier->stats().blob_checksums_computed, 2u);
  std::vector<const void*> held = tier->AcquireBlobs(keys.data(), 2);
  ASSERT_EQ(held.size(), 2u);
  for (const void* blob : held) {
    auto crc = tier->BlobChecksum(blob);
    ASSERT_TRUE(crc.ok());
    EXPECT_EQ(*crc, Crc32c(0, blob, kPageBytes));
  }
  EXPECT_EQ(tier->stats().blob_checksums_computed, 2u);  // kept: no second pass
  ASSERT_TRUE(tier->ReleaseBlobs(keys.data(), 2).ok());
}

TEST_P(CpuTierWriteBackTest, WriteThroughIsOffInDeterministicMode) {
  auto tier = MakeTier(
      true, 16, [](uint64_t) { return std::chrono::milliseconds(0); },
      [](CpuTierOptions& o) {
        o.disk.admit_min_seen = 1;
        o.disk.write_through = true;
      });
  ASSERT_NE(tier, nullptr);
  StoreAndWait(*tier, Keys(0, 2));  // admitted, nothing evicted
  ASSERT_TRUE(tier->Drain(kTimeoutMs).ok());
  CpuTierStats s = tier->stats();
  EXPECT_EQ(s.write_through_written, 0u);
  EXPECT_EQ(s.disk.writes, 0u);
  EXPECT_EQ(tier->LookupTiers(Keys(0, 2).data(), 2), std::vector<uint8_t>(2, 1));  // pool only
}

// Persist: a pool of 16 blocks, nothing evicted, chunks stored once (below admit_min_seen).
TEST_P(CpuTierWriteBackTest, PersistWritesWhatTheDiskLacksAndARestartFindsIt) {
  const auto no_delay = [](uint64_t) { return std::chrono::milliseconds(0); };
  const auto big_pool = [](CpuTierOptions& o) { o.capacity_bytes = 16 * kPageBytes; };
  const std::vector<ChunkKey> a = Keys(0, 6);
  {
    auto tier = MakeTier(false, 32, no_delay, big_pool);
    ASSERT_NE(tier, nullptr);
    StoreAndWait(*tier, a);
    EXPECT_EQ(tier->stats().demotions_written, 0u);  // write-back alone saves nothing here
    auto first = tier->Persist(kTimeoutMs);
    ASSERT_TRUE(first.ok()) << first.status().ToString();
    EXPECT_EQ(first->written, 6u);
    EXPECT_EQ(first->skipped, 0u);
    EXPECT_FALSE(first->deadline_exceeded);
    auto again = tier->Persist(kTimeoutMs);  // nothing new: nothing written twice
    ASSERT_TRUE(again.ok());
    EXPECT_EQ(again->written, 0u);
    EXPECT_EQ(again->skipped, 6u);
    CpuTierStats s = tier->stats();
    EXPECT_EQ(s.persist_runs, 2u);
    EXPECT_EQ(s.persist_written, 6u);
    EXPECT_EQ(s.index.pinned, 0u);  // every pin Persist took was released
    EXPECT_EQ(s.index.ready, 6u);   // still in the pool
  }
  auto tier = MakeTier(false, 32, no_delay, big_pool);  // a restart on the same directory
  ASSERT_NE(tier, nullptr);
  EXPECT_EQ(tier->stats().disk.recovered_slots, 6u);
  EXPECT_EQ(tier->LookupTiers(a.data(), a.size()), std::vector<uint8_t>(6, 2));
  std::vector<uint32_t> pages = {40, 41, 42, 43, 44, 45};
  auto op = tier->Load(a.data(), a.size(), pages, 0);
  ASSERT_TRUE(op.ok());
  EXPECT_EQ(op->chunks, 6u);
  if (op->transfer) ASSERT_TRUE(op->transfer->Wait(kTimeoutMs).ok());
  EXPECT_EQ(tier->stats().chunks_promoted, 6u);
}

TEST_P(CpuTierWriteBackTest, PersistTimerWritesWithoutACallAndStopsAtClose) {
  auto tier = MakeTier(
      false, 32, [](uint64_t) { return std::chrono::milliseconds(0); },
      [](CpuTierOptions& o) {
        o.capacity_bytes = 16 * kPageBytes;
        o.disk.persist_interval_ms = 20;
      });
  ASSERT_NE(tier, nullptr);
  const std::vector<ChunkKey> a = Keys(0, 3);
  StoreAndWait(*tier, a);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(kTimeoutMs);
  while (tier->stats().disk.slots_used < 3 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_EQ(tier->stats().disk.slots_used, 3u);
  EXPECT_GE(tier->stats().persist_written, 3u);
  tier.reset();  // joins the timer thread
}

TEST_P(CpuTierWriteBackTest, PersistTimerIsOffInDeterministicMode) {
  auto tier = MakeTier(
      true, 32, [](uint64_t) { return std::chrono::milliseconds(0); },
      [](CpuTierOptions& o) {
        o.capacity_bytes = 16 * kPageBytes;
        o.disk.persist_interval_ms = 1;
      });
  ASSERT_NE(tier, nullptr);
  StoreAndWait(*tier, Keys(0, 3));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(tier->stats().persist_runs, 0u);
  EXPECT_EQ(tier->stats().disk.slots_used, 0u);
  auto r = tier->Persist(kTimeoutMs);  // a call still persists
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->written, 3u);
}

TEST_P(CpuTierWriteBackTest, PersistStopsAtItsDeadlineAndCountsWhatIsLeft) {
  if (GetParam() == IoBackendKind::kIoUring) {
    GTEST_SKIP() << "SKIPPED (io_uring: the injector cannot slow a write without the caller)";
  }
  auto tier = MakeTier(
      false, 32, [](uint64_t) { return std::chrono::milliseconds(300); },
      [](CpuTierOptions& o) {
        o.capacity_bytes = 16 * kPageBytes;
        o.disk.max_demotions_in_flight = 1;  // batches of one
      });
  ASSERT_NE(tier, nullptr);
  const std::vector<ChunkKey> a = Keys(0, 4);
  StoreAndWait(*tier, a);
  auto r = tier->Persist(50);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->deadline_exceeded);
  EXPECT_EQ(r->written + r->failed + r->still_running + r->not_started, 4u);
  EXPECT_EQ(r->still_running, 1u);
  EXPECT_EQ(r->not_started, 3u);
  ASSERT_TRUE(tier->Drain(kTimeoutMs).ok());  // the write in flight ends and drops its pin
  CpuTierStats s = tier->stats();
  EXPECT_EQ(s.index.pinned, 0u);
  EXPECT_EQ(s.persist_written, 1u);
  EXPECT_EQ(s.persist_deadline_exceeded, 1u);
  EXPECT_EQ(tier->Lookup(a.data(), a.size()), 4u);  // the pool kept everything
}

// ---- KV events -------------------------------------------------------------------------------

const auto kNoDelay = [](uint64_t) { return std::chrono::milliseconds(0); };

void WithEvents(CpuTierOptions& o) { o.event_capacity = 1 << 16; }

// Replays events into key -> media bits (1 pool, 2 disk), as a consumer of the events would.
void Replay(const std::vector<Event>& events, std::map<uint64_t, uint8_t>* media,
            const std::vector<ChunkKey>& universe) {
  for (const Event& e : events) {
    const uint8_t bit = e.medium == EventMedium::kCpu ? 1 : 2;
    if (e.kind == EventKind::kCleared) {
      for (auto& [i, m] : *media) m &= static_cast<uint8_t>(~bit);
      continue;
    }
    uint64_t i = 0;
    while (i < universe.size() && universe[i] != e.key) ++i;
    ASSERT_LT(i, universe.size()) << "an event for a key never used";
    uint8_t& m = (*media)[i];
    if (e.kind == EventKind::kStored) {
      EXPECT_FALSE(m & bit) << "stored twice without a removal: key " << i << " medium " << +bit;
      m |= bit;
    } else {
      EXPECT_TRUE(m & bit) << "removed while not held: key " << i << " medium " << +bit;
      m &= static_cast<uint8_t>(~bit);
    }
  }
}

TEST_P(CpuTierWriteBackTest, EventsReplayToWhatEachMediumHolds) {
  // A pool of 4 blocks over a disk of 6 slots, 16 keys: evictions, write-backs, disk evictions,
  // promotions and prefetches all happen. After each step the events replayed give Media().
  auto tier = MakeTier(false, 6, kNoDelay, WithEvents);
  ASSERT_NE(tier, nullptr);
  const std::vector<ChunkKey> universe = Keys(0, 16);
  std::map<uint64_t, uint8_t> media;
  std::mt19937 rng(20);
  for (int step = 0; step < 200; ++step) {
    const uint64_t first = rng() % 14, n = 1 + rng() % 3;
    const std::vector<ChunkKey> keys(universe.begin() + first, universe.begin() + first + n);
    switch (rng() % 3) {
      case 0:
        StoreAndWait(*tier, keys);
        break;
      case 1: {
        std::vector<uint32_t> pages = {40, 41, 42};
        auto op = tier->Load(keys.data(), keys.size(), pages, 0);
        ASSERT_TRUE(op.ok()) << op.status().ToString();
        if (op->transfer) ASSERT_TRUE(op->transfer->Wait(kTimeoutMs).ok());
        break;
      }
      default:
        (void)tier->Prefetch(keys.data(), keys.size());
    }
    ASSERT_TRUE(tier->Drain(kTimeoutMs).ok());
    Replay(tier->TakeEvents(0), &media, universe);
    const std::vector<uint8_t> held = tier->Media(universe.data(), universe.size());
    for (uint64_t i = 0; i < universe.size(); ++i)
      ASSERT_EQ(media[i], held[i]) << "key " << i << " after step " << step;
  }
  const CpuTierStats s = tier->stats();
  EXPECT_GT(s.demotions_written, 0u);
  EXPECT_GT(s.disk.evictions, 0u);
  EXPECT_GT(s.chunks_promoted + s.chunks_prefetched, 0u);
  EXPECT_EQ(s.events_dropped, 0u);
  EXPECT_EQ(s.events_pending, 0u);
}

TEST_P(CpuTierWriteBackTest, EventsFromConcurrentCallsReplayToWhatEachMediumHolds) {
  // Three threads store, load and prefetch overlapping keys at once: each event is recorded under
  // the lock that makes its change, so the log's order per key is the order of its changes.
  auto tier = MakeTier(false, 6, kNoDelay, WithEvents);
  ASSERT_NE(tier, nullptr);
  const std::vector<ChunkKey> universe = Keys(0, 12);
  std::vector<std::thread> threads;
  for (uint32_t t = 0; t < 3; ++t) {
    threads.emplace_back([&tier, &universe, t] {
      std::mt19937 rng(7 + t);
      for (int step = 0; step < 150; ++step) {
        const uint64_t first = rng() % 10, n = 1 + rng() % 2;
        const ChunkKey* keys = universe.data() + first;
        switch (rng() % 3) {
          case 0: {
            auto op = tier->Store(keys, n, {static_cast<uint32_t>(first), 11}, 0);
            if (op.ok() && op->transfer) (void)op->transfer->Wait(kTimeoutMs);
            break;
          }
          case 1: {
            auto op = tier->Load(keys, n, {40 + 2 * t, 41 + 2 * t}, 0);  // pages of its own
            if (op.ok() && op->transfer) (void)op->transfer->Wait(kTimeoutMs);
            break;
          }
          default:
            (void)tier->Prefetch(keys, n);
        }
      }
    });
  }
  for (std::thread& th : threads) th.join();
  ASSERT_TRUE(tier->Drain(kTimeoutMs).ok());
  std::map<uint64_t, uint8_t> media;
  Replay(tier->TakeEvents(0), &media, universe);
  const std::vector<uint8_t> held = tier->Media(universe.data(), universe.size());
  for (uint64_t i = 0; i < universe.size(); ++i) EXPECT_EQ(media[i], held[i]) << "key " << i;
  EXPECT_EQ(tier->stats().events_dropped, 0u);
}

TEST_P(CpuTierWriteBackTest, EventsNameEachStoreAndEvictionOnce) {
  auto tier = MakeTier(false, 6, kNoDelay, [](CpuTierOptions& o) {
    o.event_capacity = 64;
    o.disk.admit_min_seen = 100;  // nothing is written back: an eviction just removes
  });
  ASSERT_NE(tier, nullptr);
  std::vector<Event> start = tier->TakeEvents(0);
  ASSERT_EQ(start.size(), 2u);  // a fresh instance: both media empty
  EXPECT_EQ(start[0].kind, EventKind::kCleared);
  EXPECT_EQ(start[0].medium, EventMedium::kCpu);
  EXPECT_EQ(start[1].kind, EventKind::kCleared);
  EXPECT_EQ(start[1].medium, EventMedium::kDisk);
  const std::vector<ChunkKey> a = Keys(0, 4);
  StoreAndWait(*tier, a);
  StoreAndWait(*tier, a);  // already cached: no event
  std::vector<Event> stored = tier->TakeEvents(0);
  ASSERT_EQ(stored.size(), 4u);
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(stored[i].kind, EventKind::kStored);
    EXPECT_EQ(stored[i].medium, EventMedium::kCpu);
    EXPECT_EQ(stored[i].key, a[i]);
  }
  StoreAndWait(*tier, Keys(10, 1));  // evicts the least recent, a[3] (acquired tail first)
  std::vector<Event> churn = tier->TakeEvents(0);
  ASSERT_EQ(churn.size(), 2u);
  EXPECT_EQ(churn[0].kind, EventKind::kRemoved);
  EXPECT_EQ(churn[1].kind, EventKind::kStored);
  EXPECT_EQ(churn[1].key, Key(10));
  EXPECT_EQ(tier->Media(&churn[0].key, 1), std::vector<uint8_t>{0});
}

TEST_P(CpuTierWriteBackTest, EventsAfterARestartClearThenNameWhatTheDiskRecovered) {
  const auto big_pool = [](CpuTierOptions& o) {
    o.capacity_bytes = 16 * kPageBytes;
    o.event_capacity = 64;
  };
  const std::vector<ChunkKey> a = Keys(0, 5);
  {
    auto tier = MakeTier(false, 32, kNoDelay, big_pool);
    ASSERT_NE(tier, nullptr);
    StoreAndWait(*tier, a);
    ASSERT_TRUE(tier->Persist(kTimeoutMs).ok());
    std::vector<Event> events = tier->TakeEvents(0);
    size_t on_disk = 0;
    for (const Event& e : events)
      on_disk += e.kind == EventKind::kStored && e.medium == EventMedium::kDisk;
    EXPECT_EQ(on_disk, 5u);  // each persist write, once it completed
  }
  auto tier = MakeTier(false, 32, kNoDelay, big_pool);
  ASSERT_NE(tier, nullptr);
  std::vector<Event> events = tier->TakeEvents(0);
  ASSERT_EQ(events.size(), 7u);
  EXPECT_EQ(events[0].kind, EventKind::kCleared);
  EXPECT_EQ(events[1].kind, EventKind::kCleared);
  std::map<uint64_t, uint8_t> media;
  Replay(events, &media, a);
  for (uint64_t i = 0; i < a.size(); ++i) EXPECT_EQ(media[i], 2) << i;
}

TEST_P(CpuTierWriteBackTest, EventsRemoveADiskSlotThatFailsItsCheck) {
  const auto tweak = [](CpuTierOptions& o) {
    o.capacity_bytes = 16 * kPageBytes;
    o.event_capacity = 64;
    o.disk.store.verify_at_open = VerifyAtOpen::kHeaders;  // payloads checked on first read
  };
  const std::vector<ChunkKey> a = Keys(0, 3);
  {
    auto tier = MakeTier(false, 8, kNoDelay, tweak);
    ASSERT_NE(tier, nullptr);
    StoreAndWait(*tier, a);
    ASSERT_TRUE(tier->Persist(kTimeoutMs).ok());
  }
  // Damage every payload behind the store's back.
  const std::string file = dir_.path() + "/" + kDiskCacheFileName;
  int fd = open(file.c_str(), O_WRONLY);
  ASSERT_GE(fd, 0);
  for (uint64_t slot = 0; slot < 8; ++slot) {
    const unsigned char junk = 0x5A;
    ASSERT_EQ(pwrite(fd, &junk, 1,
                     static_cast<off_t>(SlotOffset(slot, SlotBytesFor(kPageBytes)) +
                                        kDiskBlockBytes + 10)),
              1);
  }
  close(fd);
  auto tier = MakeTier(false, 8, kNoDelay, tweak);
  ASSERT_NE(tier, nullptr);
  EXPECT_EQ(tier->TakeEvents(0).size(), 5u);  // two cleared, three recovered (headers intact)
  std::vector<uint32_t> pages = {40};
  auto op = tier->Load(&a[0], 1, pages, 0);
  ASSERT_TRUE(op.ok());
  EXPECT_EQ(op->chunks, 0u);  // a miss, never wrong bytes
  ASSERT_TRUE(tier->Drain(kTimeoutMs).ok());
  std::vector<Event> events = tier->TakeEvents(0);
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, EventKind::kRemoved);
  EXPECT_EQ(events[0].medium, EventMedium::kDisk);
  EXPECT_EQ(events[0].key, a[0]);
}

TEST(CpuTierEventsTest, EventsAreOffAtCapacityZero) {
  std::vector<uint8_t> kv(kPages * kPageBytes, 1);
  LayoutDesc layout;
  layout.device = -1;
  layout.pages_per_chunk = 1;
  layout.segments.push_back(
      {reinterpret_cast<uint64_t>(kv.data()), kPageBytes, kPageBytes, kPages});
  CpuTierOptions o;
  o.capacity_bytes = 2 * kPageBytes;
  o.copy.method = TransferMethod::kCpu;
  auto tier = CpuTier::Create(layout, o);
  ASSERT_TRUE(tier.ok());
  const std::vector<ChunkKey> keys = Keys(0, 4);
  auto op = (*tier)->Store(keys.data(), keys.size(), {0, 1, 2, 3}, 0);
  ASSERT_TRUE(op.ok());
  if (op->transfer) ASSERT_TRUE(op->transfer->Wait(kTimeoutMs).ok());
  EXPECT_TRUE((*tier)->TakeEvents(0).empty());
  const CpuTierStats s = (*tier)->stats();
  EXPECT_EQ(s.event_capacity, 0u);
  EXPECT_EQ(s.events_recorded, 0u);
}

TEST(CpuTierPersistTest, PersistWithoutADiskTierIsAFailedPrecondition) {
  std::vector<uint8_t> kv(kPages * kPageBytes, 1);
  LayoutDesc layout;
  layout.device = -1;
  layout.pages_per_chunk = 1;
  layout.segments.push_back(
      {reinterpret_cast<uint64_t>(kv.data()), kPageBytes, kPageBytes, kPages});
  CpuTierOptions o;
  o.capacity_bytes = 4 * kPageBytes;
  o.copy.method = TransferMethod::kCpu;
  auto tier = CpuTier::Create(layout, o);
  ASSERT_TRUE(tier.ok());
  EXPECT_EQ((*tier)->Persist(1000).status().code(), StatusCode::kFailedPrecondition);
}

// A pool of two 4 KiB blocks over kv (one page a chunk), no disk.
std::unique_ptr<CpuTier> TwoBlockTier(std::vector<uint8_t>& kv) {
  LayoutDesc layout;
  layout.device = -1;
  layout.pages_per_chunk = 1;
  layout.segments.push_back(
      {reinterpret_cast<uint64_t>(kv.data()), kPageBytes, kPageBytes, kPages});
  CpuTierOptions o;
  o.capacity_bytes = 2 * kPageBytes;
  o.copy.method = TransferMethod::kCpu;
  auto tier = CpuTier::Create(layout, o);
  EXPECT_TRUE(tier.ok()) << tier.status().ToString();
  return tier.ok() ? std::move(tier).value() : nullptr;
}

TEST(CpuTierBlobChecksumTest, ANotedChecksumIsReturnedWithoutReadingTheBlob) {
  std::vector<uint8_t> kv(kPages * kPageBytes, 1);
  auto tier = TwoBlockTier(kv);
  ASSERT_NE(tier, nullptr);
  auto p = tier->BeginPut(Key(0));
  ASSERT_TRUE(p.ok());
  std::memset(*p, 0x5a, kPageBytes);
  const uint32_t real = Crc32c(0, *p, kPageBytes);
  ASSERT_TRUE(tier->NoteBlobChecksum(*p, real ^ 1).ok());  // not the bytes': the tier trusts it
  ASSERT_TRUE(tier->CommitPut(Key(0)).ok());
  const ChunkKey k = Key(0);
  std::vector<const void*> held = tier->AcquireBlobs(&k, 1);
  ASSERT_EQ(held.size(), 1u);
  auto crc = tier->BlobChecksum(held[0]);
  ASSERT_TRUE(crc.ok());
  EXPECT_EQ(*crc, real ^ 1);
  ASSERT_TRUE(tier->ReleaseBlobs(&k, 1).ok());
}

TEST(CpuTierBlobChecksumTest, AStoredBlobIsChecksummedOnceThenForgottenWhenItsBlockIsReused) {
  std::vector<uint8_t> kv(kPages * kPageBytes, 0);
  for (size_t i = 0; i < kv.size(); ++i) kv[i] = static_cast<uint8_t>(i / kPageBytes + 3);
  auto tier = TwoBlockTier(kv);
  ASSERT_NE(tier, nullptr);
  auto stored = [&](uint64_t key, uint32_t page) {
    const ChunkKey k = Key(key);
    auto op = tier->Store(&k, 1, {page}, 0);
    ASSERT_TRUE(op.ok());
    if (op->transfer) ASSERT_TRUE(op->transfer->Wait(kTimeoutMs).ok());
  };
  auto checksum = [&](uint64_t key) -> std::pair<const void*, uint32_t> {
    const ChunkKey k = Key(key);
    std::vector<const void*> held = tier->AcquireBlobs(&k, 1);
    EXPECT_EQ(held.size(), 1u);
    if (held.empty()) return {nullptr, 0};
    auto crc = tier->BlobChecksum(held[0]);
    EXPECT_TRUE(crc.ok());
    EXPECT_TRUE(tier->ReleaseBlobs(&k, 1).ok());
    return {held[0], crc.ok() ? *crc : 0};
  };
  stored(0, 0);
  auto [block0, crc0] = checksum(0);
  EXPECT_EQ(crc0, Crc32c(0, kv.data(), kPageBytes));
  stored(1, 1);
  stored(2, 2);  // evicts key 0 (least recent): its block now holds page 2
  stored(3, 3);  // and key 1's
  for (uint64_t key : {2, 3}) {
    auto [block, crc] = checksum(key);
    EXPECT_EQ(crc, Crc32c(0, kv.data() + (key)*kPageBytes, kPageBytes)) << "key " << key;
    if (block == block0) EXPECT_NE(crc, crc0);
  }
}

TEST(CpuTierBlobChecksumTest, AnAddressThatIsNotABlockIsRefused) {
  std::vector<uint8_t> kv(kPages * kPageBytes, 1);
  auto tier = TwoBlockTier(kv);
  ASSERT_NE(tier, nullptr);
  auto p = tier->BeginPut(Key(0));
  ASSERT_TRUE(p.ok());
  const char* block = static_cast<const char*>(*p);
  for (const void* bad :
       {static_cast<const void*>(block + 1), static_cast<const void*>(block - kPageBytes * 8),
        static_cast<const void*>(block + kPageBytes * 2), static_cast<const void*>(kv.data())}) {
    EXPECT_EQ(tier->NoteBlobChecksum(bad, 0).code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(tier->BlobChecksum(bad).status().code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(tier->KeptBlobChecksum(bad).status().code(), StatusCode::kInvalidArgument);
  }
  ASSERT_TRUE(tier->AbortPut(Key(0)).ok());
}

TEST(CpuTierBlobChecksumTest, AKeptChecksumIsNamedOnlyOnceComputed) {
  std::vector<uint8_t> kv(kPages * kPageBytes, 7);
  auto tier = TwoBlockTier(kv);
  ASSERT_NE(tier, nullptr);
  const ChunkKey k = Key(0);
  auto op = tier->Store(&k, 1, {0}, 0);
  ASSERT_TRUE(op.ok());
  if (op->transfer) ASSERT_TRUE(op->transfer->Wait(kTimeoutMs).ok());
  std::vector<const void*> held = tier->AcquireBlobs(&k, 1);
  ASSERT_EQ(held.size(), 1u);
  auto before = tier->KeptBlobChecksum(held[0]);
  ASSERT_TRUE(before.ok());
  EXPECT_FALSE(before->has_value());  // a stored blob: nobody has read it yet
  const uint64_t computed = tier->stats().blob_checksums_computed;
  auto crc = tier->BlobChecksum(held[0]);
  ASSERT_TRUE(crc.ok());
  auto after = tier->KeptBlobChecksum(held[0]);
  ASSERT_TRUE(after.ok());
  ASSERT_TRUE(after->has_value());
  EXPECT_EQ(**after, *crc);
  EXPECT_EQ(**after, Crc32c(0, kv.data(), kPageBytes));
  EXPECT_EQ(tier->stats().blob_checksums_computed, computed + 1);  // asking computes nothing
  ASSERT_TRUE(tier->ReleaseBlobs(&k, 1).ok());
}

INSTANTIATE_TEST_SUITE_P(Backends, CpuTierWriteBackTest,
                         ::testing::Values(IoBackendKind::kPosix, IoBackendKind::kIoUring),
                         [](const ::testing::TestParamInfo<IoBackendKind>& info) {
                           return info.param == IoBackendKind::kPosix ? std::string("Posix")
                                                                      : std::string("IoUring");
                         });

}  // namespace
}  // namespace kvtier
