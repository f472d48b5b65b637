// BlockAllocator: a mutex-guarded free-list stack plus per-block allocated flags and pin counts.
#include "memory/block_allocator.h"

#include <string>

#include "common/mutex.h"

namespace kvtier {

BlockAllocator::BlockAllocator(size_t num_blocks, size_t block_bytes, void* base)
    : num_blocks_(num_blocks), block_bytes_(block_bytes), base_(base) {
  free_list_.reserve(num_blocks);
  // Lowest ids on top of the stack: a fresh allocator hands out 0, 1, 2, ... (easier to debug).
  for (size_t i = num_blocks; i > 0; --i) free_list_.push_back(static_cast<BlockId>(i - 1));
  allocated_.assign(num_blocks, 0);
  pins_.assign(num_blocks, 0);
}

Status BlockAllocator::CheckAllocatedLocked(BlockId id) const {
  if (id >= num_blocks_) {
    return Status::InvalidArgument("block id " + std::to_string(id) + " is out of range [0, " +
                                   std::to_string(num_blocks_) + ")");
  }
  if (!allocated_[id]) {
    return Status::FailedPrecondition("block " + std::to_string(id) +
                                      " is not allocated (already free)");
  }
  return Status::OK();
}

StatusOr<BlockId> BlockAllocator::Allocate() {
  MutexLock lock(&mu_);
  if (free_list_.empty()) {
    ++failed_allocations_;
    return Status::ResourceExhausted("all " + std::to_string(num_blocks_) + " blocks are in use");
  }
  BlockId id = free_list_.back();
  free_list_.pop_back();
  allocated_[id] = 1;
  ++allocations_;
  size_t used = num_blocks_ - free_list_.size();
  if (used > peak_used_) peak_used_ = used;
  return id;
}

Status BlockAllocator::AllocateBatch(size_t n, std::vector<BlockId>* out) {
  if (out == nullptr) return Status::InvalidArgument("AllocateBatch: out is null");
  MutexLock lock(&mu_);
  if (n > free_list_.size()) {
    ++failed_allocations_;
    return Status::ResourceExhausted("batch of " + std::to_string(n) + " blocks requested, " +
                                     std::to_string(free_list_.size()) + " free");
  }
  out->reserve(out->size() + n);
  for (size_t i = 0; i < n; ++i) {
    BlockId id = free_list_.back();
    free_list_.pop_back();
    allocated_[id] = 1;
    out->push_back(id);
  }
  allocations_ += n;
  size_t used = num_blocks_ - free_list_.size();
  if (used > peak_used_) peak_used_ = used;
  return Status::OK();
}

Status BlockAllocator::Free(BlockId id) {
  MutexLock lock(&mu_);
  KVTIER_RETURN_IF_ERROR(CheckAllocatedLocked(id));
  if (pins_[id] != 0) {
    return Status::FailedPrecondition("block " + std::to_string(id) + " is pinned (" +
                                      std::to_string(pins_[id]) + " pins) and cannot be freed");
  }
  allocated_[id] = 0;
  free_list_.push_back(id);
  ++frees_;
  return Status::OK();
}

Status BlockAllocator::FreeBatch(const std::vector<BlockId>& ids) {
  MutexLock lock(&mu_);
  // Validate the whole batch before changing anything; mark seen ids (2) to catch repeats.
  Status bad;
  size_t marked = 0;
  for (; marked < ids.size(); ++marked) {
    BlockId id = ids[marked];
    bad = CheckAllocatedLocked(id);
    if (!bad.ok()) break;
    if (allocated_[id] == 2) {
      bad = Status::FailedPrecondition("block " + std::to_string(id) +
                                       " appears twice in one FreeBatch");
      break;
    }
    if (pins_[id] != 0) {
      bad = Status::FailedPrecondition("block " + std::to_string(id) + " is pinned (" +
                                       std::to_string(pins_[id]) + " pins) and cannot be freed");
      break;
    }
    allocated_[id] = 2;
  }
  if (!bad.ok()) {
    for (size_t i = 0; i < marked; ++i) allocated_[ids[i]] = 1;
    return bad;
  }
  for (BlockId id : ids) {
    allocated_[id] = 0;
    free_list_.push_back(id);
  }
  frees_ += ids.size();
  return Status::OK();
}

Status BlockAllocator::Pin(BlockId id) {
  MutexLock lock(&mu_);
  KVTIER_RETURN_IF_ERROR(CheckAllocatedLocked(id));
  if (pins_[id]++ == 0) ++pinned_blocks_;
  return Status::OK();
}

Status BlockAllocator::Unpin(BlockId id) {
  MutexLock lock(&mu_);
  KVTIER_RETURN_IF_ERROR(CheckAllocatedLocked(id));
  if (pins_[id] == 0) {
    return Status::FailedPrecondition("block " + std::to_string(id) +
                                      " is not pinned (unpin without pin)");
  }
  if (--pins_[id] == 0) --pinned_blocks_;
  return Status::OK();
}

StatusOr<uint32_t> BlockAllocator::PinCount(BlockId id) const {
  MutexLock lock(&mu_);
  KVTIER_RETURN_IF_ERROR(CheckAllocatedLocked(id));
  return pins_[id];
}

bool BlockAllocator::IsAllocated(BlockId id) const {
  MutexLock lock(&mu_);
  return id < num_blocks_ && allocated_[id] != 0;
}

BlockAllocatorStats BlockAllocator::stats() const {
  MutexLock lock(&mu_);
  BlockAllocatorStats s;
  s.num_blocks = num_blocks_;
  s.block_bytes = block_bytes_;
  s.free_blocks = free_list_.size();
  s.used_blocks = num_blocks_ - free_list_.size();
  s.peak_used_blocks = peak_used_;
  s.pinned_blocks = pinned_blocks_;
  s.allocations = allocations_;
  s.frees = frees_;
  s.failed_allocations = failed_allocations_;
  return s;
}

}  // namespace kvtier
