// A transfer of the CUDA copy engine: its completion state (shared with the stream host
// function that ends it) and the Transfer handle the caller waits on. Internal to csrc/transfer;
// only compiled with CUDA.
#pragma once

#if KVTIER_HAVE_CUDA
#include <cuda_runtime_api.h>

#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "common/mutex.h"
#include "common/status.h"
#include "common/thread_annotations.h"
#include "transfer/copy_engine.h"
#include "transfer/cuda_resources.h"

namespace kvtier {
namespace cudacopy {

// What the completion host function needs; shared by it and the Transfer handle.
struct CudaTransferState {
  TransferCallback callback;
  MetaPool* meta_pool = nullptr;  // outlives every host function (see ~CudaCore)
  MetaBuffer meta;
  bool owns_meta = false;
  Status final_status;  // written before the host function is enqueued

  Mutex mu;
  CondVar cv;
  bool done GUARDED_BY(mu) = false;
  Status status GUARDED_BY(mu);

  // Runs once: returns the metadata buffer, runs the callback, then wakes the waiters.
  // Calls no CUDA API (it runs as a stream host function).
  void Complete() {
    if (owns_meta) meta_pool->Release(meta);
    owns_meta = false;
    if (callback) callback(final_status);
    {
      MutexLock lock(&mu);
      status = final_status;
      done = true;
    }
    cv.NotifyAll();
  }
};

// The host function that ends a transfer: `arg` is a heap `std::shared_ptr<CudaTransferState>`,
// owned (and deleted) by the call.
void CUDART_CB CompleteHostFn(void* arg);

class CudaTransfer final : public Transfer {
 public:
  CudaTransfer(std::shared_ptr<CudaCore> core, std::shared_ptr<CudaTransferState> state,
               TransferMethod method)
      : core_(std::move(core)), state_(std::move(state)), method_(method) {}
  ~CudaTransfer() override {
    if (!events_.empty()) core_->events->Release(&events_);
  }

  // Enqueue-time facts (written only before the handle is returned to the caller).
  std::vector<cudaEvent_t> events_;  // one per layer, then the final event
  std::vector<char> layer_recorded_;
  bool final_recorded_ = false;
  Status enqueue_status_;

  cudaEvent_t layer_event(int l) const { return events_[l]; }
  cudaEvent_t final_event() const { return events_.back(); }
  const std::shared_ptr<CudaTransferState>& state() const { return state_; }

  Status Wait(int64_t timeout_ms) override {
    KVTIER_RETURN_IF_ERROR(ValidateTimeout(timeout_ms));
    const Clock::time_point deadline = DeadlineAfter(timeout_ms);
    DeviceGuard guard;  // event queries from a fresh thread need the engine's context bound
    if (final_recorded_) KVTIER_RETURN_IF_ERROR(guard.Enter(core_->device));
    MutexLock lock(&state_->mu);
    for (;;) {
      if (state_->done) return state_->status;
      const Clock::time_point now = Clock::now();
      if (now >= deadline) {
        return Status::DeadlineExceeded("transfer not complete after " +
                                        std::to_string(timeout_ms) + " ms");
      }
      state_->cv.WaitUntil(lock, std::min(deadline, now + kWaitPollPeriod),
                           [this]() REQUIRES_LOCK(state_->mu) { return state_->done; });
      if (state_->done) return state_->status;
      if (final_recorded_) {
        // A fault on the device means the host function never runs: report it instead of waiting.
        lock.Unlock();
        const cudaError_t err = cudaEventQuery(final_event());
        lock.Lock();
        if (err != cudaSuccess && err != cudaErrorNotReady) {
          return CudaStatus(err, "the transfer failed on the device");
        }
      }
    }
  }

  Status WaitLayer(int layer, int64_t timeout_ms) override {
    KVTIER_RETURN_IF_ERROR(CheckLayer(layer));
    KVTIER_RETURN_IF_ERROR(ValidateTimeout(timeout_ms));
    // Never recorded: the transfer had no chunks, or failed before this layer was enqueued.
    if (!layer_recorded_[layer]) return Wait(timeout_ms);
    const Clock::time_point deadline = DeadlineAfter(timeout_ms);
    DeviceGuard guard;
    KVTIER_RETURN_IF_ERROR(guard.Enter(core_->device));
    auto sleep = std::chrono::microseconds(10);
    for (;;) {
      const cudaError_t err = cudaEventQuery(layer_event(layer));
      if (err == cudaSuccess) return Status::OK();
      if (err != cudaErrorNotReady)
        return CudaStatus(err, "layer " + std::to_string(layer) + " failed on the device");
      if (Clock::now() >= deadline) {
        return Status::DeadlineExceeded("layer " + std::to_string(layer) + " not complete after " +
                                        std::to_string(timeout_ms) + " ms");
      }
      std::this_thread::sleep_for(sleep);
      sleep = std::min(sleep * 2, std::chrono::microseconds(200));
    }
  }

  Status StreamWaitLayer(int layer, uintptr_t stream) override {
    KVTIER_RETURN_IF_ERROR(CheckLayer(layer));
    if (!layer_recorded_[layer]) return enqueue_status_;  // OK for a transfer of no chunks
    DeviceGuard guard;  // stream 0 means the engine device's legacy stream
    KVTIER_RETURN_IF_ERROR(guard.Enter(core_->device));
    KVTIER_CUDA_RETURN_IF_ERROR(
        cudaStreamWaitEvent(reinterpret_cast<cudaStream_t>(stream), layer_event(layer), 0),
        "cudaStreamWaitEvent on stream " + PointerString(stream) + " for layer " +
            std::to_string(layer));
    return Status::OK();
  }

  bool Done() const override {
    MutexLock lock(&state_->mu);
    return state_->done;
  }
  int num_layers() const override { return core_->plan.num_layers(); }
  TransferMethod method() const override { return method_; }

 private:
  Status CheckLayer(int layer) const {
    if (layer < 0 || layer >= num_layers()) {
      return Status::InvalidArgument("layer " + std::to_string(layer) + " is out of range [0, " +
                                     std::to_string(num_layers()) + ")");
    }
    return Status::OK();
  }

  std::shared_ptr<CudaCore> core_;
  std::shared_ptr<CudaTransferState> state_;
  TransferMethod method_;
};

}  // namespace cudacopy
}  // namespace kvtier
#endif  // KVTIER_HAVE_CUDA
