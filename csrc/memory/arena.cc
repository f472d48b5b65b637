// Arena allocation: mmap for host memory (huge-page advised), cudaHostRegister to pin, cudaMalloc.
#include "memory/arena.h"

#include <sys/mman.h>

#include <cerrno>
#include <cstdint>
#include <cstring>

#if KVTIER_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

namespace kvtier {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;

size_t RoundUp(size_t n, size_t to) { return (n + to - 1) / to * to; }

}  // namespace

const char* ArenaKindName(ArenaKind kind) {
  switch (kind) {
    case ArenaKind::kDevice:
      return "device";
    case ArenaKind::kPinnedHost:
      return "pinned_host";
    case ArenaKind::kHost:
      return "host";
  }
  return "unknown";
}

StatusOr<std::unique_ptr<Arena>> Arena::Create(ArenaKind kind, size_t bytes, int device) {
  if (bytes == 0) return Status::InvalidArgument("arena size must be > 0 bytes");
  std::unique_ptr<Arena> arena(new Arena());
  arena->size_ = bytes;
  arena->kind_ = kind;
  arena->requested_kind_ = kind;
  arena->device_ = device;

  if (kind == ArenaKind::kDevice) {
#if KVTIER_HAVE_CUDA
    cudaError_t err = cudaSetDevice(device);
    if (err == cudaSuccess) err = cudaMalloc(&arena->base_, bytes);
    if (err != cudaSuccess) {
      cudaGetLastError();
      return Status::ResourceExhausted("cudaMalloc of " + std::to_string(bytes) + " bytes on GPU " +
                                       std::to_string(device) +
                                       " failed: " + cudaGetErrorString(err));
    }
    return arena;
#else
    return Status::Unavailable("device arena requested but kvtier was built without CUDA");
#endif
  }

  // Host memory (plain or pinned): mmap, 2 MiB aligned, advised to use transparent huge pages.
  // Refuse sizes whose round-up (plus the alignment slack) would wrap around size_t.
  if (bytes > SIZE_MAX - 2 * kHugePage) {
    return Status::ResourceExhausted("arena of " + std::to_string(bytes) + " bytes is too large");
  }
  const size_t mapped = RoundUp(bytes, kHugePage) + kHugePage;
  void* raw = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) {
    return Status::ResourceExhausted("mmap of " + std::to_string(bytes) +
                                     " bytes failed: " + std::strerror(errno));
  }
  // Trim to a 2 MiB aligned range so the huge-page advice can take effect.
  auto addr = reinterpret_cast<uintptr_t>(raw);
  uintptr_t aligned = RoundUp(addr, kHugePage);
  if (aligned > addr) munmap(raw, aligned - addr);
  size_t tail = (addr + mapped) - (aligned + RoundUp(bytes, kHugePage));
  if (tail > 0) munmap(reinterpret_cast<void*>(aligned + RoundUp(bytes, kHugePage)), tail);
  arena->base_ = reinterpret_cast<void*>(aligned);
  arena->mapped_size_ = RoundUp(bytes, kHugePage);
  arena->huge_pages_ = madvise(arena->base_, arena->mapped_size_, MADV_HUGEPAGE) == 0;

  if (kind == ArenaKind::kPinnedHost) {
#if KVTIER_HAVE_CUDA
    cudaError_t err = cudaHostRegister(arena->base_, arena->mapped_size_,
                                       cudaHostRegisterPortable | cudaHostRegisterMapped);
    if (err == cudaSuccess) {
      arena->registered_ = true;
      if (cudaHostGetDevicePointer(&arena->device_alias_, arena->base_, 0) != cudaSuccess) {
        cudaGetLastError();
        arena->device_alias_ = nullptr;
      }
    } else {
      cudaGetLastError();
      arena->kind_ = ArenaKind::kHost;
      arena->fallback_reason_ =
          std::string("pinned memory unavailable, using plain host memory: cudaHostRegister: ") +
          cudaGetErrorString(err);
    }
#else
    arena->kind_ = ArenaKind::kHost;
    arena->fallback_reason_ =
        "pinned memory unavailable, using plain host memory: built without CUDA";
#endif
  }
  return arena;
}

Arena::~Arena() {
  if (base_ == nullptr) return;
  if (requested_kind_ == ArenaKind::kDevice) {
#if KVTIER_HAVE_CUDA
    cudaSetDevice(device_);
    cudaFree(base_);
#endif
    return;
  }
#if KVTIER_HAVE_CUDA
  if (registered_) cudaHostUnregister(base_);
#endif
  munmap(base_, mapped_size_);
}

Status ProbePinnedMemory() {
  auto arena = Arena::Create(ArenaKind::kPinnedHost, size_t{1} << 20);
  if (!arena.ok()) return arena.status();
  if ((*arena)->kind() != ArenaKind::kPinnedHost) {
    return Status::Unavailable((*arena)->fallback_reason());
  }
  return Status::OK();
}

}  // namespace kvtier
