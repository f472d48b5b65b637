// Driver-optional CUDA device discovery (no-ops in a build without CUDA).
#include "common/cuda_runtime.h"

#if KVTIER_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

namespace kvtier {

bool CudaCompiled() { return KVTIER_HAVE_CUDA; }

int CudaRuntimeVersion() {
#if KVTIER_HAVE_CUDA
  return CUDART_VERSION;
#else
  return 0;
#endif
}

StatusOr<std::vector<GpuInfo>> ListGpus() {
#if KVTIER_HAVE_CUDA
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls are not confused by it
    return Status::Unavailable(std::string("no usable CUDA device: ") + cudaGetErrorString(err));
  }
  std::vector<GpuInfo> gpus;
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) continue;
    GpuInfo info;
    info.index = i;
    info.name = prop.name;
    info.total_memory = prop.totalGlobalMem;
    info.compute_capability_major = prop.major;
    info.compute_capability_minor = prop.minor;
    char bus[32] = {0};
    if (cudaDeviceGetPCIBusId(bus, sizeof(bus), i) == cudaSuccess) info.pci_bus_id = bus;
    gpus.push_back(std::move(info));
  }
  return gpus;
#else
  return Status::Unavailable("kvtier was built without CUDA");
#endif
}

int GpuCount() {
  auto gpus = ListGpus();
  return gpus.ok() ? static_cast<int>(gpus->size()) : 0;
}

}  // namespace kvtier
