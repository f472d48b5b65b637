#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cfloat>
#include <cstdint>

#include "codec/fp8_rows_kernel.h"

namespace kvtier {
namespace {

constexpr int kThreads = 256;      // 8 warps a block, one row a warp
constexpr float kFp8Max = 448.0f;  // e4m3fn's largest finite value

__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }
__device__ __forceinline__ float ToFloat(float v) { return v; }

template <typename T>
__device__ __forceinline__ T FromFloat(float v);  // round to nearest even, as torch's casts
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half FromFloat(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ float FromFloat(float v) {
  return v;
}

// max that keeps a NaN (as torch's amax does): a NaN of a row must reach its scale.
__device__ __forceinline__ float NanMax(float a, float b) { return (a != a || a > b) ? a : b; }

__host__ __device__ uint64_t TotalRows(const Fp8Rows& g) { return g.chunks * g.rows; }

// The scale a row of largest magnitude `amax` stores (S) and divides by (float): amax / 448 in
// float32, at least the smallest normal float32, rounded up to S so the row's largest value fits.
template <typename S>
__device__ __forceinline__ float StoredScale(float amax, S* stored);
template <>
__device__ __forceinline__ float StoredScale(float amax, float* stored) {
  *stored = fmaxf(__fdiv_rn(amax, kFp8Max), FLT_MIN);
  return *stored;
}
template <>
__device__ __forceinline__ float StoredScale(float amax, __nv_bfloat16* stored) {
  const float scale = fmaxf(__fdiv_rn(amax, kFp8Max), FLT_MIN);
  __nv_bfloat16 b = __float2bfloat16_rn(scale);
  if (__bfloat162float(b) < scale) b = __ushort_as_bfloat16(__bfloat16_as_ushort(b) + 1);
  *stored = b;
  return __bfloat162float(b);
}

// Chunk c's header, and zeros between its scales and its payload, by the warp of its row 0.
template <typename S>
__device__ __forceinline__ void WriteHeader(const Fp8Rows& g, uint8_t* blob, int lane) {
  const auto* header = reinterpret_cast<const uint8_t*>(g.header);
  for (uint64_t i = lane; i < g.header_bytes; i += 32) blob[i] = header[i];
  for (uint64_t i = g.scale_offset + g.rows * sizeof(S) + lane; i < g.payload_offset; i += 32) {
    blob[i] = 0;
  }
}

template <typename T, typename S>
__global__ void Fp8EncodeKernel(uint64_t raw, uint8_t* __restrict__ blobs, uint8_t* __restrict__ ok,
                                Fp8Rows g) {
  const uint64_t row = (static_cast<uint64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= TotalRows(g)) return;  // whole warps: a row is one warp's
  const uint64_t chunk = row / g.rows, r = row % g.rows;
  const T* x = reinterpret_cast<const T*>(Fp8RawRow(g, raw, chunk, r, g.row_elems * sizeof(T)));
  uint8_t* blob = blobs + chunk * g.blob_stride;
  if (r == 0 && g.header_bytes) WriteHeader<S>(g, blob, lane);
  float amax = 0.0f;
  for (uint32_t i = lane; i < g.row_elems; i += 32) amax = NanMax(amax, fabsf(ToFloat(x[i])));
  for (int off = 16; off > 0; off >>= 1)
    amax = NanMax(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  if (!isfinite(amax)) {
    if (lane == 0) ok[chunk] = 0;
    return;
  }
  S stored;
  const float scale = StoredScale(amax, &stored);
  if (lane == 0) reinterpret_cast<S*>(blob + g.scale_offset)[r] = stored;
  uint8_t* q = blob + g.payload_offset + r * g.row_elems;
  for (uint32_t i = lane; i < g.row_elems; i += 32) {
    const float v = fminf(fmaxf(__fdiv_rn(ToFloat(x[i]), scale), -kFp8Max), kFp8Max);
    q[i] = __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
  }
}

// A decode's header check (one block): the leading blobs whose header is g.header's, written
// to *g.decoded, and *g.stop set where one is not (none where *g.stop was set already).
__global__ void Fp8CheckKernel(const uint8_t* __restrict__ blobs, Fp8Rows g) {
  __shared__ unsigned long long first_bad;
  if (threadIdx.x == 0) first_bad = g.chunks;
  __syncthreads();
  const auto* header = reinterpret_cast<const uint8_t*>(g.header);
  for (uint64_t i = threadIdx.x; i < g.chunks * g.header_bytes; i += blockDim.x) {
    const uint64_t c = i / g.header_bytes, b = i % g.header_bytes;
    if (blobs[c * g.blob_stride + b] != header[b]) atomicMin(&first_bad, c);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    auto* stop = reinterpret_cast<uint32_t*>(g.stop);
    const uint64_t n = *stop ? 0 : first_bad;
    if (n < g.chunks) *stop = 1;
    *reinterpret_cast<uint32_t*>(g.decoded) = static_cast<uint32_t>(n);
  }
}

template <typename T, typename S>
__global__ void Fp8DecodeKernel(const uint8_t* __restrict__ blobs, uint64_t raw, Fp8Rows g) {
  const uint64_t row = (static_cast<uint64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= TotalRows(g)) return;
  const uint64_t chunk = row / g.rows, r = row % g.rows;
  if (g.header_bytes && chunk >= *reinterpret_cast<const uint32_t*>(g.decoded)) return;
  const uint8_t* blob = blobs + chunk * g.blob_stride;
  const float scale = ToFloat(reinterpret_cast<const S*>(blob + g.scale_offset)[r]);
  const uint8_t* q = blob + g.payload_offset + r * g.row_elems;
  T* x = reinterpret_cast<T*>(Fp8RawRow(g, raw, chunk, r, g.row_elems * sizeof(T)));
  for (uint32_t i = lane; i < g.row_elems; i += 32) {
    const float v = __half2float(__half(__nv_cvt_fp8_to_halfraw(q[i], __NV_E4M3)));
    x[i] = FromFloat<T>(__fmul_rn(v, scale));
  }
}

unsigned Blocks(const Fp8Rows& g) {
  return static_cast<unsigned>((TotalRows(g) * 32 + kThreads - 1) / kThreads);
}

// Calls F<T, S> for the stack's element and scale dtypes.
template <template <typename, typename> class F, typename... Args>
cudaError_t Dispatch(const Fp8Rows& rows, Args... args) {
  const bool bf16_scale = rows.scale == Fp8Scale::kBFloat16;
  switch (rows.elem) {
    case Fp8Elem::kBFloat16:
      return bf16_scale ? F<__nv_bfloat16, __nv_bfloat16>::Run(rows, args...)
                        : F<__nv_bfloat16, float>::Run(rows, args...);
    case Fp8Elem::kFloat16:
      return bf16_scale ? F<__half, __nv_bfloat16>::Run(rows, args...)
                        : F<__half, float>::Run(rows, args...);
    case Fp8Elem::kFloat32:
      return bf16_scale ? F<float, __nv_bfloat16>::Run(rows, args...)
                        : F<float, float>::Run(rows, args...);
  }
  return cudaErrorInvalidValue;
}

template <typename T, typename S>
struct EncodeOp {
  static cudaError_t Run(const Fp8Rows& rows, const void* raw, void* blobs, uint8_t* ok,
                         cudaStream_t stream) {
    Fp8EncodeKernel<T, S><<<Blocks(rows), kThreads, 0, stream>>>(
        reinterpret_cast<uint64_t>(raw), static_cast<uint8_t*>(blobs), ok, rows);
    return cudaGetLastError();
  }
};

template <typename T, typename S>
struct DecodeOp {
  static cudaError_t Run(const Fp8Rows& rows, const void* blobs, void* raw, cudaStream_t stream) {
    if (rows.header_bytes) {
      Fp8CheckKernel<<<1, kThreads, 0, stream>>>(static_cast<const uint8_t*>(blobs), rows);
    }
    Fp8DecodeKernel<T, S><<<Blocks(rows), kThreads, 0, stream>>>(
        static_cast<const uint8_t*>(blobs), reinterpret_cast<uint64_t>(raw), rows);
    return cudaGetLastError();
  }
};

}  // namespace

cudaError_t LaunchFp8Encode(const Fp8Rows& rows, const void* raw, void* blobs, uint8_t* ok,
                            cudaStream_t stream) {
  return Dispatch<EncodeOp>(rows, raw, blobs, ok, stream);
}

cudaError_t LaunchFp8Decode(const Fp8Rows& rows, const void* blobs, void* raw,
                            cudaStream_t stream) {
  return Dispatch<DecodeOp>(rows, blobs, raw, stream);
}

}  // namespace kvtier
