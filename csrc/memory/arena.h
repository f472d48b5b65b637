// Arenas: the one up-front allocation behind each memory tier (device, pinned host, plain host).
//
// Thread safety: an Arena is immutable after Create(); any thread may read its fields.
// An Arena owns its memory and frees it in the destructor; it cannot be copied or moved.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "common/status.h"

namespace kvtier {

enum class ArenaKind : int {
  kDevice = 0,      // cudaMalloc on one GPU
  kPinnedHost = 1,  // page-locked host memory, registered with CUDA (mapped for zero-copy kernels)
  kHost = 2,        // plain (pageable) host memory, page aligned
};

const char* ArenaKindName(ArenaKind kind);

class Arena {
 public:
  // Allocates `bytes` of `kind` memory at once. For kPinnedHost without a usable driver, the arena
  // falls back to kHost memory: kind() then reports kHost and fallback_reason() says why.
  // Host memory is 2 MiB aligned (huge pages where the kernel grants them) so O_DIRECT I/O and
  // DMA can use it directly. `device` selects the GPU for kDevice.
  static StatusOr<std::unique_ptr<Arena>> Create(ArenaKind kind, size_t bytes, int device = 0);

  ~Arena();
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  void* base() const { return base_; }
  size_t size() const { return size_; }
  ArenaKind kind() const { return kind_; }
  ArenaKind requested_kind() const { return requested_kind_; }
  int device() const { return device_; }
  // Non-empty when the arena is not of the requested kind (e.g. pinned -> plain without a driver).
  const std::string& fallback_reason() const { return fallback_reason_; }
  // For kPinnedHost: the device pointer aliasing base() (mapped pinned memory), else nullptr.
  void* device_alias() const { return device_alias_; }
  bool huge_pages() const { return huge_pages_; }

 private:
  Arena() = default;

  void* base_ = nullptr;
  size_t size_ = 0;
  size_t mapped_size_ = 0;
  ArenaKind kind_ = ArenaKind::kHost;
  ArenaKind requested_kind_ = ArenaKind::kHost;
  int device_ = 0;
  std::string fallback_reason_;
  void* device_alias_ = nullptr;
  bool huge_pages_ = false;
  bool registered_ = false;
};

// Whether pinned host memory can be allocated here; on failure the reason (no driver, ...).
Status ProbePinnedMemory();

}  // namespace kvtier
