// Small CUDA runtime helpers shared by the core's CUDA host code: a cudaError_t as a Status, and
// a scoped current-device switch. Only included where KVTIER_HAVE_CUDA is 1.
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "common/status.h"

namespace kvtier {

// A CUDA failure as a Status (and the runtime's per-thread error cleared).
inline Status CudaStatus(cudaError_t err, const std::string& what) {
  cudaGetLastError();
  const StatusCode code =
      err == cudaErrorMemoryAllocation ? StatusCode::kResourceExhausted : StatusCode::kIoError;
  return Status(code, what + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

#define KVTIER_CUDA_RETURN_IF_ERROR(expr, what)                           \
  do {                                                                    \
    cudaError_t _kvtier_err = (expr);                                     \
    if (_kvtier_err != cudaSuccess) return CudaStatus(_kvtier_err, what); \
  } while (0)

// Makes `device` current for the scope and restores the caller's device after.
class DeviceGuard {
 public:
  DeviceGuard() = default;
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(previous_);
  }
  Status Enter(int device) {
    KVTIER_CUDA_RETURN_IF_ERROR(cudaGetDevice(&previous_), "cudaGetDevice");
    // Always set: in a fresh thread cudaGetDevice says 0 but no context is bound yet, and calls
    // such as cudaPointerGetAttributes then see no device pointer for pinned memory.
    KVTIER_CUDA_RETURN_IF_ERROR(cudaSetDevice(device),
                                "cudaSetDevice(" + std::to_string(device) + ")");
    switched_ = previous_ != device;
    return Status::OK();
  }

 private:
  int previous_ = 0;
  bool switched_ = false;
};

}  // namespace kvtier
