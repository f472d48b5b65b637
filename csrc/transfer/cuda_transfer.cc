#include "transfer/cuda_transfer.h"

#if KVTIER_HAVE_CUDA
namespace kvtier {
namespace cudacopy {

void CUDART_CB CompleteHostFn(void* arg) {
  std::unique_ptr<std::shared_ptr<CudaTransferState>> holder(
      static_cast<std::shared_ptr<CudaTransferState>*>(arg));
  (*holder)->Complete();
}

}  // namespace cudacopy
}  // namespace kvtier
#endif  // KVTIER_HAVE_CUDA
