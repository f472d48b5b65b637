// The CUDA copy engine's shared resources: pools of events and metadata buffers, one copy
// direction's streams and staging slots, and the core that the engine and its transfers share.
// Internal to csrc/transfer (the engine's .cc files); only compiled with CUDA.
#pragma once

#if KVTIER_HAVE_CUDA
#include <cuda_runtime_api.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/mutex.h"
#include "common/status.h"
#include "common/thread_annotations.h"
#include "transfer/cuda_util.h"
#include "transfer/gather_kernels.h"
#include "transfer/layout_plan.h"

namespace kvtier {
namespace cudacopy {

using Clock = std::chrono::steady_clock;

inline constexpr uint64_t kMetaMinBytes = uint64_t{64} << 10;
inline constexpr auto kDestroyIdleTimeout = std::chrono::seconds(30);
inline constexpr auto kWaitPollPeriod = std::chrono::milliseconds(5);

// Reusable events (timing off). Release takes no CUDA call, so any thread may return events.
class EventPool {
 public:
  EventPool() = default;
  EventPool(const EventPool&) = delete;
  EventPool& operator=(const EventPool&) = delete;
  ~EventPool() {
    for (cudaEvent_t e : free_) cudaEventDestroy(e);
  }
  // REQUIRES: the engine's device is current. All or nothing.
  Status Acquire(size_t n, std::vector<cudaEvent_t>* out) EXCLUDES(mu_) {
    std::vector<cudaEvent_t> got;
    {
      MutexLock lock(&mu_);
      while (got.size() < n && !free_.empty()) {
        got.push_back(free_.back());
        free_.pop_back();
      }
    }
    while (got.size() < n) {
      cudaEvent_t e = nullptr;
      cudaError_t err = cudaEventCreateWithFlags(&e, cudaEventDisableTiming);
      if (err != cudaSuccess) {
        Release(&got);
        return CudaStatus(err, "cudaEventCreateWithFlags");
      }
      got.push_back(e);
    }
    *out = std::move(got);
    return Status::OK();
  }
  void Release(std::vector<cudaEvent_t>* events) EXCLUDES(mu_) {
    MutexLock lock(&mu_);
    free_.insert(free_.end(), events->begin(), events->end());
    events->clear();
  }

 private:
  Mutex mu_;
  std::vector<cudaEvent_t> free_ GUARDED_BY(mu_);
};

// A transfer's kernel metadata: a pinned host buffer it is written into and the device buffer
// it is uploaded to, on the kernel stream, before the kernels that read it.
struct MetaBuffer {
  void* host = nullptr;
  void* device = nullptr;
  size_t capacity = 0;
};

// Metadata buffers, kept for reuse. Release takes no CUDA call (it runs in a host function).
class MetaPool {
 public:
  MetaPool() = default;
  MetaPool(const MetaPool&) = delete;
  MetaPool& operator=(const MetaPool&) = delete;
  ~MetaPool() {
    for (MetaBuffer& b : free_) {
      cudaFreeHost(b.host);
      cudaFree(b.device);
    }
  }
  // REQUIRES: the engine's device is current.
  Status Acquire(size_t bytes, MetaBuffer* out) EXCLUDES(mu_) {
    {
      MutexLock lock(&mu_);
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->capacity >= bytes && (best == free_.end() || it->capacity < best->capacity))
          best = it;
      }
      if (best != free_.end()) {
        *out = *best;
        free_.erase(best);
        return Status::OK();
      }
    }
    size_t capacity = kMetaMinBytes;
    while (capacity < bytes) capacity *= 2;
    MetaBuffer b;
    b.capacity = capacity;
    KVTIER_CUDA_RETURN_IF_ERROR(
        cudaHostAlloc(&b.host, capacity, cudaHostAllocDefault),
        "cudaHostAlloc of " + std::to_string(capacity) + " bytes of transfer metadata");
    cudaError_t err = cudaMalloc(&b.device, capacity);
    if (err != cudaSuccess) {
      cudaFreeHost(b.host);
      return CudaStatus(
          err, "cudaMalloc of " + std::to_string(capacity) + " bytes of transfer metadata");
    }
    *out = b;
    return Status::OK();
  }
  void Release(const MetaBuffer& b) EXCLUDES(mu_) {
    MutexLock lock(&mu_);
    free_.push_back(b);
  }

 private:
  Mutex mu_;
  std::vector<MetaBuffer> free_ GUARDED_BY(mu_);
};

// One copy direction's streams, staging slots and the events that order them.
struct Direction {
  Mutex mu;                                        // held while a transfer is enqueued
  cudaStream_t dma = nullptr;                      // cudaMemcpy*Async
  cudaStream_t kernel = nullptr;                   // gather/scatter kernels and metadata uploads
  void* slot[2] = {nullptr, nullptr};              // staging slots (staged method)
  cudaEvent_t slot_ready[2] = {nullptr, nullptr};  // the slot's bytes are ready for the next stage
  cudaEvent_t slot_free[2] = {nullptr, nullptr};   // the slot's last reader is done
  cudaEvent_t after = nullptr;                     // recorded on the caller's after_stream
  cudaEvent_t join = nullptr;  // one stream of the transfer waits for the other at the end
  int next_slot GUARDED_BY(mu) = 0;
};

// Everything the engine and its transfers share. Destroyed when the engine and every transfer
// are gone; it waits (with a deadline) for its streams to go idle before freeing anything.
struct CudaCore {
  LayoutPlan plan;
  TransferMethod method = TransferMethod::kAuto;
  int device = 0;
  int sm_count = 1;
  uint64_t slot_bytes = 0;
  std::atomic<bool> batch_copies{false};  // cudaMemcpyBatchAsync available and working
  SegmentDev* segments_dev = nullptr;
  void* staging = nullptr;
  Direction offload;  // gather: pages -> blobs
  Direction load;     // scatter: blobs -> pages
  std::unique_ptr<EventPool> events = std::make_unique<EventPool>();
  std::unique_ptr<MetaPool> meta = std::make_unique<MetaPool>();

  CudaCore() = default;
  CudaCore(const CudaCore&) = delete;
  CudaCore& operator=(const CudaCore&) = delete;
  ~CudaCore();

  bool WaitIdle(Clock::time_point deadline) {
    for (cudaStream_t s : {offload.dma, offload.kernel, load.dma, load.kernel}) {
      if (s == nullptr) continue;
      for (;;) {
        cudaError_t err = cudaStreamQuery(s);
        if (err == cudaSuccess) break;
        if (err != cudaErrorNotReady) {  // a broken context or an unloading runtime: nothing runs
          cudaGetLastError();
          break;
        }
        if (Clock::now() >= deadline) return false;
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    }
    return true;
  }
};

// Creates a direction's streams and events; with `staged`, its two slots are the `slot_bytes`
// halves starting at `staging`. REQUIRES: the engine's device is current.
Status CreateDirection(Direction* d, int kernel_priority, bool staged, char* staging,
                       uint64_t slot_bytes);

}  // namespace cudacopy
}  // namespace kvtier
#endif  // KVTIER_HAVE_CUDA
