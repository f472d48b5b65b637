// LayoutPlan: a validated layout with the offsets every copy path derives from it, and the checks
// a gather or scatter request passes before anything starts. Internal to csrc/transfer.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"
#include "transfer/copy_engine.h"

namespace kvtier {

// Layers may share segments (a cross-layer pool lists its one segment in every layer), so copies
// are organised by copy group: the segments in the order layers first list them, a new group per
// layer that lists new ones. Each segment is copied once; layer l is complete when every group
// holding one of its segments is.
struct LayoutPlan {
  LayoutDesc layout;
  // layout.layer_segments, or one layer of every segment when the layout lists none.
  std::vector<std::vector<uint32_t>> layers;
  std::vector<std::vector<uint32_t>> groups;        // copy groups: a partition of the segments
  std::vector<std::vector<uint32_t>> layer_groups;  // the groups layer l needs, ascending
  std::vector<std::vector<uint32_t>> group_layers;  // the layers that need group g
  std::vector<uint32_t> seg_group;                  // the group of segment s
  std::vector<uint64_t> seg_blob_offset;  // byte offset of segment s inside a chunk's blob
  uint64_t blob_bytes = 0;
  uint64_t page_id_limit = 0;  // page ids must be below this (the smallest num_pages)
  uint64_t min_page_bytes = 0;
  uint64_t max_page_bytes = 0;

  uint32_t pages_per_chunk() const { return layout.pages_per_chunk; }
  size_t num_segments() const { return layout.segments.size(); }
  int num_layers() const { return static_cast<int>(layers.size()); }
};

// ValidateLayout, then the derived offsets.
StatusOr<LayoutPlan> MakeLayoutPlan(const LayoutDesc& layout);

// Checks one request against the plan; InvalidArgument naming the offending value, else OK.
//   page_ids.size() == blobs.size() * pages_per_chunk; every page id < page_id_limit; no null blob;
//   for a scatter (`writes_pages`), no page id twice (two chunks would write the same page).
Status ValidateTransferRequest(const LayoutPlan& plan, const std::vector<uint32_t>& page_ids,
                               const std::vector<void*>& blobs, bool writes_pages);

// A wait's timeout: InvalidArgument when negative.
Status ValidateTimeout(int64_t timeout_ms);

// The steady-clock time `timeout_ms` from now (clamped so huge timeouts cannot overflow).
inline std::chrono::steady_clock::time_point DeadlineAfter(int64_t timeout_ms) {
  constexpr int64_t kMaxMs = int64_t{1} << 40;  // about 35 years
  return std::chrono::steady_clock::now() +
         std::chrono::milliseconds(timeout_ms < kMaxMs ? timeout_ms : kMaxMs);
}

// Formats a pointer as 0x... for messages.
std::string PointerString(uint64_t p);

}  // namespace kvtier
