// Only compiled into CUDA builds' code: the file is empty without CUDA.
#if KVTIER_HAVE_CUDA
#include "transfer/cuda_util.h"

#include <algorithm>
#include <cstdint>

namespace kvtier {

namespace {
constexpr size_t kMaxCopiesPerBatch = 1024;
}  // namespace

bool DriverHasMemcpyBatch() {
#if CUDART_VERSION >= 12080
  static const bool has = [] {
    int driver = 0;
    return cudaDriverGetVersion(&driver) == cudaSuccess && driver >= 12080;
  }();
  return has;
#else
  return false;
#endif
}

Status IssueMemcpys(void* const* dsts, const void* const* srcs, const size_t* sizes, size_t n,
                    cudaStream_t stream, std::atomic<bool>* batches_ok, unsigned flags) {
  size_t i = 0;
#if CUDART_VERSION >= 12080
  if (n > 1 && batches_ok->load(std::memory_order_relaxed)) {
    while (i < n) {
      const size_t count = std::min(kMaxCopiesPerBatch, n - i);
      cudaMemcpyAttributes attr{};
      attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
      attr.flags = flags;
      size_t attr_index = 0;
#if CUDART_VERSION >= 13000
      const cudaError_t err = cudaMemcpyBatchAsync(dsts + i, srcs + i, sizes + i, count, &attr,
                                                   &attr_index, 1, stream);
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
        // Not usable here: single copies from this batch on (a copy the failed batch already
        // queued is queued again; both write the same bytes).
        cudaGetLastError();
        batches_ok->store(false, std::memory_order_relaxed);
        break;
      }
      return CudaStatus(err, "cudaMemcpyBatchAsync of " + std::to_string(count) + " copies");
    }
  }
#else
  (void)batches_ok;
  (void)flags;
#endif
  for (; i < n; ++i) {
    KVTIER_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(dsts[i], srcs[i], sizes[i], cudaMemcpyDefault, stream),
        "cudaMemcpyAsync of " + std::to_string(sizes[i]) + " bytes");
  }
  return Status::OK();
}

}  // namespace kvtier
#endif
