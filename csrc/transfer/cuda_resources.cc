#include "transfer/cuda_resources.h"

#if KVTIER_HAVE_CUDA
namespace kvtier {
namespace cudacopy {

CudaCore::~CudaCore() {
  DeviceGuard guard;
  if (!guard.Enter(device).ok()) return;
  if (!WaitIdle(Clock::now() + kDestroyIdleTimeout)) {
    // Work still queued may use these buffers (and a host function the metadata pool): leak them
    // rather than free memory in use.
    (void)events.release();
    (void)meta.release();
    return;
  }
  for (Direction* d : {&offload, &load}) {
    for (cudaEvent_t e : {d->slot_ready[0], d->slot_ready[1], d->slot_free[0], d->slot_free[1],
                          d->after, d->join}) {
      if (e != nullptr) cudaEventDestroy(e);
    }
    if (d->dma != nullptr) cudaStreamDestroy(d->dma);
    if (d->kernel != nullptr) cudaStreamDestroy(d->kernel);
  }
  if (staging != nullptr) cudaFree(staging);
  if (segments_dev != nullptr) cudaFree(segments_dev);
  events.reset();
  meta.reset();
  cudaGetLastError();
}

Status CreateDirection(Direction* d, int kernel_priority, bool staged, char* staging,
                       uint64_t slot_bytes) {
  KVTIER_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&d->dma, cudaStreamNonBlocking),
                              "cudaStreamCreate");
  // Kernels are short; a high priority lets them slip between the model's blocks.
  KVTIER_CUDA_RETURN_IF_ERROR(
      cudaStreamCreateWithPriority(&d->kernel, cudaStreamNonBlocking, kernel_priority),
      "cudaStreamCreateWithPriority");
  for (cudaEvent_t* e : {&d->slot_ready[0], &d->slot_ready[1], &d->slot_free[0], &d->slot_free[1],
                         &d->after, &d->join}) {
    KVTIER_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(e, cudaEventDisableTiming),
                                "cudaEventCreate");
  }
  if (staged) {
    d->slot[0] = staging;
    d->slot[1] = staging + slot_bytes;
  }
  return Status::OK();
}

}  // namespace cudacopy
}  // namespace kvtier
#endif  // KVTIER_HAVE_CUDA
