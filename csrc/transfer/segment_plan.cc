#include "transfer/segment_plan.h"

#include <algorithm>

namespace kvtier {

std::vector<SegmentLaunch> PlanSegmentLaunches(size_t count) {
  std::vector<SegmentLaunch> launches;
  size_t i = 0;
  while (i < count) {
    const size_t left = count - i;
    const bool small = i == 0 || left <= kSegmentSmallLaunch;
    const size_t n = std::min<size_t>(left, small ? kSegmentSmallLaunch : kSegmentLargeLaunch);
    launches.push_back(SegmentLaunch{i, n, small});
    i += n;
  }
  return launches;
}

uint64_t PlaceSegmentPieces(const CopySegment* segments, size_t count, SegmentPiece* pieces) {
  uint64_t end = 0;
  for (size_t i = 0; i < count; ++i) {
    const uint64_t begin = (end + 15) & ~uint64_t{15};
    pieces[i] = SegmentPiece{segments[i].src, segments[i].dst, segments[i].bytes, begin};
    end = begin + segments[i].bytes;
  }
  return end;
}

void ShareSegmentBytes(uint64_t total, uint64_t resident, uint64_t* share, uint64_t* grid) {
  resident = std::max<uint64_t>(resident, 1);
  uint64_t s = (total + resident - 1) / resident;
  s = s < kSegmentMinShareBytes ? kSegmentMinShareBytes : (s + 15) & ~uint64_t{15};
  *share = s;
  *grid = total == 0 ? 0 : (total + s - 1) / s;
}

}  // namespace kvtier
