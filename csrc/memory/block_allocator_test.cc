// Tests for BlockAllocator: exhaustion, all-or-nothing batches, every REQUIRES violation leaving
// the allocator intact, pins, peak, addresses, and a multi-threaded ownership stress test.
#include "memory/block_allocator.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "memory/arena.h"

namespace kvtier {
namespace {

void ExpectSameStats(const BlockAllocatorStats& a, const BlockAllocatorStats& b) {
  EXPECT_EQ(a.num_blocks, b.num_blocks);
  EXPECT_EQ(a.block_bytes, b.block_bytes);
  EXPECT_EQ(a.free_blocks, b.free_blocks);
  EXPECT_EQ(a.used_blocks, b.used_blocks);
  EXPECT_EQ(a.peak_used_blocks, b.peak_used_blocks);
  EXPECT_EQ(a.pinned_blocks, b.pinned_blocks);
  EXPECT_EQ(a.allocations, b.allocations);
  EXPECT_EQ(a.frees, b.frees);
  EXPECT_EQ(a.failed_allocations, b.failed_allocations);
}

// Takes every free block one at a time; the ids must be distinct, in range, and together with
// `held` cover [0, num_blocks) exactly once. Proves no error path lost or duplicated a block.
void ExpectEveryBlockExactlyOnce(BlockAllocator& alloc, const std::vector<BlockId>& held) {
  std::vector<int> seen(alloc.num_blocks(), 0);
  for (BlockId id : held) {
    ASSERT_LT(id, alloc.num_blocks());
    ++seen[id];
  }
  const size_t free_before = alloc.stats().free_blocks;
  size_t taken = 0;
  for (;;) {
    auto id = alloc.Allocate();
    if (!id.ok()) {
      EXPECT_EQ(id.status().code(), StatusCode::kResourceExhausted);
      break;
    }
    ASSERT_LT(*id, alloc.num_blocks());
    ++seen[*id];
    ++taken;
    ASSERT_LE(taken, alloc.num_blocks()) << "allocator handed out more blocks than it has";
  }
  EXPECT_EQ(taken, free_before);
  for (size_t i = 0; i < seen.size(); ++i) EXPECT_EQ(seen[i], 1) << "block " << i;
}

TEST(BlockAllocatorTest, FreshAllocatorHandsOutLowIdsFirst) {
  BlockAllocator alloc(4, 64);
  for (BlockId want = 0; want < 4; ++want) {
    auto id = alloc.Allocate();
    ASSERT_TRUE(id.ok());
    EXPECT_EQ(*id, want);
  }
}

TEST(BlockAllocatorTest, AllocateAllThenExhaust) {
  constexpr size_t kBlocks = 16;
  BlockAllocator alloc(kBlocks, 4096);
  std::set<BlockId> ids;
  for (size_t i = 0; i < kBlocks; ++i) {
    auto id = alloc.Allocate();
    ASSERT_TRUE(id.ok()) << id.status().ToString();
    EXPECT_TRUE(ids.insert(*id).second) << "id " << *id << " handed out twice";
    EXPECT_TRUE(alloc.IsAllocated(*id));
  }
  EXPECT_EQ(ids.size(), kBlocks);
  EXPECT_EQ(*ids.rbegin(), kBlocks - 1);

  for (int i = 1; i <= 3; ++i) {
    auto extra = alloc.Allocate();
    ASSERT_FALSE(extra.ok());
    EXPECT_EQ(extra.status().code(), StatusCode::kResourceExhausted);
    EXPECT_EQ(alloc.stats().failed_allocations, static_cast<uint64_t>(i));
  }
  BlockAllocatorStats s = alloc.stats();
  EXPECT_EQ(s.num_blocks, kBlocks);
  EXPECT_EQ(s.block_bytes, 4096u);
  EXPECT_EQ(s.free_blocks, 0u);
  EXPECT_EQ(s.used_blocks, kBlocks);
  EXPECT_EQ(s.peak_used_blocks, kBlocks);
  EXPECT_EQ(s.allocations, kBlocks);
  EXPECT_EQ(s.frees, 0u);

  // A freed block is usable again, and it is the one handed out next (stack order).
  ASSERT_TRUE(alloc.Free(5).ok());
  auto again = alloc.Allocate();
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, 5u);
}

TEST(BlockAllocatorTest, AllocateBatchAppendsAndIsAllOrNothing) {
  BlockAllocator alloc(10, 64);
  std::vector<BlockId> out = {999};  // existing contents are kept, new ids appended
  ASSERT_TRUE(alloc.AllocateBatch(4, &out).ok());
  ASSERT_EQ(out.size(), 5u);
  EXPECT_EQ(out[0], 999u);
  std::set<BlockId> distinct(out.begin() + 1, out.end());
  EXPECT_EQ(distinct.size(), 4u);
  EXPECT_EQ(alloc.stats().allocations, 4u);
  EXPECT_EQ(alloc.stats().peak_used_blocks, 4u);

  // 7 requested with 6 free: refused, nothing taken, `out` untouched, one failure counted.
  const BlockAllocatorStats before = alloc.stats();
  const std::vector<BlockId> out_before = out;
  Status s = alloc.AllocateBatch(7, &out);
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(out, out_before);
  BlockAllocatorStats after = alloc.stats();
  EXPECT_EQ(after.failed_allocations, before.failed_allocations + 1);
  after.failed_allocations = before.failed_allocations;
  ExpectSameStats(after, before);

  // Exactly the free count succeeds.
  std::vector<BlockId> rest;
  ASSERT_TRUE(alloc.AllocateBatch(6, &rest).ok());
  EXPECT_EQ(rest.size(), 6u);
  EXPECT_EQ(alloc.stats().free_blocks, 0u);
  EXPECT_EQ(alloc.stats().peak_used_blocks, 10u);

  // With nothing free, a batch of 1 fails too; a batch of 0 succeeds and takes nothing.
  std::vector<BlockId> none;
  EXPECT_EQ(alloc.AllocateBatch(1, &none).code(), StatusCode::kResourceExhausted);
  EXPECT_TRUE(none.empty());
  EXPECT_TRUE(alloc.AllocateBatch(0, &none).ok());
  EXPECT_TRUE(none.empty());
  EXPECT_EQ(alloc.stats().failed_allocations, 2u);
  EXPECT_EQ(alloc.stats().allocations, 10u);

  std::vector<BlockId> all(out.begin() + 1, out.end());
  all.insert(all.end(), rest.begin(), rest.end());
  std::sort(all.begin(), all.end());
  for (BlockId i = 0; i < 10; ++i) EXPECT_EQ(all[i], i);
}

TEST(BlockAllocatorTest, AllocateBatchWithNullOutIsInvalidArgument) {
  BlockAllocator alloc(4, 64);
  EXPECT_EQ(alloc.AllocateBatch(1, nullptr).code(), StatusCode::kInvalidArgument);
  BlockAllocatorStats s = alloc.stats();
  EXPECT_EQ(s.free_blocks, 4u);
  EXPECT_EQ(s.failed_allocations, 0u);
}

TEST(BlockAllocatorTest, ExhaustedBatchLeavesEveryBlockAccountedFor) {
  BlockAllocator alloc(8, 64);
  std::vector<BlockId> held;
  ASSERT_TRUE(alloc.AllocateBatch(5, &held).ok());
  std::vector<BlockId> out;
  EXPECT_EQ(alloc.AllocateBatch(100, &out).code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(alloc.AllocateBatch(4, &out).code(), StatusCode::kResourceExhausted);
  EXPECT_TRUE(out.empty());
  ExpectEveryBlockExactlyOnce(alloc, held);
}

// Each misuse returns its code and changes nothing; afterwards every block is still there once.
class BlockAllocatorErrorTest : public ::testing::Test {
 protected:
  static constexpr size_t kBlocks = 12;
  BlockAllocatorErrorTest() : alloc_(kBlocks, 128) {
    Status s = alloc_.AllocateBatch(6, &held_);
    EXPECT_TRUE(s.ok());
    EXPECT_TRUE(alloc_.Free(held_.back()).ok());  // one freed block to misuse
    freed_ = held_.back();
    held_.pop_back();
    EXPECT_TRUE(alloc_.Pin(held_[0]).ok());
    pinned_ = held_[0];
    before_ = alloc_.stats();
  }

  void ExpectUnchanged() {
    ExpectSameStats(alloc_.stats(), before_);
    for (BlockId id : held_) EXPECT_TRUE(alloc_.IsAllocated(id)) << id;
    EXPECT_FALSE(alloc_.IsAllocated(freed_));
    auto pins = alloc_.PinCount(pinned_);
    ASSERT_TRUE(pins.ok());
    EXPECT_EQ(*pins, 1u);
  }

  void TearDown() override {
    ExpectUnchanged();
    // The pinned block goes back through the normal protocol; then check the whole id space.
    ASSERT_TRUE(alloc_.Unpin(pinned_).ok());
    ASSERT_TRUE(alloc_.FreeBatch(held_).ok());
    EXPECT_EQ(alloc_.stats().used_blocks, 0u);
    EXPECT_EQ(alloc_.stats().pinned_blocks, 0u);
    ExpectEveryBlockExactlyOnce(alloc_, {});
  }

  BlockAllocator alloc_;
  std::vector<BlockId> held_;
  BlockId freed_ = 0;
  BlockId pinned_ = 0;
  BlockAllocatorStats before_;
};

TEST_F(BlockAllocatorErrorTest, DoubleFreeIsFailedPrecondition) {
  Status s = alloc_.Free(freed_);
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s.ToString();
  EXPECT_NE(s.message().find(std::to_string(freed_)), std::string::npos) << s.message();
}

TEST_F(BlockAllocatorErrorTest, NeverAllocatedIdIsFailedPrecondition) {
  EXPECT_EQ(alloc_.Free(kBlocks - 1).code(), StatusCode::kFailedPrecondition);
}

TEST_F(BlockAllocatorErrorTest, ForeignIdOutOfRangeIsInvalidArgument) {
  for (BlockId id : {BlockId{kBlocks}, BlockId{kBlocks + 1}, BlockId{1000}, UINT32_MAX}) {
    SCOPED_TRACE(id);
    EXPECT_EQ(alloc_.Free(id).code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(alloc_.FreeBatch({id}).code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(alloc_.Pin(id).code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(alloc_.Unpin(id).code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(alloc_.PinCount(id).status().code(), StatusCode::kInvalidArgument);
    EXPECT_FALSE(alloc_.IsAllocated(id));
  }
}

TEST_F(BlockAllocatorErrorTest, FreeOfPinnedBlockIsFailedPrecondition) {
  EXPECT_EQ(alloc_.Free(pinned_).code(), StatusCode::kFailedPrecondition);
}

TEST_F(BlockAllocatorErrorTest, FreeBatchWithDuplicateIdFreesNothing) {
  std::vector<BlockId> batch = {held_[1], held_[2], held_[1]};
  EXPECT_EQ(alloc_.FreeBatch(batch).code(), StatusCode::kFailedPrecondition);
  // Adjacent duplicates, and a duplicate as the first and last element.
  EXPECT_EQ(alloc_.FreeBatch({held_[3], held_[3]}).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(alloc_.FreeBatch({held_[4], held_[2], held_[3], held_[4]}).code(),
            StatusCode::kFailedPrecondition);
}

TEST_F(BlockAllocatorErrorTest, FreeBatchWithABadIdLateFreesNothing) {
  // Valid ids first so a non-atomic implementation would already have freed them.
  EXPECT_EQ(alloc_.FreeBatch({held_[1], held_[2], freed_}).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(alloc_.FreeBatch({held_[1], held_[2], BlockId{kBlocks + 5}}).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(alloc_.FreeBatch({held_[1], held_[2], pinned_}).code(),
            StatusCode::kFailedPrecondition);
  EXPECT_EQ(alloc_.FreeBatch({pinned_, held_[1]}).code(), StatusCode::kFailedPrecondition);
}

TEST_F(BlockAllocatorErrorTest, FailedFreeBatchDoesNotPoisonTheNextOne) {
  // The batch check marks ids while it scans; a failed scan must clear every mark, or a later
  // batch would see a false duplicate (or a block would stay half-freed).
  EXPECT_FALSE(alloc_.FreeBatch({held_[1], held_[2], held_[3], freed_}).ok());
  EXPECT_TRUE(alloc_.IsAllocated(held_[1]));
  ASSERT_TRUE(alloc_.FreeBatch({held_[1], held_[2], held_[3]}).ok());
  // Hand them back so the fixture's invariants hold (held_ must stay allocated).
  std::vector<BlockId> back;
  ASSERT_TRUE(alloc_.AllocateBatch(3, &back).ok());
  std::sort(back.begin(), back.end());
  std::vector<BlockId> want = {held_[1], held_[2], held_[3]};
  std::sort(want.begin(), want.end());
  EXPECT_EQ(back, want);
  before_.allocations += 3;
  before_.frees += 3;
}

TEST_F(BlockAllocatorErrorTest, PinAndUnpinOfFreeBlockAreFailedPrecondition) {
  EXPECT_EQ(alloc_.Pin(freed_).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(alloc_.Unpin(freed_).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(alloc_.PinCount(freed_).status().code(), StatusCode::kFailedPrecondition);
}

TEST_F(BlockAllocatorErrorTest, UnpinOfUnpinnedBlockIsFailedPrecondition) {
  EXPECT_EQ(alloc_.Unpin(held_[1]).code(), StatusCode::kFailedPrecondition);
}

TEST_F(BlockAllocatorErrorTest, EmptyFreeBatchIsANoOp) { EXPECT_TRUE(alloc_.FreeBatch({}).ok()); }

TEST(BlockAllocatorTest, PinCountsAndPinnedBlocks) {
  BlockAllocator alloc(4, 64);
  std::vector<BlockId> ids;
  ASSERT_TRUE(alloc.AllocateBatch(3, &ids).ok());
  const BlockId a = ids[0], b = ids[1];

  for (int i = 0; i < 3; ++i) ASSERT_TRUE(alloc.Pin(a).ok());
  ASSERT_TRUE(alloc.Pin(b).ok());
  EXPECT_EQ(alloc.PinCount(a).value(), 3u);
  EXPECT_EQ(alloc.PinCount(b).value(), 1u);
  EXPECT_EQ(alloc.PinCount(ids[2]).value(), 0u);
  EXPECT_EQ(alloc.stats().pinned_blocks, 2u);  // blocks, not pins

  ASSERT_TRUE(alloc.Unpin(a).ok());
  ASSERT_TRUE(alloc.Unpin(a).ok());
  EXPECT_EQ(alloc.PinCount(a).value(), 1u);
  EXPECT_EQ(alloc.stats().pinned_blocks, 2u);
  EXPECT_EQ(alloc.Free(a).code(), StatusCode::kFailedPrecondition);
  ASSERT_TRUE(alloc.Unpin(a).ok());
  EXPECT_EQ(alloc.stats().pinned_blocks, 1u);
  EXPECT_EQ(alloc.Unpin(a).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(alloc.PinCount(a).value(), 0u);
  EXPECT_EQ(alloc.stats().pinned_blocks, 1u);

  ASSERT_TRUE(alloc.Free(a).ok());
  ASSERT_TRUE(alloc.Unpin(b).ok());
  EXPECT_EQ(alloc.stats().pinned_blocks, 0u);
  ASSERT_TRUE(alloc.FreeBatch({b, ids[2]}).ok());

  // A block freed and reallocated starts with no pins.
  auto again = alloc.Allocate();
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(alloc.PinCount(*again).value(), 0u);
}

TEST(BlockAllocatorTest, PeakTracksTheHighWaterMark) {
  BlockAllocator alloc(10, 64);
  std::vector<BlockId> ids;
  ASSERT_TRUE(alloc.AllocateBatch(5, &ids).ok());
  EXPECT_EQ(alloc.stats().peak_used_blocks, 5u);
  ASSERT_TRUE(alloc.FreeBatch({ids[0], ids[1], ids[2]}).ok());
  EXPECT_EQ(alloc.stats().used_blocks, 2u);
  EXPECT_EQ(alloc.stats().peak_used_blocks, 5u);
  ASSERT_TRUE(alloc.Allocate().ok());
  EXPECT_EQ(alloc.stats().peak_used_blocks, 5u);
  std::vector<BlockId> more;
  ASSERT_TRUE(alloc.AllocateBatch(4, &more).ok());
  EXPECT_EQ(alloc.stats().used_blocks, 7u);
  EXPECT_EQ(alloc.stats().peak_used_blocks, 7u);
  // A refused batch does not raise the peak.
  EXPECT_FALSE(alloc.AllocateBatch(4, &more).ok());
  EXPECT_EQ(alloc.stats().peak_used_blocks, 7u);
  EXPECT_EQ(alloc.stats().allocations, 10u);
  EXPECT_EQ(alloc.stats().frees, 3u);
}

TEST(BlockAllocatorTest, BlockAddressArithmetic) {
  constexpr size_t kBlocks = 7, kBytes = 4096 + 64;
  auto arena = Arena::Create(ArenaKind::kHost, kBlocks * kBytes);
  ASSERT_TRUE(arena.ok());
  char* base = static_cast<char*>((*arena)->base());
  BlockAllocator alloc(kBlocks, kBytes, base);
  for (BlockId id = 0; id < kBlocks; ++id) {
    EXPECT_EQ(alloc.BlockAddress(id), base + size_t{id} * kBytes);
  }
  // The last block ends exactly at the arena's end.
  EXPECT_EQ(static_cast<char*>(alloc.BlockAddress(kBlocks - 1)) + kBytes, base + (*arena)->size());
  EXPECT_EQ(alloc.num_blocks(), kBlocks);
  EXPECT_EQ(alloc.block_bytes(), kBytes);

  // Large ids do not overflow 32-bit arithmetic.
  BlockAllocator big(5001, size_t{1} << 20, reinterpret_cast<void*>(uintptr_t{1} << 40));
  EXPECT_EQ(reinterpret_cast<uintptr_t>(big.BlockAddress(BlockId{5000})),
            (uintptr_t{1} << 40) + uintptr_t{5000} * (uintptr_t{1} << 20));

  BlockAllocator ids_only(4, 64);
  for (BlockId id = 0; id < 4; ++id) EXPECT_EQ(ids_only.BlockAddress(id), nullptr);
}

// Stress: 8 threads allocate, batch-allocate, pin, unpin and free at random on one allocator whose
// blocks are real memory. Each thread stamps the bytes it owns and checks them before freeing, and
// a shared ownership table proves no block is ever held by two threads at once.
TEST(BlockAllocatorStressTest, ThreadsNeverShareABlock) {
  constexpr int kThreads = 8;
  constexpr int kIterations = 100000;
  constexpr size_t kBlocks = 96;  // few enough that exhaustion happens often
  constexpr size_t kBytes = 256;
  auto arena = Arena::Create(ArenaKind::kHost, kBlocks * kBytes);
  ASSERT_TRUE(arena.ok());
  BlockAllocator alloc(kBlocks, kBytes, (*arena)->base());

  std::vector<std::atomic<int>> owner(kBlocks);
  for (auto& o : owner) o.store(-1);
  std::atomic<uint64_t> allocated_total{0}, freed_total{0}, failed_total{0};
  std::atomic<int> violations{0};

  struct Owned {
    BlockId id;
    uint64_t seq;
    uint32_t pins;
  };

  auto stamp = [&](BlockId id, uint32_t tid, uint64_t seq) {
    auto* p = static_cast<unsigned char*>(alloc.BlockAddress(id));
    for (size_t off = 0; off + 12 <= kBytes; off += 12) {
      std::memcpy(p + off, &tid, 4);
      std::memcpy(p + off + 4, &seq, 8);
    }
  };
  auto stamp_ok = [&](BlockId id, uint32_t tid, uint64_t seq) {
    const auto* p = static_cast<const unsigned char*>(alloc.BlockAddress(id));
    for (size_t off = 0; off + 12 <= kBytes; off += 12) {
      uint32_t t;
      uint64_t s;
      std::memcpy(&t, p + off, 4);
      std::memcpy(&s, p + off + 4, 8);
      if (t != tid || s != seq) return false;
    }
    return true;
  };

  auto worker = [&](int tid) {
    std::mt19937_64 rng(0x9E3779B97F4A7C15ull * (tid + 1));
    std::vector<Owned> mine;
    uint64_t seq = 0;
    uint64_t allocated = 0, freed = 0, failed = 0;

    auto take = [&](BlockId id) {
      int expected = -1;
      if (!owner[id].compare_exchange_strong(expected, tid)) {
        ++violations;
        ADD_FAILURE() << "thread " << tid << " got block " << id << " owned by thread " << expected;
      }
      stamp(id, static_cast<uint32_t>(tid), ++seq);
      mine.push_back({id, seq, 0});
      ++allocated;
    };
    // Verifies the stamp and gives up ownership; the caller then frees the block.
    auto release = [&](const Owned& o) {
      if (!stamp_ok(o.id, static_cast<uint32_t>(tid), o.seq)) {
        ++violations;
        ADD_FAILURE() << "thread " << tid << ": bytes of block " << o.id << " were overwritten";
      }
      int expected = tid;
      if (!owner[o.id].compare_exchange_strong(expected, -1)) {
        ++violations;
        ADD_FAILURE() << "thread " << tid << " freeing block " << o.id << " owned by " << expected;
      }
    };

    for (int it = 0; it < kIterations; ++it) {
      const int op = static_cast<int>(rng() % 100);
      if (op < 25) {
        auto id = alloc.Allocate();
        if (id.ok()) {
          take(*id);
        } else {
          EXPECT_EQ(id.status().code(), StatusCode::kResourceExhausted);
          ++failed;
        }
      } else if (op < 40) {
        const size_t n = 1 + rng() % 8;
        std::vector<BlockId> got;
        Status s = alloc.AllocateBatch(n, &got);
        if (s.ok()) {
          EXPECT_EQ(got.size(), n);
          for (BlockId id : got) take(id);
        } else {
          EXPECT_EQ(s.code(), StatusCode::kResourceExhausted);
          EXPECT_TRUE(got.empty());
          ++failed;
        }
      } else if (op < 52 && !mine.empty()) {
        Owned& o = mine[rng() % mine.size()];
        EXPECT_TRUE(alloc.Pin(o.id).ok());
        ++o.pins;
      } else if (op < 64 && !mine.empty()) {
        Owned& o = mine[rng() % mine.size()];
        Status s = alloc.Unpin(o.id);
        if (o.pins > 0) {
          EXPECT_TRUE(s.ok()) << s.ToString();
          --o.pins;
        } else {
          EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition);
        }
      } else if (op < 84 && !mine.empty()) {
        const size_t i = rng() % mine.size();
        Owned o = mine[i];
        if (o.pins > 0) {
          EXPECT_EQ(alloc.Free(o.id).code(), StatusCode::kFailedPrecondition);
          continue;
        }
        release(o);
        mine[i] = mine.back();
        mine.pop_back();
        Status s = alloc.Free(o.id);
        EXPECT_TRUE(s.ok()) << s.ToString();
        ++freed;
      } else if (!mine.empty()) {
        // Free every unpinned block this thread holds, in one batch.
        std::vector<BlockId> batch;
        std::vector<Owned> keep;
        for (const Owned& o : mine) {
          if (o.pins == 0) {
            release(o);
            batch.push_back(o.id);
          } else {
            keep.push_back(o);
          }
        }
        mine.swap(keep);
        Status s = alloc.FreeBatch(batch);
        EXPECT_TRUE(s.ok()) << s.ToString();
        freed += batch.size();
      }
      if (violations.load(std::memory_order_relaxed) > 0) break;
    }

    // Drain: unpin and free everything still held.
    std::vector<BlockId> batch;
    for (const Owned& o : mine) {
      for (uint32_t p = 0; p < o.pins; ++p) EXPECT_TRUE(alloc.Unpin(o.id).ok());
      release(o);
      batch.push_back(o.id);
    }
    EXPECT_TRUE(alloc.FreeBatch(batch).ok());
    freed += batch.size();

    allocated_total += allocated;
    freed_total += freed;
    failed_total += failed;
  };

  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) threads.emplace_back(worker, t);
  for (auto& t : threads) t.join();

  EXPECT_EQ(violations.load(), 0);
  for (size_t i = 0; i < kBlocks; ++i) EXPECT_EQ(owner[i].load(), -1) << "block " << i;
  BlockAllocatorStats s = alloc.stats();
  EXPECT_EQ(s.used_blocks, 0u);
  EXPECT_EQ(s.free_blocks, kBlocks);
  EXPECT_EQ(s.pinned_blocks, 0u);
  EXPECT_EQ(s.allocations, allocated_total.load());
  EXPECT_EQ(s.frees, freed_total.load());
  EXPECT_EQ(s.allocations, s.frees);
  EXPECT_EQ(s.failed_allocations, failed_total.load());
  EXPECT_GT(s.failed_allocations, 0u) << "the test should have exhausted the allocator";
  EXPECT_LE(s.peak_used_blocks, kBlocks);
  EXPECT_GT(s.allocations, uint64_t{kThreads} * 1000);
  ExpectEveryBlockExactlyOnce(alloc, {});
}

}  // namespace
}  // namespace kvtier
