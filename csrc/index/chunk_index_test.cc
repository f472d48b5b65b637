// Tests of ChunkIndex: visibility only when READY, pins, LRU eviction order, rejection when full.
#include "index/chunk_index.h"

#include <gtest/gtest.h>

#include <atomic>
#include <random>
#include <thread>

namespace kvtier {
namespace {

ChunkKey K(uint64_t i) { return ChunkKey{i * 0x9E3779B97F4A7C15ull + 1, i}; }

TEST(ChunkIndexTest, WritingIsInvisibleUntilCommit) {
  BlockAllocator alloc(4, 64);
  ChunkIndex index(&alloc);
  ChunkKey k = K(1);
  auto b = index.BeginInsert(k);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(index.Lookup(&k, 1), 0u);
  EXPECT_FALSE(index.Contains(k));
  std::vector<BlockId> blocks;
  EXPECT_EQ(index.Acquire(&k, 1, &blocks), 0u);
  ASSERT_TRUE(index.CommitInsert(k).ok());
  EXPECT_EQ(index.Lookup(&k, 1), 1u);
  EXPECT_EQ(index.Acquire(&k, 1, &blocks), 1u);
  EXPECT_EQ(blocks[0], *b);
  ASSERT_TRUE(index.Release(&k, 1).ok());
}

TEST(ChunkIndexTest, AbortFreesTheBlockAndLeavesNothing) {
  BlockAllocator alloc(1, 64);
  ChunkIndex index(&alloc);
  ChunkKey k = K(1);
  ASSERT_TRUE(index.BeginInsert(k).ok());
  EXPECT_EQ(alloc.stats().used_blocks, 1u);
  ASSERT_TRUE(index.AbortInsert(k).ok());
  EXPECT_EQ(alloc.stats().used_blocks, 0u);
  EXPECT_EQ(index.stats().entries, 0u);
  EXPECT_EQ(index.AbortInsert(k).code(), StatusCode::kNotFound);
}

TEST(ChunkIndexTest, DuplicateInsertIsAlreadyExists) {
  BlockAllocator alloc(2, 64);
  ChunkIndex index(&alloc);
  ChunkKey k = K(7);
  ASSERT_TRUE(index.BeginInsert(k).ok());
  EXPECT_EQ(index.BeginInsert(k).status().code(), StatusCode::kAlreadyExists);
  ASSERT_TRUE(index.CommitInsert(k).ok());
  EXPECT_EQ(index.BeginInsert(k).status().code(), StatusCode::kAlreadyExists);
  EXPECT_EQ(index.CommitInsert(k).code(), StatusCode::kFailedPrecondition);
}

TEST(ChunkIndexTest, LookupStopsAtFirstMiss) {
  BlockAllocator alloc(8, 64);
  ChunkIndex index(&alloc);
  std::vector<ChunkKey> keys = {K(0), K(1), K(2), K(3)};
  for (int i : {0, 1, 3}) {
    ASSERT_TRUE(index.BeginInsert(keys[i]).ok());
    ASSERT_TRUE(index.CommitInsert(keys[i]).ok());
  }
  EXPECT_EQ(index.Lookup(keys.data(), keys.size()), 2u);
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

TEST(ChunkIndexTest, FullOfPinnedAndWritingRejectsWithoutBlocking) {
  BlockAllocator alloc(2, 64);
  ChunkIndex index(&alloc);
  ASSERT_TRUE(index.BeginInsert(K(0)).ok());  // WRITING
  ASSERT_TRUE(index.BeginInsert(K(1)).ok());
  ASSERT_TRUE(index.CommitInsert(K(1)).ok());
  std::vector<BlockId> blocks;
  ChunkKey k1 = K(1);
  ASSERT_EQ(index.Acquire(&k1, 1, &blocks), 1u);  // pinned
  auto r = index.BeginInsert(K(2));
  EXPECT_EQ(r.status().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(index.stats().insert_rejected, 1u);
  EXPECT_TRUE(index.Contains(K(1)));
  EXPECT_EQ(index.Erase(K(1)).code(), StatusCode::kFailedPrecondition);
  ASSERT_TRUE(index.Release(&k1, 1).ok());
  EXPECT_EQ(index.Release(&k1, 1).code(), StatusCode::kFailedPrecondition);
  ASSERT_TRUE(index.Erase(K(1)).ok());
  ASSERT_TRUE(index.AbortInsert(K(0)).ok());
  EXPECT_EQ(alloc.stats().used_blocks, 0u);
}

TEST(ChunkIndexTest, ConcurrentInsertLookupAcquireKeepsBlocksExclusive) {
  constexpr int kBlocks = 64;
  BlockAllocator alloc(kBlocks, 64);
  ChunkIndex index(&alloc);
  std::atomic<int> owners[kBlocks];
  for (auto& o : owners) o = 0;
  std::atomic<bool> fail{false};
  auto worker = [&](int seed) {
    std::mt19937 rng(seed);
    for (int it = 0; it < 20000; ++it) {
      ChunkKey k = K(rng() % 256);
      switch (rng() % 3) {
        case 0: {
          auto b = index.BeginInsert(k);
          if (!b.ok()) break;
          if (owners[*b].fetch_add(1) != 0) fail = true;  // a WRITING block is exclusive
          owners[*b].fetch_sub(1);
          if (rng() % 4 == 0) {
            (void)index.AbortInsert(k);
          } else {
            (void)index.CommitInsert(k);
          }
          break;
        }
        case 1:
          (void)index.Lookup(&k, 1);
          break;
        case 2: {
          std::vector<BlockId> blocks;
          if (index.Acquire(&k, 1, &blocks) == 1) {
            if (!alloc.IsAllocated(blocks[0])) fail = true;  // pinned block must stay allocated
            (void)index.Release(&k, 1);
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
  auto s = index.stats();
  EXPECT_EQ(s.writing, 0u);
  EXPECT_EQ(s.pinned, 0u);
  EXPECT_EQ(s.entries, alloc.stats().used_blocks);
  EXPECT_LE(s.entries, static_cast<size_t>(kBlocks));
}


bool AdmitSeenTwice(void*, const ChunkKey&, uint32_t seen) { return seen >= 2; }

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
  EXPECT_EQ(demotions[0].first, k0);
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

}  // namespace
}  // namespace kvtier
