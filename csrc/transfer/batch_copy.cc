#include "transfer/batch_copy.h"

#if KVTIER_HAVE_CUDA
#include <algorithm>
#include <cstdint>
#include <string>

#include "transfer/cuda_util.h"

namespace kvtier {

Status QueueCopies(void* const* dsts, const void* const* srcs, const size_t* sizes, size_t n,
                   cudaStream_t stream, std::atomic<bool>* batches_usable) {
  size_t i = 0;
#if CUDART_VERSION >= 12080
  const bool try_batches =
      n > 1 && (batches_usable == nullptr || batches_usable->load(std::memory_order_relaxed));
  while (try_batches && i < n) {
    const size_t count = std::min(kMaxCopiesPerBatch, n - i);
    cudaMemcpyAttributes attr{};
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
    size_t attr_index = 0;
#if CUDART_VERSION >= 13000
    const cudaError_t err =
        cudaMemcpyBatchAsync(dsts + i, srcs + i, sizes + i, count, &attr, &attr_index, 1, stream);
#else
    size_t fail_index = SIZE_MAX;
    const cudaError_t err = cudaMemcpyBatchAsync(dsts + i, srcs + i, sizes + i, count, &attr,
                                                 &attr_index, 1, &fail_index, stream);
#endif
    if (err == cudaSuccess) {
      i += count;
      continue;
    }
    if (err == cudaErrorNotSupported || err == cudaErrorInvalidValue ||
        err == cudaErrorCallRequiresNewerDriver) {
      cudaGetLastError();
      if (batches_usable != nullptr) batches_usable->store(false, std::memory_order_relaxed);
      break;
    }
    return CudaStatus(err, "cudaMemcpyBatchAsync of " + std::to_string(count) + " copies");
  }
#else
  (void)batches_usable;
#endif
  for (; i < n; ++i) {
    KVTIER_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(dsts[i], srcs[i], sizes[i], cudaMemcpyDefault, stream),
        "cudaMemcpyAsync of " + std::to_string(sizes[i]) + " bytes");
  }
  return Status::OK();
}

}  // namespace kvtier
#endif  // KVTIER_HAVE_CUDA
