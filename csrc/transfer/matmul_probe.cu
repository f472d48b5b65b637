// The bench's matmul probe: 128x128 block tiles, 8 warps of 64x32, WMMA bf16 -> fp32.
#include <cuda_bf16.h>
#include <mma.h>

#include "transfer/matmul_probe.h"

namespace kvtier {
namespace {

constexpr int kBm = 128, kBn = 128, kBk = 32, kPad = 8, kThreads = 256;

__global__ void __launch_bounds__(kThreads)
    MatmulProbeKernel(const __nv_bfloat16* a, const __nv_bfloat16* b, float* c, int n) {
  using namespace nvcuda;
  __shared__ __align__(32) __nv_bfloat16 as[kBm][kBk + kPad];
  __shared__ __align__(32) __nv_bfloat16 bs[kBk][kBn + kPad];
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int wm = warp / 4;  // 2 x 4 warps: 64 rows x 32 columns each
  const int wn = warp % 4;
  const int row0 = blockIdx.y * kBm;
  const int col0 = blockIdx.x * kBn;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
  for (auto& r : acc) {
    for (auto& f : r) wmma::fill_fragment(f, 0.0f);
  }
  for (int k0 = 0; k0 < n; k0 += kBk) {
    for (int i = tid; i < kBm * kBk / 8; i += kThreads) {  // 16-byte loads
      const int r = i / (kBk / 8), cc = (i % (kBk / 8)) * 8;
      *reinterpret_cast<uint4*>(&as[r][cc]) =
          *reinterpret_cast<const uint4*>(a + static_cast<size_t>(row0 + r) * n + k0 + cc);
    }
    for (int i = tid; i < kBk * kBn / 8; i += kThreads) {
      const int r = i / (kBn / 8), cc = (i % (kBn / 8)) * 8;
      *reinterpret_cast<uint4*>(&bs[r][cc]) =
          *reinterpret_cast<const uint4*>(b + static_cast<size_t>(k0 + r) * n + col0 + cc);
    }
    __syncthreads();
    for (int kk = 0; kk < kBk; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa[4];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fb[2];
      for (int i = 0; i < 4; ++i)
        wmma::load_matrix_sync(fa[i], &as[wm * 64 + i * 16][kk], kBk + kPad);
      for (int j = 0; j < 2; ++j)
        wmma::load_matrix_sync(fb[j], &bs[kk][wn * 32 + j * 16], kBn + kPad);
      for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
    }
    __syncthreads();
  }
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 2; ++j) {
      float* out = c + static_cast<size_t>(row0 + wm * 64 + i * 16) * n + col0 + wn * 32 + j * 16;
      wmma::store_matrix_sync(out, acc[i][j], n, wmma::mem_row_major);
    }
  }
}

}  // namespace

cudaError_t LaunchMatmulProbe(const void* a, const void* b, float* c, int n, cudaStream_t stream) {
  if (n <= 0 || n % kBm != 0) return cudaErrorInvalidValue;
  const __nv_bfloat16* pa = static_cast<const __nv_bfloat16*>(a);
  const __nv_bfloat16* pb = static_cast<const __nv_bfloat16*>(b);
  void* args[] = {&pa, &pb, &c, &n};
  return cudaLaunchKernel(reinterpret_cast<const void*>(&MatmulProbeKernel), dim3(n / kBn, n / kBm),
                          dim3(kThreads), args, 0, stream);
}

}  // namespace kvtier
