// A compute-bound bf16 matmul (tensor cores, shared-memory tiles) standing in for the model: the
// copy bench times it alone and beside each copy method to measure how much a copy slows compute.
// Not a fast GEMM, a steady one. Only available where KVTIER_HAVE_CUDA is 1.
#pragma once

#include <cuda_runtime_api.h>

namespace kvtier {

// c[n x n] (fp32) = a[n x n] * b[n x n] (bf16, row-major), all device memory, on `stream`.
// REQUIRES: n % 128 == 0. Returns the launch's error.
cudaError_t LaunchMatmulProbe(const void* a, const void* b, float* c, int n, cudaStream_t stream);

}  // namespace kvtier
