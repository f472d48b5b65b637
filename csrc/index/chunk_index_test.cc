// Tests of ChunkIndex: visibility only when READY, pins, rejection when full and demotion under
// every built-in eviction policy; the LRU order of the default policy; S3-FIFO's and LFU's orders
// through the index; and a randomized comparison with a model of the index over the reference
// policies (eviction_policy_reference.h).
#include "index/chunk_index.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "index/eviction_policy_reference.h"

namespace kvtier {
namespace {

ChunkKey K(uint64_t i) { return ChunkKey{i * 0x9E3779B97F4A7C15ull + 1, i}; }

std::unique_ptr<EvictionPolicy> Policy(const std::string& name) {
  auto p = MakeEvictionPolicy(name);
  EXPECT_TRUE(p.ok()) << p.status().ToString();
  return std::move(p).value();
}

// Store: WRITING then READY.
void Put(ChunkIndex& index, uint64_t i) {
  ASSERT_TRUE(index.BeginInsert(K(i)).ok()) << i;
  ASSERT_TRUE(index.CommitInsert(K(i)).ok()) << i;
}

// One reader: acquire and release.
void Hit(ChunkIndex& index, uint64_t i) {
  ChunkKey k = K(i);
  std::vector<BlockId> blocks;
  ASSERT_EQ(index.Acquire(&k, 1, &blocks), 1u) << i;
  ASSERT_TRUE(index.Release(&k, 1).ok());
}

bool AdmitSeenTwice(void*, const ChunkKey&, uint32_t seen) { return seen >= 2; }

// ---- The default policy's order: LRU ------------------------------------------------------------

TEST(ChunkIndexTest, DefaultPolicyIsLru) {
  BlockAllocator alloc(2, 64);
  ChunkIndex index(&alloc);
  EXPECT_STREQ(index.eviction_policy(), "lru");
}

TEST(ChunkIndexTest, EvictsLeastRecentlyUsedAndSparesPinned) {
  BlockAllocator alloc(3, 64);
  ChunkIndex index(&alloc);
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(index.BeginInsert(K(i)).ok());
    ASSERT_TRUE(index.CommitInsert(K(i)).ok());
  }
  // Touch 0 (now most recent), pin 1: inserting 3 must evict 2, the LRU unpinned entry.
  std::vector<BlockId> blocks;
  ChunkKey k0 = K(0), k1 = K(1);
  ASSERT_EQ(index.Acquire(&k0, 1, &blocks), 1u);
  ASSERT_TRUE(index.Release(&k0, 1).ok());
  ASSERT_EQ(index.Acquire(&k1, 1, &blocks), 1u);  // stays pinned
  ASSERT_TRUE(index.BeginInsert(K(3)).ok());
  ASSERT_TRUE(index.CommitInsert(K(3)).ok());
  EXPECT_TRUE(index.Contains(K(0)));
  EXPECT_TRUE(index.Contains(K(1)));
  EXPECT_FALSE(index.Contains(K(2)));
  // Next victim is 0 (1 is pinned, 3 is newest).
  ASSERT_TRUE(index.BeginInsert(K(4)).ok());
  ASSERT_TRUE(index.CommitInsert(K(4)).ok());
  EXPECT_FALSE(index.Contains(K(0)));
  EXPECT_TRUE(index.Contains(K(1)));
  EXPECT_EQ(index.stats().evictions, 2u);
  ASSERT_TRUE(index.Release(&k1, 1).ok());
}

TEST(ChunkIndexTest, PrefixHeadOutlivesItsTail) {
  BlockAllocator alloc(3, 64);
  ChunkIndex index(&alloc);
  std::vector<ChunkKey> prefix = {K(0), K(1), K(2)};
  for (auto& k : prefix) {
    ASSERT_TRUE(index.BeginInsert(k).ok());
    ASSERT_TRUE(index.CommitInsert(k).ok());
  }
  std::vector<BlockId> blocks;
  ASSERT_EQ(index.Acquire(prefix.data(), 3, &blocks), 3u);
  ASSERT_TRUE(index.Release(prefix.data(), 3).ok());
  ASSERT_TRUE(index.BeginInsert(K(9)).ok());  // evicts the tail (K(2)), not the head
  EXPECT_TRUE(index.Contains(K(0)));
  EXPECT_FALSE(index.Contains(K(2)));
  ASSERT_TRUE(index.AbortInsert(K(9)).ok());
}

TEST(ChunkIndexTest, LookupDoesNotRefreshRecency) {
  BlockAllocator alloc(2, 64);
  ChunkIndex index(&alloc);
  Put(index, 0);
  Put(index, 1);
  ChunkKey k0 = K(0);
  EXPECT_EQ(index.Lookup(&k0, 1), 1u);
  Put(index, 2);  // K(0) is still the least recently used
  EXPECT_FALSE(index.Contains(K(0)));
  EXPECT_TRUE(index.Contains(K(1)));
}

TEST(ChunkIndexTest, PinQuietlyOncePinsAnEntryOncePerStay) {
  BlockAllocator alloc(2, 64);
  ChunkIndex index(&alloc);
  Put(index, 1);
  ChunkKey k = K(1);
  std::vector<BlockId> blocks;
  std::vector<uint8_t> pinned;
  EXPECT_EQ(index.PinQuietly(&k, 1, &blocks, &pinned, /*min_seen=*/2, /*once=*/true),
            0u);  // seen once
  Hit(index, 1);  // seen twice
  EXPECT_EQ(index.PinQuietly(&k, 1, &blocks, &pinned, 2, /*once=*/true), 1u);
  ASSERT_TRUE(index.Release(&k, 1).ok());
  EXPECT_EQ(index.PinQuietly(&k, 1, &blocks, &pinned, 2, /*once=*/true), 0u);  // done once
  EXPECT_EQ(index.PinQuietly(&k, 1, &blocks, &pinned, 2), 1u);  // other pins are not limited
  ASSERT_TRUE(index.Release(&k, 1).ok());
  ASSERT_TRUE(index.Erase(k).ok());  // a new stay in the index starts over
  Put(index, 1);
  Hit(index, 1);
  EXPECT_EQ(index.PinQuietly(&k, 1, &blocks, &pinned, 2, /*once=*/true), 1u);
  ASSERT_TRUE(index.Release(&k, 1).ok());
}

TEST(ChunkIndexTest, DemotionHoldsAdmittedChunksVisibleUntilFinished) {
  BlockAllocator alloc(2, 64);
  ChunkIndex index(&alloc);
  index.EnableDemotion(&AdmitSeenTwice, nullptr, 4);
  ChunkKey k0 = K(0), k1 = K(1);
  for (ChunkKey k : {k0, k1}) {
    ASSERT_TRUE(index.BeginInsert(k).ok());
    ASSERT_TRUE(index.CommitInsert(k).ok());
  }
  std::vector<BlockId> blocks;
  ASSERT_EQ(index.Acquire(&k0, 1, &blocks), 1u);  // k0 seen twice: admitted for write-back
  ASSERT_TRUE(index.Release(&k0, 1).ok());
  ASSERT_EQ(index.Acquire(&k1, 1, &blocks), 1u);  // k1 also seen twice, and now most recent
  ASSERT_TRUE(index.Release(&k1, 1).ok());
  // Full: k0 (LRU, admitted) becomes DEMOTING, then k1 too; no block is free -> rejected.
  EXPECT_EQ(index.BeginInsert(K(2)).status().code(), StatusCode::kResourceExhausted);
  auto demotions = index.TakeDemotions();
  ASSERT_EQ(demotions.size(), 2u);
  EXPECT_EQ(demotions[0].key, k0);
  EXPECT_TRUE(index.Contains(k0));  // still readable while the write-back runs
  EXPECT_EQ(index.stats().demoting, 2u);
  // A reader holds k0 when its write-back finishes: the block is freed at the reader's release.
  ASSERT_EQ(index.Acquire(&k0, 1, &blocks), 1u);
  ASSERT_TRUE(index.FinishDemotion(k0).ok());
  EXPECT_FALSE(index.Contains(k0));
  EXPECT_EQ(alloc.stats().used_blocks, 2u);
  ASSERT_TRUE(index.Release(&k0, 1).ok());
  EXPECT_EQ(alloc.stats().used_blocks, 1u);
  ASSERT_TRUE(index.FinishDemotion(k1).ok());
  EXPECT_EQ(alloc.stats().used_blocks, 0u);
  EXPECT_EQ(index.FinishDemotion(k1).code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(index.BeginInsert(K(2)).ok());
}

// Records what a VisibilityObserver hears: +i for "key i became visible", -i for "stopped".
struct Heard {
  std::vector<int64_t> calls;
  static void On(void* ctx, const ChunkKey& key, bool visible) {
    const int64_t i = static_cast<int64_t>(key.hi);  // K(i).hi == i
    static_cast<Heard*>(ctx)->calls.push_back(visible ? i + 1 : -(i + 1));
  }
};

TEST(ChunkIndexTest, VisibilityObserverHearsEachChangeOnce) {
  BlockAllocator alloc(3, 64);
  ChunkIndex index(&alloc);
  index.EnableDemotion(&AdmitSeenTwice, nullptr, 4);
  Put(index, 0);
  Heard heard;
  index.SetVisibilityObserver(&Heard::On, &heard);  // reports what is visible already
  EXPECT_EQ(heard.calls, (std::vector<int64_t>{1}));
  ASSERT_TRUE(index.BeginInsert(K(1)).ok());
  EXPECT_EQ(heard.calls.size(), 1u);  // WRITING is invisible
  ASSERT_TRUE(index.AbortInsert(K(1)).ok());
  EXPECT_EQ(heard.calls.size(), 1u);  // and its abort changes nothing visible
  Put(index, 1);
  Hit(index, 0);  // key 0 seen twice: admitted for write-back when evicted
  Put(index, 2);
  Put(index, 3);  // evicts key 1 (least recent, seen once: dropped)
  EXPECT_EQ(heard.calls, (std::vector<int64_t>{1, 2, 3, -2, 4}));
  Put(index, 4);  // key 0 becomes DEMOTING (still visible), then key 2 is dropped
  EXPECT_EQ(heard.calls, (std::vector<int64_t>{1, 2, 3, -2, 4, -3, 5}));
  ASSERT_TRUE(index.FinishDemotion(K(0)).ok());  // the write-back ended: gone
  EXPECT_EQ(heard.calls.back(), -1);
  ASSERT_TRUE(index.Erase(K(3)).ok());
  EXPECT_EQ(heard.calls.back(), -4);
  index.SetVisibilityObserver(nullptr, nullptr);
  Put(index, 5);
  EXPECT_EQ(heard.calls.size(), 9u);
}

TEST(ChunkIndexTest, DemotionDropsUnadmittedAndBeyondTheInFlightBound) {
  BlockAllocator alloc(3, 64);
  ChunkIndex index(&alloc);
  index.EnableDemotion(&AdmitSeenTwice, nullptr, 1);
  std::vector<BlockId> blocks;
  for (int i = 0; i < 3; ++i) {
    ChunkKey k = K(i);
    ASSERT_TRUE(index.BeginInsert(k).ok());
    ASSERT_TRUE(index.CommitInsert(k).ok());
    if (i < 2) {  // 0 and 1 seen twice
      ASSERT_EQ(index.Acquire(&k, 1, &blocks), 1u);
      ASSERT_TRUE(index.Release(&k, 1).ok());
    }
  }
  // LRU order (old -> new): 0, 1, 2. Insert 3: 0 demoted (bound 1 reached), 1 dropped as busy.
  ASSERT_TRUE(index.BeginInsert(K(3)).ok());
  auto st = index.stats();
  EXPECT_EQ(st.demotions, 1u);
  EXPECT_EQ(st.demotions_busy, 1u);
  EXPECT_TRUE(index.Contains(K(0)));
  EXPECT_FALSE(index.Contains(K(1)));
  ASSERT_TRUE(index.CommitInsert(K(3)).ok());
  // Insert 4: LRU is 2 (seen once): not admitted, dropped at once.
  ASSERT_TRUE(index.BeginInsert(K(4)).ok());
  EXPECT_EQ(index.stats().demotions_not_admitted, 1u);
  EXPECT_FALSE(index.Contains(K(2)));
  ASSERT_EQ(index.TakeDemotions().size(), 1u);
  ASSERT_TRUE(index.FinishDemotion(K(0)).ok());
  ASSERT_TRUE(index.AbortInsert(K(4)).ok());
}

// ---- Every policy: what does not depend on the order --------------------------------------------

class ChunkIndexPolicyTest : public testing::TestWithParam<std::string> {
 protected:
  std::unique_ptr<ChunkIndex> MakeIndex(BlockAllocator* alloc) {
    return std::make_unique<ChunkIndex>(alloc, Policy(GetParam()));
  }
};

TEST_P(ChunkIndexPolicyTest, ReportsItsPolicy) {
  BlockAllocator alloc(2, 64);
  EXPECT_EQ(std::string(MakeIndex(&alloc)->eviction_policy()), GetParam());
}

TEST_P(ChunkIndexPolicyTest, WritingIsInvisibleUntilCommit) {
  BlockAllocator alloc(4, 64);
  auto index = MakeIndex(&alloc);
  ChunkKey k = K(1);
  auto b = index->BeginInsert(k);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(index->Lookup(&k, 1), 0u);
  EXPECT_FALSE(index->Contains(k));
  std::vector<BlockId> blocks;
  EXPECT_EQ(index->Acquire(&k, 1, &blocks), 0u);
  ASSERT_TRUE(index->CommitInsert(k).ok());
  EXPECT_EQ(index->Lookup(&k, 1), 1u);
  EXPECT_EQ(index->Acquire(&k, 1, &blocks), 1u);
  EXPECT_EQ(blocks[0], *b);
  ASSERT_TRUE(index->Release(&k, 1).ok());
}

TEST_P(ChunkIndexPolicyTest, AbortFreesTheBlockAndLeavesNothing) {
  BlockAllocator alloc(1, 64);
  auto index = MakeIndex(&alloc);
  ChunkKey k = K(1);
  ASSERT_TRUE(index->BeginInsert(k).ok());
  EXPECT_EQ(alloc.stats().used_blocks, 1u);
  ASSERT_TRUE(index->AbortInsert(k).ok());
  EXPECT_EQ(alloc.stats().used_blocks, 0u);
  EXPECT_EQ(index->stats().entries, 0u);
  EXPECT_EQ(index->AbortInsert(k).code(), StatusCode::kNotFound);
}

TEST_P(ChunkIndexPolicyTest, DuplicateInsertIsAlreadyExists) {
  BlockAllocator alloc(2, 64);
  auto index = MakeIndex(&alloc);
  ChunkKey k = K(7);
  ASSERT_TRUE(index->BeginInsert(k).ok());
  EXPECT_EQ(index->BeginInsert(k).status().code(), StatusCode::kAlreadyExists);
  ASSERT_TRUE(index->CommitInsert(k).ok());
  EXPECT_EQ(index->BeginInsert(k).status().code(), StatusCode::kAlreadyExists);
  EXPECT_EQ(index->CommitInsert(k).code(), StatusCode::kFailedPrecondition);
}

TEST_P(ChunkIndexPolicyTest, LookupStopsAtFirstMiss) {
  BlockAllocator alloc(8, 64);
  auto index = MakeIndex(&alloc);
  std::vector<ChunkKey> keys = {K(0), K(1), K(2), K(3)};
  for (int i : {0, 1, 3}) {
    ASSERT_TRUE(index->BeginInsert(keys[i]).ok());
    ASSERT_TRUE(index->CommitInsert(keys[i]).ok());
  }
  EXPECT_EQ(index->Lookup(keys.data(), keys.size()), 2u);
}

TEST_P(ChunkIndexPolicyTest, FullOfPinnedAndWritingRejectsWithoutBlocking) {
  BlockAllocator alloc(2, 64);
  auto index = MakeIndex(&alloc);
  ASSERT_TRUE(index->BeginInsert(K(0)).ok());  // WRITING
  ASSERT_TRUE(index->BeginInsert(K(1)).ok());
  ASSERT_TRUE(index->CommitInsert(K(1)).ok());
  std::vector<BlockId> blocks;
  ChunkKey k1 = K(1);
  ASSERT_EQ(index->Acquire(&k1, 1, &blocks), 1u);  // pinned
  auto r = index->BeginInsert(K(2));
  EXPECT_EQ(r.status().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(index->stats().insert_rejected, 1u);
  EXPECT_TRUE(index->Contains(K(1)));
  EXPECT_EQ(index->Erase(K(1)).code(), StatusCode::kFailedPrecondition);
  ASSERT_TRUE(index->Release(&k1, 1).ok());
  EXPECT_EQ(index->Release(&k1, 1).code(), StatusCode::kFailedPrecondition);
  ASSERT_TRUE(index->Erase(K(1)).ok());
  ASSERT_TRUE(index->AbortInsert(K(0)).ok());
  EXPECT_EQ(alloc.stats().used_blocks, 0u);
}

TEST_P(ChunkIndexPolicyTest, PinnedEntriesAreNeverEvictedNorForgotten) {
  constexpr int kBlocks = 4;
  BlockAllocator alloc(kBlocks, 64);
  auto index = MakeIndex(&alloc);
  for (int i = 0; i < kBlocks; ++i) Put(*index, i);
  std::vector<ChunkKey> held = {K(0), K(2)};
  std::vector<BlockId> blocks;
  for (ChunkKey& k : held) ASSERT_EQ(index->Acquire(&k, 1, &blocks), 1u);
  for (int i = 10; i < 40; ++i) {  // churn through the two unpinned blocks
    Put(*index, i);
    if (i % 3 == 0) Hit(*index, i);
    for (const ChunkKey& k : held) ASSERT_TRUE(index->Contains(k)) << i;
  }
  // Everything else pinned too: nothing to evict, nothing lost.
  for (int i = 10; i < 40; ++i) {
    ChunkKey k = K(i);
    if (index->Acquire(&k, 1, &blocks) == 1) held.push_back(k);
  }
  ASSERT_EQ(held.size(), static_cast<size_t>(kBlocks));
  EXPECT_EQ(index->BeginInsert(K(99)).status().code(), StatusCode::kResourceExhausted);
  ASSERT_TRUE(index->Release(held.data(), held.size()).ok());
  // Unpinned, the four are evictable again: the policy still tracks every one of them. (Each new
  // chunk is pinned at once, or S3-FIFO and LFU would pick it, a one-use newcomer, first.)
  std::vector<ChunkKey> fresh;
  for (int i = 100; i < 104; ++i) {
    Put(*index, i);
    fresh.push_back(K(i));
    ASSERT_EQ(index->Acquire(&fresh.back(), 1, &blocks), 1u);
  }
  for (const ChunkKey& k : held) EXPECT_FALSE(index->Contains(k));
  EXPECT_EQ(index->stats().entries, static_cast<size_t>(kBlocks));
  ASSERT_TRUE(index->Release(fresh.data(), fresh.size()).ok());
}

TEST_P(ChunkIndexPolicyTest, DemotionKeepsEveryAdmittedChunkVisibleUntilFinished) {
  BlockAllocator alloc(2, 64);
  auto index = MakeIndex(&alloc);
  index->EnableDemotion(&AdmitSeenTwice, nullptr, 4);
  Put(*index, 0);
  Put(*index, 1);
  Hit(*index, 0);  // both seen twice: admitted for write-back
  Hit(*index, 1);
  EXPECT_EQ(index->BeginInsert(K(2)).status().code(), StatusCode::kResourceExhausted);
  auto demotions = index->TakeDemotions();
  ASSERT_EQ(demotions.size(), 2u);
  EXPECT_TRUE((demotions[0].key == K(0) && demotions[1].key == K(1)) ||
              (demotions[0].key == K(1) && demotions[1].key == K(0)));
  EXPECT_TRUE(index->Contains(K(0)));
  EXPECT_TRUE(index->Contains(K(1)));
  // A hit on a DEMOTING chunk reads it but does not bring it back under the policy.
  Hit(*index, 0);
  EXPECT_EQ(index->stats().demoting, 2u);
  for (const auto& d : demotions) ASSERT_TRUE(index->FinishDemotion(d.key).ok());
  EXPECT_EQ(alloc.stats().used_blocks, 0u);
  Put(*index, 2);
  Put(*index, 3);
}

TEST_P(ChunkIndexPolicyTest, LookupDoesNotChangeTheEvictionOrder) {
  // Two indexes fed the same stores and hits; one also serves many lookups. Same survivors.
  BlockAllocator alloc_a(8, 64), alloc_b(8, 64);
  auto a = MakeIndex(&alloc_a);
  auto b = MakeIndex(&alloc_b);
  std::mt19937 rng(5);
  for (int step = 0; step < 2000; ++step) {
    uint64_t id = rng() % 24;
    if (rng() % 2) {
      bool in_a = a->BeginInsert(K(id)).ok(), in_b = b->BeginInsert(K(id)).ok();
      ASSERT_EQ(in_a, in_b);
      if (in_a) {
        ASSERT_TRUE(a->CommitInsert(K(id)).ok());
        ASSERT_TRUE(b->CommitInsert(K(id)).ok());
      }
    } else if (a->Contains(K(id))) {
      Hit(*a, id);
      Hit(*b, id);
    }
    for (uint64_t j = 0; j < 24; j += 1 + rng() % 3) {
      ChunkKey k = K(j);
      (void)b->Lookup(&k, 1);
    }
    for (uint64_t j = 0; j < 24; ++j) ASSERT_EQ(a->Contains(K(j)), b->Contains(K(j))) << step;
  }
}

TEST_P(ChunkIndexPolicyTest, ConcurrentInsertLookupAcquireKeepsBlocksExclusive) {
  constexpr int kBlocks = 64;
  BlockAllocator alloc(kBlocks, 64);
  auto index = MakeIndex(&alloc);
  std::atomic<int> owners[kBlocks];
  for (auto& o : owners) o = 0;
  std::atomic<bool> fail{false};
  auto worker = [&](int seed) {
    std::mt19937 rng(seed);
    for (int it = 0; it < 20000; ++it) {
      ChunkKey k = K(rng() % 256);
      switch (rng() % 3) {
        case 0: {
          auto b = index->BeginInsert(k);
          if (!b.ok()) break;
          if (owners[*b].fetch_add(1) != 0) fail = true;  // a WRITING block is exclusive
          owners[*b].fetch_sub(1);
          if (rng() % 4 == 0) {
            (void)index->AbortInsert(k);
          } else {
            (void)index->CommitInsert(k);
          }
          break;
        }
        case 1:
          (void)index->Lookup(&k, 1);
          break;
        case 2: {
          std::vector<BlockId> blocks;
          if (index->Acquire(&k, 1, &blocks) == 1) {
            if (!alloc.IsAllocated(blocks[0])) fail = true;  // pinned block must stay allocated
            (void)index->Release(&k, 1);
          }
          break;
        }
      }
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) threads.emplace_back(worker, t);
  for (auto& t : threads) t.join();
  EXPECT_FALSE(fail.load());
  auto s = index->stats();
  EXPECT_EQ(s.writing, 0u);
  EXPECT_EQ(s.pinned, 0u);
  EXPECT_EQ(s.entries, alloc.stats().used_blocks);
  EXPECT_LE(s.entries, static_cast<size_t>(kBlocks));
}

TEST_P(ChunkIndexPolicyTest, OnePassScanFlushesTheHotSetUnderLruOnly) {
  constexpr int kBlocks = 32;
  BlockAllocator alloc(kBlocks, 64);
  auto index = MakeIndex(&alloc);
  for (int i = 0; i < 8; ++i) Put(*index, i);  // the hot set, read a few times
  for (int round = 0; round < 3; ++round) {
    for (int i = 0; i < 8; ++i) Hit(*index, i);
  }
  for (int i = 1000; i < 1200; ++i) Put(*index, i);  // a scan: 200 chunks stored once, never read
  int hot_left = 0;
  for (int i = 0; i < 8; ++i) hot_left += index->Contains(K(i));
  if (GetParam() == "lru") {
    EXPECT_EQ(hot_left, 0);
  } else {
    EXPECT_EQ(hot_left, 8);
  }
}

INSTANTIATE_TEST_SUITE_P(Builtins, ChunkIndexPolicyTest, testing::Values("lru", "s3fifo", "lfu"),
                         [](const auto& info) { return info.param; });

// ---- Each policy's characteristic order, through the index --------------------------------------

TEST(ChunkIndexS3FifoTest, OneHitWondersLeaveBeforeAnOlderChunkThatWasRead) {
  BlockAllocator alloc(4, 64);
  ChunkIndex index(&alloc, Policy("s3fifo"));
  for (int i = 0; i < 4; ++i) Put(index, i);
  Hit(index, 0);  // the oldest, but read: it moves to the main queue when its turn comes
  for (int i = 10; i < 30; ++i) {
    Put(index, i);
    EXPECT_TRUE(index.Contains(K(0))) << i;
  }
  EXPECT_FALSE(index.Contains(K(1)));
  // LRU would have let K(0) go by the fourth new chunk.
  BlockAllocator alloc_lru(4, 64);
  ChunkIndex lru(&alloc_lru);
  for (int i = 0; i < 4; ++i) Put(lru, i);
  Hit(lru, 0);
  for (int i = 10; i < 14; ++i) Put(lru, i);
  EXPECT_FALSE(lru.Contains(K(0)));
}

TEST(ChunkIndexS3FifoTest, GhostHitGoesStraightToMain) {
  BlockAllocator alloc(4, 64);
  ChunkIndex index(&alloc, Policy("s3fifo"));
  for (int i = 0; i < 4; ++i) Put(index, i);
  Put(index, 4);  // evicts K(0), unread, into the ghost
  ASSERT_FALSE(index.Contains(K(0)));
  Put(index, 0);  // stored again (recomputed after the miss): a ghost hit, into main
  EXPECT_FALSE(index.Contains(K(1)));
  for (int i = 10; i < 30; ++i) {  // new chunks leave through the small queue; K(0) stays
    Put(index, i);
    EXPECT_TRUE(index.Contains(K(0))) << i;
  }
}

TEST(ChunkIndexS3FifoTest, DemotedChunkComingBackIsAGhostHit) {
  // A chunk evicted unread into the disk tier, then promoted back (CommitInsert again) is a reuse.
  BlockAllocator alloc(4, 64);
  ChunkIndex index(&alloc, Policy("s3fifo"));
  index.EnableDemotion([](void*, const ChunkKey& k, uint32_t) { return k.hi == 0; }, nullptr, 4);
  for (int i = 0; i < 4; ++i) Put(index, i);
  Put(index, 4);  // K(0) becomes DEMOTING (its block is not free yet), then K(1) is dropped
  auto demotions = index.TakeDemotions();
  ASSERT_EQ(demotions.size(), 1u);
  EXPECT_EQ(demotions[0].key, K(0));
  EXPECT_FALSE(index.Contains(K(1)));
  ASSERT_TRUE(index.FinishDemotion(K(0)).ok());
  Put(index, 0);  // promoted from disk
  for (int i = 10; i < 30; ++i) {
    Put(index, i);
    EXPECT_TRUE(index.Contains(K(0))) << i;
  }
}

TEST(ChunkIndexLfuTest, KeepsAFrequentlyHitChunkOverRecentlyStoredOnes) {
  BlockAllocator alloc(3, 64);
  ChunkIndex index(&alloc, Policy("lfu"));
  Put(index, 0);
  for (int i = 0; i < 3; ++i) Hit(index, 0);
  for (int i = 10; i < 40; ++i) {
    Put(index, i);
    EXPECT_TRUE(index.Contains(K(0))) << i;
  }
  EXPECT_TRUE(index.Contains(K(38)));  // recent one-use chunks replace each other, oldest first
  EXPECT_TRUE(index.Contains(K(39)));
  EXPECT_FALSE(index.Contains(K(37)));
}

TEST(ChunkIndexLfuTest, PrefixTailGoesBeforeItsHeadAtEqualCounts) {
  BlockAllocator alloc(3, 64);
  ChunkIndex index(&alloc, Policy("lfu"));
  std::vector<ChunkKey> prefix = {K(0), K(1), K(2)};
  for (int i = 0; i < 3; ++i) Put(index, i);
  std::vector<BlockId> blocks;
  ASSERT_EQ(index.Acquire(prefix.data(), 3, &blocks), 3u);
  ASSERT_TRUE(index.Release(prefix.data(), 3).ok());
  Put(index, 9);  // all three have count 2, and the tail was hit first: it is the least recent
  EXPECT_FALSE(index.Contains(K(2)));
  EXPECT_TRUE(index.Contains(K(0)));
  EXPECT_TRUE(index.Contains(K(1)));
}

// ---- Randomized: the index against a model of it over the reference policies -------------------

bool AdmitEvenKeys(void*, const ChunkKey& key, uint32_t) { return key.hi % 2 == 0; }

// What the index should do, written plainly: entries in a map, every entry holding one block,
// the order decided by a reference policy model.
class IndexModel {
 public:
  enum class S { kWriting, kReady, kDemoting, kDropping };
  struct E {
    S state;
    uint32_t pins;
  };

  IndexModel(const std::string& policy, size_t capacity, bool demotion, size_t max_demoting)
      : policy_(reference::Make(policy)),
        capacity_(capacity),
        demotion_(demotion),
        max_demoting_(max_demoting) {}

  bool Visible(uint64_t id) const {
    auto it = entries_.find(id);
    return it != entries_.end() &&
           (it->second.state == S::kReady || it->second.state == S::kDemoting);
  }
  bool Has(uint64_t id) const { return entries_.count(id) != 0; }
  const E& at(uint64_t id) const { return entries_.at(id); }

  // BeginInsert of a key not present: true if it got a block.
  bool BeginInsert(uint64_t id) {
    while (entries_.size() >= capacity_) {
      if (!EvictOne()) return false;
    }
    entries_[id] = E{S::kWriting, 0};
    return true;
  }
  void Commit(uint64_t id) {
    entries_[id].state = S::kReady;
    policy_->Insert(K(id));
  }
  void Abort(uint64_t id) { entries_.erase(id); }
  size_t Lookup(const std::vector<uint64_t>& ids) const {
    size_t n = 0;
    while (n < ids.size() && Visible(ids[n])) ++n;
    return n;
  }
  size_t Acquire(const std::vector<uint64_t>& ids) {
    size_t n = Lookup(ids);
    for (size_t i = 0; i < n; ++i) ++entries_[ids[i]].pins;
    for (size_t j = n; j > 0; --j) {
      if (entries_[ids[j - 1]].state == S::kReady) policy_->Access(K(ids[j - 1]));
    }
    return n;
  }
  void Release(const std::vector<uint64_t>& ids) {
    for (uint64_t id : ids) {
      E& e = entries_[id];
      if (--e.pins == 0 && e.state == S::kDropping) entries_.erase(id);
    }
  }
  // Erase's expected status code.
  StatusCode Erase(uint64_t id) {
    auto it = entries_.find(id);
    if (it == entries_.end()) return StatusCode::kNotFound;
    if (it->second.state != S::kReady || it->second.pins != 0)
      return StatusCode::kFailedPrecondition;
    policy_->Remove(K(id));
    entries_.erase(it);
    return StatusCode::kOk;
  }
  std::vector<uint64_t> TakeDemotions() {
    std::vector<uint64_t> out;
    out.swap(new_demotions_);
    return out;
  }
  void FinishDemotion(uint64_t id) {
    --demoting_;
    E& e = entries_[id];
    if (e.pins != 0) {
      e.state = S::kDropping;
    } else {
      entries_.erase(id);
    }
  }
  size_t entries() const { return entries_.size(); }
  size_t count(S s) const {
    return std::count_if(entries_.begin(), entries_.end(),
                         [&](const auto& kv) { return kv.second.state == s; });
  }
  size_t pinned() const {
    return std::count_if(entries_.begin(), entries_.end(),
                         [](const auto& kv) { return kv.second.pins != 0; });
  }
  std::vector<uint64_t> Ids(S s) const {
    std::vector<uint64_t> out;
    for (const auto& [id, e] : entries_) {
      if (e.state == s) out.push_back(id);
    }
    return out;
  }

 private:
  bool EvictOne() {
    auto unpinned = [&](const ChunkKey& k) { return entries_.at(k.hi).pins == 0; };
    ChunkKey v;
    while (policy_->Pick(unpinned, &v)) {
      policy_->Remove(v);
      E& e = entries_.at(v.hi);
      if (demotion_ && v.hi % 2 == 0 && demoting_ < max_demoting_) {
        e.state = S::kDemoting;
        ++demoting_;
        new_demotions_.push_back(v.hi);
        continue;
      }
      entries_.erase(v.hi);
      return true;
    }
    return false;
  }

  std::unique_ptr<reference::Model> policy_;
  const size_t capacity_;
  const bool demotion_;
  const size_t max_demoting_;
  size_t demoting_ = 0;
  std::map<uint64_t, E> entries_;
  std::vector<uint64_t> new_demotions_;
};

void RunIndexAgainstModel(const std::string& policy, uint32_t seed, size_t capacity,
                          bool demotion) {
  constexpr size_t kMaxDemoting = 2;
  const uint64_t universe = 4 * capacity;
  BlockAllocator alloc(capacity, 64);
  ChunkIndex index(&alloc, Policy(policy));
  if (demotion) index.EnableDemotion(&AdmitEvenKeys, nullptr, kMaxDemoting);
  IndexModel model(policy, capacity, demotion, kMaxDemoting);
  std::mt19937 rng(seed);
  std::vector<uint64_t> writing;
  std::vector<std::vector<uint64_t>> held;  // acquired runs not yet released
  std::vector<uint64_t> demoting;           // taken demotions not yet finished
  auto keys_of = [](const std::vector<uint64_t>& ids) {
    std::vector<ChunkKey> ks;
    for (uint64_t id : ids) ks.push_back(K(id));
    return ks;
  };
  auto random_run = [&]() {  // mostly visible keys, so that runs hit
    std::vector<uint64_t> ids;
    auto ready = model.Ids(IndexModel::S::kReady);
    int n = 1 + rng() % 4;
    for (int i = 0; i < n; ++i) {
      ids.push_back(!ready.empty() && rng() % 4 != 0 ? ready[rng() % ready.size()]
                                                     : rng() % universe);
    }
    return ids;
  };
  size_t evictions_seen = 0;
  for (int step = 0; step < 6000; ++step) {
    const int op = rng() % 100;
    if (op < 30) {  // store
      uint64_t id = rng() % universe;
      auto got = index.BeginInsert(K(id));
      if (model.Has(id)) {
        ASSERT_EQ(got.status().code(), StatusCode::kAlreadyExists) << step;
        continue;
      }
      bool ok = model.BeginInsert(id);
      ASSERT_EQ(got.ok(), ok) << "step " << step << ": " << got.status().ToString();
      if (!ok) {
        ASSERT_EQ(got.status().code(), StatusCode::kResourceExhausted);
        continue;
      }
      if (rng() % 5 == 0) {
        writing.push_back(id);  // finished later
      } else {
        ASSERT_TRUE(index.CommitInsert(K(id)).ok());
        model.Commit(id);
      }
    } else if (op < 36) {  // finish a store left WRITING
      if (writing.empty()) continue;
      size_t i = rng() % writing.size();
      uint64_t id = writing[i];
      writing.erase(writing.begin() + i);
      if (rng() % 4 == 0) {
        ASSERT_TRUE(index.AbortInsert(K(id)).ok());
        model.Abort(id);
      } else {
        ASSERT_TRUE(index.CommitInsert(K(id)).ok());
        model.Commit(id);
      }
    } else if (op < 56) {  // acquire a run; held for a while
      auto ids = random_run();
      auto ks = keys_of(ids);
      std::vector<BlockId> blocks;
      size_t n = index.Acquire(ks.data(), ks.size(), &blocks);
      ASSERT_EQ(n, model.Acquire(ids)) << step;
      ASSERT_EQ(blocks.size(), n);
      ids.resize(n);
      if (n > 0) held.push_back(ids);
    } else if (op < 72) {  // release a held run
      if (held.empty()) continue;
      size_t i = rng() % held.size();
      auto ks = keys_of(held[i]);
      ASSERT_TRUE(index.Release(ks.data(), ks.size()).ok());
      model.Release(held[i]);
      held.erase(held.begin() + i);
    } else if (op < 82) {  // lookups change nothing
      auto ids = random_run();
      auto ks = keys_of(ids);
      ASSERT_EQ(index.Lookup(ks.data(), ks.size()), model.Lookup(ids));
    } else if (op < 88) {  // erase
      uint64_t id = rng() % universe;
      ASSERT_EQ(index.Erase(K(id)).code(), model.Erase(id)) << step;
    } else {  // the write-back side: take and finish demotions
      auto taken = index.TakeDemotions();
      auto expected = model.TakeDemotions();
      ASSERT_EQ(taken.size(), expected.size()) << step;
      for (size_t i = 0; i < taken.size(); ++i) {
        ASSERT_EQ(taken[i].key, K(expected[i])) << step;
        demoting.push_back(expected[i]);
      }
      if (!demoting.empty() && rng() % 2 == 0) {
        size_t i = rng() % demoting.size();
        ASSERT_TRUE(index.FinishDemotion(K(demoting[i])).ok());
        model.FinishDemotion(demoting[i]);
        demoting.erase(demoting.begin() + i);
      }
    }
    for (uint64_t id = 0; id < universe; ++id) {
      ASSERT_EQ(index.Contains(K(id)), model.Visible(id)) << "step " << step << " key " << id;
    }
    auto st = index.stats();
    ASSERT_EQ(st.entries, model.entries()) << step;
    ASSERT_EQ(st.writing, model.count(IndexModel::S::kWriting)) << step;
    ASSERT_EQ(st.demoting, model.count(IndexModel::S::kDemoting)) << step;
    ASSERT_EQ(st.pinned, model.pinned()) << step;
    ASSERT_EQ(alloc.stats().used_blocks, model.entries()) << step;
    evictions_seen = st.evictions;
  }
  EXPECT_GT(evictions_seen, 100u);  // the comparison covered many victims
}

TEST_P(ChunkIndexPolicyTest, MatchesAModelOfTheIndexOverRandomOperations) {
  for (uint32_t seed = 1; seed <= 3; ++seed) {
    RunIndexAgainstModel(GetParam(), seed, /*capacity=*/12, /*demotion=*/false);
    if (HasFatalFailure()) return;
    RunIndexAgainstModel(GetParam(), 100 + seed, /*capacity=*/12, /*demotion=*/true);
    if (HasFatalFailure()) return;
  }
}

}  // namespace
}  // namespace kvtier
