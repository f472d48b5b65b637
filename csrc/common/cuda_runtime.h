// Thin, driver-optional access to the CUDA runtime: whether a GPU is usable here, and its
// properties. Every function is callable in a build without CUDA and on a machine without a driver.
#pragma once

#include <string>
#include <vector>

#include "common/status.h"

namespace kvtier {

struct GpuInfo {
  int index = 0;
  std::string name;
  size_t total_memory = 0;
  int compute_capability_major = 0;
  int compute_capability_minor = 0;
  std::string pci_bus_id;
};

// True when CUDA code was compiled into this build.
bool CudaCompiled();
// CUDA runtime version this build was compiled against (e.g. 13000), 0 without CUDA.
int CudaRuntimeVersion();
// GPUs usable at run time. Unavailable (with the runtime's reason) when there is no driver or GPU.
StatusOr<std::vector<GpuInfo>> ListGpus();
// Number of usable GPUs; 0 when none (never an error).
int GpuCount();

}  // namespace kvtier
