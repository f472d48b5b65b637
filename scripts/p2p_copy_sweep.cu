// GPU-to-GPU copy of scattered ranges between two GPUs of one host, in one process with peer
// access: which kernel shape reaches the copy engines' rate (a diagnostic for the segment copy of
// csrc/transfer/segment_copy_kernel.cu, not a benchmark of kvtier; bench/bench_p2p_gpu.py is).
//
//   nvcc -O3 -std=c++17 -arch=sm_90 scripts/p2p_copy_sweep.cu -o /tmp/sweep && /tmp/sweep [MiB]
//   [ranges]
//
// Prints GB/s for: one cudaMemcpyPeerAsync of the whole buffer (the baseline torch's D2D copy
// uses), one cudaMemcpyAsync per range, and copy kernels pulling (on the destination GPU) and
// pushing (on the source GPU) over a grid of block sizes, loads in flight, piece sizes and cache
// hints. Median of 9 timed repetitions after a warm-up, by CUDA events.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#define CK(x)                                                                       \
  do {                                                                              \
    cudaError_t e = (x);                                                            \
    if (e != cudaSuccess) {                                                         \
      std::printf("%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
      std::exit(1);                                                                 \
    }                                                                               \
  } while (0)

struct Piece {
  uint64_t src, dst, bytes;
};

template <int kUnroll, bool kStreaming>
__global__ void CopyPieces(const Piece* __restrict__ pieces, uint32_t count) {
  for (uint32_t b = blockIdx.x; b < count; b += gridDim.x) {
    const Piece p = pieces[b];
    const uint4* s = reinterpret_cast<const uint4*>(p.src);
    uint4* d = reinterpret_cast<uint4*>(p.dst);
    const uint64_t m = p.bytes >> 4;
    const unsigned T = blockDim.x;
    uint64_t i = threadIdx.x;
    for (; i + (kUnroll - 1) * T < m; i += kUnroll * T) {
      uint4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = kStreaming ? __ldcs(s + i + u * T) : s[i + u * T];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (kStreaming) {
          __stcs(d + i + u * T, v[u]);
        } else {
          d[i + u * T] = v[u];
        }
      }
    }
    for (; i < m; i += T) d[i] = s[i];
  }
}

using Kernel = void (*)(const Piece*, uint32_t);

static float Median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

template <typename F>
static float TimeIt(int dev, cudaStream_t st, F&& f) {
  CK(cudaSetDevice(dev));
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  f();
  CK(cudaStreamSynchronize(st));
  std::vector<float> ms;
  for (int r = 0; r < 9; ++r) {
    CK(cudaEventRecord(a, st));
    f();
    CK(cudaEventRecord(b, st));
    CK(cudaEventSynchronize(b));
    float t = 0;
    CK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return Median(ms);
}

int main(int argc, char** argv) {
  const uint64_t mib = argc > 1 ? std::atoi(argv[1]) : 512;
  const int nranges = argc > 2 ? std::atoi(argv[2]) : 1024;
  const uint64_t total = mib << 20, range = total / nranges;
  int n = 0;
  CK(cudaGetDeviceCount(&n));
  if (n < 2) {
    std::printf("needs two GPUs, found %d\n", n);
    return 1;
  }
  char *src, *dst;
  cudaStream_t s0, s1;
  CK(cudaSetDevice(0));
  CK(cudaDeviceEnablePeerAccess(1, 0));
  CK(cudaMalloc(&src, total));
  CK(cudaMemset(src, 7, total));
  CK(cudaStreamCreateWithFlags(&s0, cudaStreamNonBlocking));
  CK(cudaSetDevice(1));
  CK(cudaDeviceEnablePeerAccess(0, 0));
  CK(cudaMalloc(&dst, total));
  CK(cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking));
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 1));
  // Ranges scattered: range i of the source goes to slot perm[i] of the destination.
  std::vector<int> perm(nranges);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), std::mt19937(1));
  auto gbps = [&](float ms) { return total / (ms * 1e-3) / 1e9; };

  const float base = TimeIt(1, s1, [&] { CK(cudaMemcpyPeerAsync(dst, 1, src, 0, total, s1)); });
  std::printf("baseline cudaMemcpyPeerAsync whole buffer: %.1f GB/s\n", gbps(base));
  const float per = TimeIt(1, s1, [&] {
    for (int i = 0; i < nranges; ++i)
      CK(cudaMemcpyAsync(dst + perm[i] * range, src + i * range, range, cudaMemcpyDefault, s1));
  });
  std::printf("cudaMemcpyAsync per %llu-byte range: %.1f GB/s (%.3f)\n", (unsigned long long)range,
              gbps(per), base / per);

  struct Variant {
    const char* name;
    Kernel k;
  };
  const Variant variants[] = {
      {"unroll4 streaming", CopyPieces<4, true>}, {"unroll4 plain", CopyPieces<4, false>},
      {"unroll8 streaming", CopyPieces<8, true>}, {"unroll8 plain", CopyPieces<8, false>},
      {"unroll2 plain", CopyPieces<2, false>},
  };
  for (int side = 0; side < 2; ++side) {  // 0: pull on the destination GPU, 1: push on the source's
    const int dev = side == 0 ? 1 : 0;
    cudaStream_t st = side == 0 ? s1 : s0;
    CK(cudaSetDevice(dev));
    for (uint64_t piece : {64ull << 10, 256ull << 10, 1ull << 20}) {
      std::vector<Piece> host;
      for (int i = 0; i < nranges; ++i)
        for (uint64_t off = 0; off < range; off += piece)
          host.push_back({uint64_t(src + i * range + off), uint64_t(dst + perm[i] * range + off),
                          std::min(piece, range - off)});
      Piece* dev_pieces;
      CK(cudaMalloc(&dev_pieces, host.size() * sizeof(Piece)));
      CK(cudaMemcpy(dev_pieces, host.data(), host.size() * sizeof(Piece), cudaMemcpyHostToDevice));
      for (const Variant& v : variants) {
        for (int threads : {256, 512, 1024}) {
          for (int grid_mode = 0; grid_mode < 2; ++grid_mode) {  // one block a piece / persistent
            int per_sm = 0;
            CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, v.k, threads, 0));
            const uint32_t count = host.size();
            const uint32_t grid = grid_mode == 0 ? count : std::min<uint32_t>(count, sms * per_sm);
            if (per_sm == 0) {
              std::printf("%s %s threads %d: does not fit an SM\n", side == 0 ? "pull" : "push",
                          v.name, threads);
              continue;
            }
            const float ms = TimeIt(dev, st, [&] {
              v.k<<<grid, threads, 0, st>>>(dev_pieces, count);
              CK(cudaGetLastError());
            });
            std::printf("%s piece %4lluK %-18s threads %4d grid %5u (%s): %.1f GB/s (%.3f)\n",
                        side == 0 ? "pull" : "push", (unsigned long long)(piece >> 10), v.name,
                        threads, grid, grid_mode == 0 ? "a piece each" : "persistent", gbps(ms),
                        base / ms);
          }
        }
      }
      CK(cudaFree(dev_pieces));
    }
  }
  // Check the last copy's bytes.
  std::vector<char> back(4096);
  CK(cudaSetDevice(1));
  CK(cudaMemcpy(back.data(), dst + total - 4096, 4096, cudaMemcpyDeviceToHost));
  std::printf("bytes %s\n", std::all_of(back.begin(), back.end(), [](char c) { return c == 7; })
                                ? "ok"
                                : "WRONG");
  return 0;
}
