// The segment copy kernel's arithmetic, on the host: launches cover the segments in order, and
// the blocks of a launch copy every byte of every piece exactly once, keeping 16-byte alignment
// (ForEachBlockPart is the function the kernel runs).
#include "transfer/segment_plan.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <utility>
#include <vector>

namespace kvtier {
namespace {

TEST(SegmentPlan, LaunchesStartSmallAndCoverEverySegmentInOrder) {
  for (size_t count : {0, 1, 63, 64, 65, 1000, 1064, 1065, 1100, 2100, 5000}) {
    const std::vector<SegmentLaunch> launches = PlanSegmentLaunches(count);
    size_t next = 0;
    for (size_t i = 0; i < launches.size(); ++i) {
      const SegmentLaunch& l = launches[i];
      EXPECT_EQ(l.first, next) << count;
      EXPECT_GT(l.count, 0u) << count;
      EXPECT_LE(l.count, l.small ? kSegmentSmallLaunch : kSegmentLargeLaunch) << count;
      if (i == 0) EXPECT_TRUE(l.small) << count;  // the first launch is the cheap one
      next += l.count;
    }
    EXPECT_EQ(next, count);
  }
  EXPECT_EQ(PlanSegmentLaunches(1065).size(), 3u);  // 64 + 1000 + 1 (small)
}

TEST(SegmentPlan, SharesAreAlignedAtLeastTheMinimumAndOneWave) {
  for (uint64_t resident : {1, 132, 528, 2048}) {
    for (uint64_t total : {1ull, 15ull, 16ull, 32768ull, 32769ull, 1ull << 20, 512ull << 20,
                           (512ull << 20) + 7, 64ull << 30}) {
      uint64_t share = 0, grid = 0;
      ShareSegmentBytes(total, resident, &share, &grid);
      EXPECT_EQ(share % 16, 0u);
      EXPECT_GE(share, kSegmentMinShareBytes);
      EXPECT_LE(grid, resident);
      EXPECT_GE(grid * share, total);
      EXPECT_LT((grid - 1) * share, total);  // no block without bytes
    }
  }
  uint64_t share = 0, grid = 0;
  ShareSegmentBytes(0, 528, &share, &grid);
  EXPECT_EQ(grid, 0u);
}

// Every byte of every piece copied once: the parts the blocks visit, per piece, sorted, tile
// [0, bytes) without gaps or overlaps. Where a piece's ends are 16-byte aligned and its length a
// multiple of 16, so is every part (the kernel's vector path).
void CheckCoverage(const std::vector<CopySegment>& segs, uint64_t resident) {
  std::vector<SegmentPiece> pieces(segs.size());
  const uint64_t total = PlaceSegmentPieces(segs.data(), segs.size(), pieces.data());
  for (size_t k = 0; k < pieces.size(); ++k) {
    EXPECT_EQ(pieces[k].begin % 16, 0u);
    if (k > 0) EXPECT_GE(pieces[k].begin, pieces[k - 1].begin + pieces[k - 1].bytes);
  }
  uint64_t share = 0, grid = 0;
  ShareSegmentBytes(total, resident, &share, &grid);
  std::vector<std::vector<std::pair<uint64_t, uint64_t>>> parts(pieces.size());
  for (uint64_t b = 0; b < grid; ++b) {
    ForEachBlockPart(pieces.data(), static_cast<uint32_t>(pieces.size()), total, share, b,
                     [&](uint32_t k, uint64_t off, uint64_t n) {
                       ASSERT_LT(k, pieces.size());
                       ASSERT_GT(n, 0u);
                       parts[k].push_back({off, n});
                     });
  }
  for (size_t k = 0; k < pieces.size(); ++k) {
    auto& p = parts[k];
    std::sort(p.begin(), p.end());
    uint64_t at = 0;
    for (const auto& [off, n] : p) {
      EXPECT_EQ(off, at) << "piece " << k << ": a gap or an overlap";
      at = off + n;
      const bool aligned = (segs[k].src | segs[k].dst) % 16 == 0 && segs[k].bytes % 16 == 0;
      if (aligned) EXPECT_EQ((off | n) % 16, 0u) << "piece " << k;
    }
    EXPECT_EQ(at, segs[k].bytes) << "piece " << k;
  }
}

TEST(SegmentPlan, BlocksCopyEveryByteOnce) {
  std::mt19937_64 rng(7);
  for (int trial = 0; trial < 300; ++trial) {
    const size_t n = 1 + rng() % 80;
    std::vector<CopySegment> segs(n);
    for (size_t i = 0; i < n; ++i) {
      uint64_t bytes = 0;
      switch (rng() % 4) {
        case 0:
          bytes = 1 + rng() % 40;
          break;  // a few page ids
        case 1:
          bytes = (1 + rng() % 64) * 32768;
          break;  // pages
        case 2:
          bytes = 1 + rng() % (3 << 20);
          break;  // odd lengths
        default:
          bytes = (1 + rng() % 8) * (512 << 10);
          break;  // chunks' page runs
      }
      const uint64_t align = rng() % 3 == 0 ? 1 + rng() % 15 : 0;
      segs[i] = {(1ull << 40) + i * (64ull << 20) + align, (1ull << 41) + i * (64ull << 20), bytes};
    }
    for (uint64_t resident : {1, 7, 132, 528}) CheckCoverage(segs, resident);
  }
  // The bench's copy: 1024 ranges of 512 KiB, on an H100's 528 resident blocks.
  std::vector<CopySegment> segs(kSegmentLargeLaunch);
  for (size_t i = 0; i < segs.size(); ++i) {
    segs[i] = {(1ull << 40) + i * (1ull << 20), (1ull << 41) + i * (1ull << 20), 512 << 10};
  }
  CheckCoverage(segs, 528);
}

}  // namespace
}  // namespace kvtier
