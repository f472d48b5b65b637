// CpuTier: reserve -> copy -> commit (store) and acquire -> copy -> release (load).
#include "engine/cpu_tier.h"

#include <chrono>
#include <cstdio>
#include <string>

namespace kvtier {

StatusOr<std::unique_ptr<CpuTier>> CpuTier::Create(const LayoutDesc& layout, const CpuTierOptions& options) {
  KVTIER_RETURN_IF_ERROR(ValidateLayout(layout));
  const uint64_t blob = ChunkBlobBytes(layout);
  if (blob == 0) return Status::InvalidArgument("layout has zero bytes per chunk");
  const uint64_t blocks = options.capacity_bytes / blob;
  if (blocks == 0) {
    return Status::InvalidArgument("CPU tier capacity " + std::to_string(options.capacity_bytes) +
                                   " bytes is smaller than one chunk (" + std::to_string(blob) + " bytes)");
  }
  if (blocks > UINT32_MAX) return Status::InvalidArgument("CPU tier capacity holds more than 2^32 chunks");

  std::unique_ptr<CpuTier> tier(new CpuTier());
  tier->close_timeout_ms_ = options.close_timeout_ms;
  // Host layouts need no pinning; a GPU layout gets page-locked memory so DMA runs at PCIe speed.
  ArenaKind kind = layout.device >= 0 ? ArenaKind::kPinnedHost : ArenaKind::kHost;
  auto arena = Arena::Create(kind, blocks * blob, layout.device >= 0 ? layout.device : 0);
  if (!arena.ok()) return arena.status();
  tier->arena_ = std::move(arena).value();
  if (!tier->arena_->fallback_reason().empty()) {
    std::fprintf(stderr, "kvtier: warning: %s\n", tier->arena_->fallback_reason().c_str());
  }
  tier->allocator_ = std::make_unique<BlockAllocator>(blocks, blob, tier->arena_->base());
  tier->index_ = std::make_unique<ChunkIndex>(tier->allocator_.get());
  tier->num_pages_ = UINT64_MAX;
  for (const SegmentDesc& s : layout.segments) tier->num_pages_ = std::min(tier->num_pages_, s.num_pages);
  auto engine = CopyEngine::Create(layout, options.copy);
  if (!engine.ok()) return engine.status();
  tier->engine_ = std::move(engine).value();
  return tier;
}

CpuTier::~CpuTier() {
  Status s = Drain(close_timeout_ms_);
  if (!s.ok()) std::fprintf(stderr, "kvtier: CpuTier closing with copies in flight: %s\n", s.ToString().c_str());
  engine_.reset();  // synchronizes its streams / workers; callbacks still see a live index
}

Status CpuTier::CheckPages(const std::vector<uint32_t>& page_ids, size_t needed) const {
  if (page_ids.size() < needed) {
    return Status::InvalidArgument("page_ids has " + std::to_string(page_ids.size()) + " entries, " +
                                   std::to_string(needed) + " needed");
  }
  std::vector<uint8_t> seen(num_pages_ < (1u << 26) ? num_pages_ : 0, 0);
  for (size_t i = 0; i < needed; ++i) {
    if (page_ids[i] >= num_pages_) {
      return Status::InvalidArgument("page_ids[" + std::to_string(i) + "] = " + std::to_string(page_ids[i]) +
                                     " is out of range [0, " + std::to_string(num_pages_) + ")");
    }
    if (!seen.empty()) {
      if (seen[page_ids[i]]) {
        return Status::InvalidArgument("page_ids[" + std::to_string(i) + "] = " + std::to_string(page_ids[i]) +
                                       " is repeated");
      }
      seen[page_ids[i]] = 1;
    }
  }
  return Status::OK();
}

void CpuTier::FinishOp() {
  std::lock_guard<std::mutex> lock(inflight_mu_);
  if (--in_flight_ == 0) inflight_cv_.notify_all();
}

StatusOr<TierOp> CpuTier::Store(const ChunkKey* keys, size_t n, const std::vector<uint32_t>& page_ids,
                                uintptr_t after_stream) {
  const uint32_t ppc = pages_per_chunk();
  KVTIER_RETURN_IF_ERROR(CheckPages(page_ids, n * ppc));
  ++store_calls_;
  TierOp op;
  std::vector<ChunkKey> fresh;
  std::vector<uint32_t> pages;
  std::vector<void*> blobs;
  for (size_t i = 0; i < n; ++i) {
    StatusOr<BlockId> block = index_->BeginInsert(keys[i]);
    if (!block.ok()) {
      if (block.status().code() == StatusCode::kAlreadyExists) {
        ++op.already_cached;
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
  if (fresh.empty()) return op;

  {
    std::lock_guard<std::mutex> lock(inflight_mu_);
    ++in_flight_;
  }
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

size_t CpuTier::Lookup(const ChunkKey* keys, size_t n) { return index_->Lookup(keys, n); }

StatusOr<TierOp> CpuTier::Load(const ChunkKey* keys, size_t n, const std::vector<uint32_t>& page_ids,
                               uintptr_t after_stream) {
  const uint32_t ppc = pages_per_chunk();
  // Validate every page the caller offered before touching the index, so bad input changes nothing.
  KVTIER_RETURN_IF_ERROR(CheckPages(page_ids, std::min(page_ids.size(), n * ppc)));
  ++load_calls_;
  TierOp op;
  std::vector<BlockId> blocks;
  size_t hits = index_->Acquire(keys, std::min(n, page_ids.size() / ppc), &blocks);
  op.chunks = hits;
  if (hits == 0) return op;

  std::vector<ChunkKey> held(keys, keys + hits);
  std::vector<void*> blobs;
  blobs.reserve(hits);
  for (BlockId b : blocks) blobs.push_back(allocator_->BlockAddress(b));
  std::vector<uint32_t> pages(page_ids.begin(), page_ids.begin() + hits * ppc);
  {
    std::lock_guard<std::mutex> lock(inflight_mu_);
    ++in_flight_;
  }
  const uint64_t bytes = hits * blob_bytes();
  auto on_complete = [this, held, bytes](const Status& s) {
    (void)index_->Release(held.data(), held.size());
    if (s.ok()) {
      chunks_loaded_ += held.size();
      bytes_loaded_ += bytes;
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

Status CpuTier::Drain(int64_t timeout_ms) {
  std::unique_lock<std::mutex> lock(inflight_mu_);
  bool done = inflight_cv_.wait_for(lock, std::chrono::milliseconds(timeout_ms), [this] { return in_flight_ == 0; });
  if (!done) return Status::DeadlineExceeded(std::to_string(in_flight_) + " copies still in flight");
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
    std::lock_guard<std::mutex> lock(inflight_mu_);
    s.in_flight = in_flight_;
  }
  return s;
}

}  // namespace kvtier
