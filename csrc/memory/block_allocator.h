// BlockAllocator: fixed-size blocks over one arena, with O(1) allocate/free and per-block pins.
//
// Thread safety: every method may be called from any thread at any time; one mutex guards the
// free list and block states, and every operation under it is O(1) (batch: O(n) for n blocks).
//
// Block life cycle and the pin protocol
//   FREE --Allocate/AllocateBatch--> ALLOCATED (pins = 0)
//   ALLOCATED --Pin--> pins + 1      (a transfer, reader or index entry is using the bytes)
//   ALLOCATED --Unpin--> pins - 1
//   ALLOCATED (pins == 0) --Free--> FREE
// A pinned block is never freed, so its bytes are never handed to another owner while in use.
//
//   Pin(id)
//     REQUIRES: `id` was returned by Allocate/AllocateBatch of this allocator and not yet freed.
//     Each successful Pin must be matched by exactly one Unpin.
//   Unpin(id)
//     REQUIRES: `id` is allocated and was pinned by the caller (pins > 0).
//   Free(id)
//     REQUIRES: `id` is allocated and pins == 0; the caller gives up every use of its bytes.
// A call that breaks a REQUIRES line returns InvalidArgument (unknown id) or FailedPrecondition
// (wrong state) and changes nothing: the allocator stays consistent for every other caller.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

#include "common/mutex.h"
#include "common/status.h"
#include "common/thread_annotations.h"

namespace kvtier {

using BlockId = uint32_t;

struct BlockAllocatorStats {
  size_t num_blocks = 0;
  size_t block_bytes = 0;
  size_t free_blocks = 0;
  size_t used_blocks = 0;
  size_t peak_used_blocks = 0;
  size_t pinned_blocks = 0;  // allocated blocks with pins > 0
  uint64_t allocations = 0;  // blocks handed out, total
  uint64_t frees = 0;
  uint64_t failed_allocations = 0;  // Allocate/AllocateBatch calls refused for lack of blocks
};

class BlockAllocator {
 public:
  // `num_blocks` blocks of `block_bytes` each. `base` is the start of the memory the blocks cut
  // (an Arena's base, at least num_blocks * block_bytes long), or nullptr for an allocator of ids
  // only (BlockAddress then returns nullptr).
  BlockAllocator(size_t num_blocks, size_t block_bytes, void* base = nullptr);
  BlockAllocator(const BlockAllocator&) = delete;
  BlockAllocator& operator=(const BlockAllocator&) = delete;

  // One free block; ResourceExhausted when none is left.
  StatusOr<BlockId> Allocate() EXCLUDES(mu_);
  // `n` blocks, all or nothing: on ResourceExhausted `out` is untouched and no block is taken.
  Status AllocateBatch(size_t n, std::vector<BlockId>* out) EXCLUDES(mu_);
  Status Free(BlockId id) EXCLUDES(mu_);
  // Frees every id or none: the batch is checked first, then applied.
  Status FreeBatch(const std::vector<BlockId>& ids) EXCLUDES(mu_);
  Status Pin(BlockId id) EXCLUDES(mu_);
  Status Unpin(BlockId id) EXCLUDES(mu_);

  // Pins of an allocated block; InvalidArgument/FailedPrecondition for an unknown or free id.
  StatusOr<uint32_t> PinCount(BlockId id) const EXCLUDES(mu_);
  bool IsAllocated(BlockId id) const EXCLUDES(mu_);

  void* BlockAddress(BlockId id) const {
    return base_ == nullptr ? nullptr : static_cast<char*>(base_) + size_t{id} * block_bytes_;
  }
  size_t num_blocks() const { return num_blocks_; }
  size_t block_bytes() const { return block_bytes_; }
  BlockAllocatorStats stats() const EXCLUDES(mu_);

 private:
  Status CheckAllocatedLocked(BlockId id) const REQUIRES_LOCK(mu_);

  const size_t num_blocks_;
  const size_t block_bytes_;
  void* const base_;

  mutable Mutex mu_;
  std::vector<BlockId> free_list_ GUARDED_BY(mu_);  // a stack: the most recently freed goes first
  std::vector<uint8_t> allocated_ GUARDED_BY(mu_);
  std::vector<uint32_t> pins_ GUARDED_BY(mu_);
  size_t pinned_blocks_ GUARDED_BY(mu_) = 0;
  size_t peak_used_ GUARDED_BY(mu_) = 0;
  uint64_t allocations_ GUARDED_BY(mu_) = 0;
  uint64_t frees_ GUARDED_BY(mu_) = 0;
  uint64_t failed_allocations_ GUARDED_BY(mu_) = 0;
};

}  // namespace kvtier
