// Layout and request validation shared by the CPU and CUDA copy paths.
#include "transfer/layout_plan.h"

#include <algorithm>
#include <cstdio>
#include <limits>
#include <string>
#include <utility>

namespace kvtier {
namespace {

constexpr uint64_t kMaxPages = uint64_t{1} << 32;  // page ids are uint32

bool MulOverflows(uint64_t a, uint64_t b, uint64_t* out) {
  return __builtin_mul_overflow(a, b, out);
}
bool AddOverflows(uint64_t a, uint64_t b, uint64_t* out) {
  return __builtin_add_overflow(a, b, out);
}

std::string SegName(size_t s) { return "segment " + std::to_string(s); }

}  // namespace

std::string PointerString(uint64_t p) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(p));
  return buf;
}

const char* TransferMethodName(TransferMethod m) {
  switch (m) {
    case TransferMethod::kAuto:
      return "auto";
    case TransferMethod::kDirect:
      return "direct";
    case TransferMethod::kStaged:
      return "staged";
    case TransferMethod::kZeroCopy:
      return "zero_copy";
    case TransferMethod::kCpu:
      return "cpu";
  }
  return "unknown";
}

uint64_t ChunkBlobBytes(const LayoutDesc& layout) {
  uint64_t total = 0;
  for (const SegmentDesc& s : layout.segments) total += s.page_bytes * layout.pages_per_chunk;
  return total;
}

Status ValidateLayout(const LayoutDesc& layout) {
  if (layout.segments.empty()) return Status::InvalidArgument("layout has no segments");
  if (layout.segments.size() > std::numeric_limits<uint32_t>::max()) {
    return Status::InvalidArgument("layout has too many segments (" +
                                   std::to_string(layout.segments.size()) + ")");
  }
  if (layout.pages_per_chunk == 0)
    return Status::InvalidArgument("pages_per_chunk must be >= 1, got 0");
  if (layout.device < -1) {
    return Status::InvalidArgument("device must be -1 (host memory) or a GPU index, got " +
                                   std::to_string(layout.device));
  }
  uint64_t blob = 0;
  for (size_t i = 0; i < layout.segments.size(); ++i) {
    const SegmentDesc& s = layout.segments[i];
    if (s.base == 0) return Status::InvalidArgument(SegName(i) + ": base pointer is null");
    if (s.page_bytes == 0) return Status::InvalidArgument(SegName(i) + ": page_bytes must be > 0");
    if (s.num_pages == 0) return Status::InvalidArgument(SegName(i) + ": num_pages must be > 0");
    if (s.num_pages > kMaxPages) {
      return Status::InvalidArgument(SegName(i) + ": num_pages " + std::to_string(s.num_pages) +
                                     " exceeds 2^32 (page ids are 32-bit)");
    }
    if (s.num_pages > 1 && s.page_stride < s.page_bytes) {
      return Status::InvalidArgument(SegName(i) + ": page_stride " + std::to_string(s.page_stride) +
                                     " is smaller than page_bytes " + std::to_string(s.page_bytes) +
                                     " (pages would overlap)");
    }
    uint64_t span = 0, end = 0, slab = 0;
    if (MulOverflows(s.num_pages - 1, s.page_stride, &span) ||
        AddOverflows(span, s.page_bytes, &span) || AddOverflows(s.base, span, &end)) {
      return Status::InvalidArgument(SegName(i) +
                                     ": base + num_pages * page_stride overflows 64 bits");
    }
    if (MulOverflows(s.page_bytes, layout.pages_per_chunk, &slab) ||
        AddOverflows(blob, slab, &blob)) {
      return Status::InvalidArgument("the chunk blob size overflows 64 bits");
    }
  }
  if (!layout.layer_segments.empty()) {
    const size_t n = layout.segments.size();
    std::vector<int64_t> listed_in(n, -1);  // the last layer that listed segment s
    std::vector<bool> covered(n, false);
    for (size_t l = 0; l < layout.layer_segments.size(); ++l) {
      const auto& segs = layout.layer_segments[l];
      if (segs.empty())
        return Status::InvalidArgument("layer " + std::to_string(l) + " has no segments");
      for (uint32_t s : segs) {
        if (s >= n) {
          return Status::InvalidArgument("layer " + std::to_string(l) + " lists segment " +
                                         std::to_string(s) + ", but the layout has " +
                                         std::to_string(n) + " segments");
        }
        if (listed_in[s] == static_cast<int64_t>(l)) {
          return Status::InvalidArgument(SegName(s) + " is listed twice in layer " +
                                         std::to_string(l));
        }
        listed_in[s] = static_cast<int64_t>(l);
        covered[s] = true;
      }
    }
    for (size_t s = 0; s < n; ++s) {
      if (!covered[s])
        return Status::InvalidArgument(SegName(s) + " is in no layer of layer_segments");
    }
  }
  return Status::OK();
}

StatusOr<LayoutPlan> MakeLayoutPlan(const LayoutDesc& layout) {
  KVTIER_RETURN_IF_ERROR(ValidateLayout(layout));
  LayoutPlan plan;
  plan.layout = layout;
  const size_t n = layout.segments.size();
  if (layout.layer_segments.empty()) {
    std::vector<uint32_t> all(n);
    for (size_t s = 0; s < n; ++s) all[s] = static_cast<uint32_t>(s);
    plan.layers.push_back(std::move(all));
  } else {
    plan.layers = layout.layer_segments;
  }
  constexpr uint32_t kNone = ~uint32_t{0};
  plan.seg_group.assign(n, kNone);
  plan.layer_groups.resize(plan.layers.size());
  for (size_t l = 0; l < plan.layers.size(); ++l) {
    std::vector<uint32_t> fresh;
    for (uint32_t s : plan.layers[l]) {
      if (plan.seg_group[s] == kNone) fresh.push_back(s);
    }
    if (!fresh.empty()) {
      const uint32_t g = static_cast<uint32_t>(plan.groups.size());
      for (uint32_t s : fresh) plan.seg_group[s] = g;
      plan.groups.push_back(std::move(fresh));
    }
    std::vector<uint32_t>& lg = plan.layer_groups[l];
    for (uint32_t s : plan.layers[l]) lg.push_back(plan.seg_group[s]);
    std::sort(lg.begin(), lg.end());
    lg.erase(std::unique(lg.begin(), lg.end()), lg.end());
  }
  plan.group_layers.resize(plan.groups.size());
  for (size_t l = 0; l < plan.layers.size(); ++l) {
    for (uint32_t g : plan.layer_groups[l])
      plan.group_layers[g].push_back(static_cast<uint32_t>(l));
  }
  plan.seg_blob_offset.resize(n);
  plan.page_id_limit = kMaxPages;
  plan.min_page_bytes = std::numeric_limits<uint64_t>::max();
  uint64_t offset = 0;
  for (size_t s = 0; s < n; ++s) {
    const SegmentDesc& d = layout.segments[s];
    plan.seg_blob_offset[s] = offset;
    offset += d.page_bytes * layout.pages_per_chunk;
    plan.page_id_limit = std::min(plan.page_id_limit, d.num_pages);
    plan.min_page_bytes = std::min(plan.min_page_bytes, d.page_bytes);
    plan.max_page_bytes = std::max(plan.max_page_bytes, d.page_bytes);
  }
  plan.blob_bytes = offset;
  return plan;
}

Status ValidateTransferRequest(const LayoutPlan& plan, const std::vector<uint32_t>& page_ids,
                               const std::vector<void*>& blobs, bool writes_pages) {
  const uint64_t ppc = plan.pages_per_chunk();
  if (page_ids.size() != blobs.size() * ppc) {
    return Status::InvalidArgument("page_ids has " + std::to_string(page_ids.size()) +
                                   " entries, but " + std::to_string(blobs.size()) + " blobs of " +
                                   std::to_string(ppc) + " pages each need " +
                                   std::to_string(blobs.size() * ppc));
  }
  for (size_t c = 0; c < blobs.size(); ++c) {
    if (blobs[c] == nullptr)
      return Status::InvalidArgument("blobs[" + std::to_string(c) + "] is null");
  }
  for (size_t i = 0; i < page_ids.size(); ++i) {
    if (page_ids[i] >= plan.page_id_limit) {
      return Status::InvalidArgument("page id " + std::to_string(page_ids[i]) + " (page_ids[" +
                                     std::to_string(i) + "]) is out of range [0, " +
                                     std::to_string(plan.page_id_limit) + ")");
    }
  }
  if (writes_pages && page_ids.size() > 1) {
    std::vector<std::pair<uint32_t, uint32_t>> sorted(page_ids.size());
    for (size_t i = 0; i < page_ids.size(); ++i)
      sorted[i] = {page_ids[i], static_cast<uint32_t>(i)};
    std::sort(sorted.begin(), sorted.end());
    for (size_t i = 1; i < sorted.size(); ++i) {
      if (sorted[i].first == sorted[i - 1].first) {
        return Status::InvalidArgument("page id " + std::to_string(sorted[i].first) +
                                       " is repeated in the scatter (page_ids[" +
                                       std::to_string(sorted[i - 1].second) + "] and page_ids[" +
                                       std::to_string(sorted[i].second) +
                                       "]): two chunks would write the same page");
      }
    }
  }
  return Status::OK();
}

Status ValidateTimeout(int64_t timeout_ms) {
  if (timeout_ms < 0) {
    return Status::InvalidArgument("timeout must be >= 0, got " + std::to_string(timeout_ms) +
                                   " ms");
  }
  return Status::OK();
}

}  // namespace kvtier
