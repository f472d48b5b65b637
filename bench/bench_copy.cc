// bench_copy: gather (offload) and scatter (load) of Llama-3-8B-shaped KV through the CopyEngine,
// each method against the PCIe limit and the per-page copy measured in the same run, and the
// slowdown of a bf16 matmul running beside each method.
//
//   bench_copy [--workload=NAME[,NAME...]|all] [--out=DIR] [--iters=N] [--staging_bytes=N]
//
// Workloads (KV: 32 layers, 8 KV heads, head dim 128, bf16, 16-token pages; 4096 tokens at random
// page ids of a 1024-page pool; 256-token chunks):
//   llama3_8b_vllm_4096tok         vLLM per-layer layout [2, pages, 16, 8, 128] per layer (32 KiB
//   pages) llama3_8b_cross_layer_4096tok  kvtier's cross-layer pool [pages, 32, 2, 16, 8, 128] (2
//   MiB pages) matmul_beside_vllm             8192^3 bf16 matmul alone vs beside each method (vLLM
//   layout);
//                                  staged also with a 256 MiB staging area (fewer, larger fills)
//   matmul_beside_cross_layer      the same, cross-layer layout
//   cpu_llama3_8b_4096tok          the CPU path (host-memory KV): worker threads vs one memcpy
// Without a GPU the GPU workloads print a document saying so (and write no file); exit code 0.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "bench_json.h"
#include "common/cuda_runtime.h"
#include "transfer/copy_engine.h"

#if KVTIER_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "transfer/matmul_probe.h"
#endif

namespace kvtier {
namespace {

using Clock = std::chrono::steady_clock;
using bench::Report;
using bench::Result;

constexpr int kLayers = 32, kHeads = 8, kHeadDim = 128, kPageTokens = 16, kElem = 2;
constexpr int kTokens = 4096, kChunkTokens = 256;
constexpr uint32_t kPoolPages = 1024;
constexpr uint64_t kPageBytes =
    uint64_t{kPageTokens} * kHeads * kHeadDim * kElem;  // 32 KiB per (layer, K/V)
constexpr uint32_t kPpc = kChunkTokens / kPageTokens;   // 16
constexpr uint32_t kUsedPages = kTokens / kPageTokens;  // 256
constexpr uint32_t kChunks = kUsedPages / kPpc;         // 16
constexpr int64_t kWaitMs = 60000;
constexpr int kMatmulN = 8192;

struct Options {
  std::vector<std::string> workloads;
  std::string out;
  int iters = 10;
  uint64_t staging_bytes = CopyEngineOptions{}.staging_bytes;
};

double Median(std::vector<double> v) {
  if (v.empty()) return NAN;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

std::vector<uint32_t> RandomPageIds(uint32_t pool, uint32_t n, uint32_t seed) {
  std::vector<uint32_t> all(pool);
  std::iota(all.begin(), all.end(), 0u);
  std::mt19937 rng(seed);
  std::shuffle(all.begin(), all.end(), rng);
  all.resize(n);
  return all;
}

// Segments of the two layouts over one allocation at `base`.
LayoutDesc VllmLayout(uint64_t base, int device) {
  LayoutDesc d;
  d.device = device;
  d.pages_per_chunk = kPpc;
  for (int l = 0; l < kLayers; ++l) {
    d.layer_segments.push_back({uint32_t(2 * l), uint32_t(2 * l + 1)});
    for (int kv = 0; kv < 2; ++kv) {
      d.segments.push_back({base + (uint64_t(l) * 2 + kv) * kPoolPages * kPageBytes, kPageBytes,
                            kPageBytes, kPoolPages});
    }
  }
  return d;
}

LayoutDesc CrossLayerLayout(uint64_t base, int device) {
  LayoutDesc d;
  d.device = device;
  d.pages_per_chunk = kPpc;
  const uint64_t page = uint64_t{kLayers} * 2 * kPageBytes;  // 2 MiB: every layer's K and V
  d.segments.push_back({base, page, page, kPoolPages});
  for (int l = 0; l < kLayers; ++l) d.layer_segments.push_back({0});
  return d;
}

uint64_t KvBytes() { return uint64_t{kLayers} * 2 * kPoolPages * kPageBytes; }

// Times `fn` (which moves `bytes`) `iters` times after a warm-up; median GB/s, NaN on failure.
double MeasureGBps(uint64_t bytes, int iters, const std::function<bool()>& fn, std::string* error) {
  for (int i = 0; i < 2; ++i) {
    if (!fn()) return NAN;
  }
  std::vector<double> rates;
  for (int i = 0; i < iters; ++i) {
    const auto t0 = Clock::now();
    if (!fn()) return NAN;
    rates.push_back(bytes / Seconds(t0, Clock::now()) / 1e9);
  }
  (void)error;
  return Median(rates);
}

// Runs one gather or scatter to completion; false (with the reason in *error) on failure.
bool RunTransfer(CopyEngine& engine, bool scatter, const std::vector<uint32_t>& pages,
                 const std::vector<void*>& blobs, std::string* error) {
  auto t =
      scatter ? engine.Scatter(blobs, pages, 0, nullptr) : engine.Gather(pages, blobs, 0, nullptr);
  if (!t.ok()) {
    *error = t.status().ToString();
    return false;
  }
  Status s = (*t)->Wait(kWaitMs);
  if (!s.ok()) {
    *error = s.ToString();
    return false;
  }
  return true;
}

void Emit(const Report& report, const Options& opt, const std::string& device_tag, bool write) {
  std::fputs(report.ToJson().c_str(), stdout);
  std::fflush(stdout);
  if (write && !opt.out.empty()) {
    const std::string path = report.WriteToDir(opt.out, device_tag);
    if (!path.empty()) std::fprintf(stderr, "wrote %s\n", path.c_str());
  }
}

// ---- CPU path
// -------------------------------------------------------------------------------------

void RunCpuWorkload(const Options& opt) {
  Report report("bench_copy", "cpu_llama3_8b_4096tok", bench::CpuMachine());
  const uint64_t kv_bytes = KvBytes();
  std::vector<uint8_t> kv(kv_bytes, 1);
  const LayoutDesc layout = VllmLayout(reinterpret_cast<uint64_t>(kv.data()), -1);
  const uint64_t blob_bytes = ChunkBlobBytes(layout);
  const uint64_t total = blob_bytes * kChunks;
  std::vector<uint8_t> blob_memory(total, 2);
  std::vector<void*> blobs;
  for (uint32_t c = 0; c < kChunks; ++c) blobs.push_back(blob_memory.data() + c * blob_bytes);
  const std::vector<uint32_t> pages = RandomPageIds(kPoolPages, kUsedPages, 1);

  // The limit: one memcpy of the same bytes, contiguous to contiguous.
  std::string error;
  const double memcpy_gbps = MeasureGBps(
      total, opt.iters,
      [&] {
        std::memcpy(blob_memory.data(), kv.data(), total);
        return true;
      },
      &error);

  const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  std::vector<int> thread_counts = {1, 2};
  if (hw >= 4) thread_counts.push_back(static_cast<int>(std::min(hw, 8u)));
  for (int threads : thread_counts) {
    CopyEngineOptions o;
    o.cpu_threads = threads;
    auto engine = CopyEngine::Create(layout, o);
    for (bool scatter : {false, true}) {
      Result r;
      r.case_name = std::string(scatter ? "cpu_scatter_" : "cpu_gather_") +
                    std::to_string(threads) + "threads";
      r.unit = "GB/s";
      r.baseline = "one_memcpy_same_bytes";
      r.baseline_value = memcpy_gbps;
      if (!engine.ok()) {
        r.value = NAN;
        r.note = engine.status().ToString();
      } else {
        std::string err;
        r.value = MeasureGBps(
            total, opt.iters, [&] { return RunTransfer(**engine, scatter, pages, blobs, &err); },
            &err);
        if (!err.empty()) r.note = err;
      }
      report.Add(r);
    }
  }
  Emit(report, opt, "cpu", true);
}

#if KVTIER_HAVE_CUDA

#define BENCH_CUDA(expr)                                                                          \
  do {                                                                                            \
    cudaError_t _e = (expr);                                                                      \
    if (_e != cudaSuccess) {                                                                      \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(_e)); \
      std::exit(1);                                                                               \
    }                                                                                             \
  } while (0)

// Polls `stream` until idle or 60 s pass (every wait has a deadline, benches too).
bool WaitStream(cudaStream_t stream) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(kWaitMs);
  for (;;) {
    cudaError_t e = cudaStreamQuery(stream);
    if (e == cudaSuccess) return true;
    if (e != cudaErrorNotReady || Clock::now() > deadline) {
      std::fprintf(stderr, "stream wait failed: %s\n", cudaGetErrorString(e));
      return false;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
}

std::string GpuName() {
  auto gpus = ListGpus();
  return gpus.ok() && !gpus->empty() ? (*gpus)[0].name : "unknown GPU";
}

// "h100", "h200", ... from the GPU's name, for result file names.
std::string GpuTag(const std::string& name) {
  for (const char* t : {"H200", "H100", "H20", "A100", "L40S", "L4", "B200", "GH200"}) {
    if (name.find(t) != std::string::npos) {
      std::string s = t;
      for (char& c : s) c = static_cast<char>(std::tolower(c));
      return s;
    }
  }
  std::string s;
  for (char c : name)
    s += std::isalnum(static_cast<unsigned char>(c)) ? static_cast<char>(std::tolower(c)) : '_';
  return s.empty() ? "gpu" : s;
}

// KV in device memory, blobs in pinned memory, and a stream for the baselines.
struct GpuSetup {
  void* kv = nullptr;
  uint8_t* blob_memory = nullptr;
  uint64_t blob_bytes = 0;
  std::vector<void*> blobs;
  std::vector<uint32_t> pages;
  LayoutDesc layout;
  cudaStream_t stream = nullptr;

  explicit GpuSetup(bool cross_layer) {
    BENCH_CUDA(cudaSetDevice(0));
    BENCH_CUDA(cudaMalloc(&kv, KvBytes()));
    BENCH_CUDA(cudaMemset(kv, 1, KvBytes()));
    layout = cross_layer ? CrossLayerLayout(reinterpret_cast<uint64_t>(kv), 0)
                         : VllmLayout(reinterpret_cast<uint64_t>(kv), 0);
    blob_bytes = ChunkBlobBytes(layout);
    BENCH_CUDA(cudaHostAlloc(reinterpret_cast<void**>(&blob_memory), blob_bytes * kChunks,
                             cudaHostAllocDefault));
    std::memset(blob_memory, 2, blob_bytes * kChunks);
    for (uint32_t c = 0; c < kChunks; ++c) blobs.push_back(blob_memory + c * blob_bytes);
    pages = RandomPageIds(kPoolPages, kUsedPages, 1);
    BENCH_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  }
  ~GpuSetup() {
    cudaStreamDestroy(stream);
    cudaFreeHost(blob_memory);
    cudaFree(kv);
  }
  uint64_t total() const { return blob_bytes * kChunks; }

  // The PCIe limit: one contiguous pinned copy of the same bytes.
  bool Contiguous(bool to_device) {
    const cudaError_t e =
        to_device ? cudaMemcpyAsync(kv, blob_memory, total(), cudaMemcpyHostToDevice, stream)
                  : cudaMemcpyAsync(blob_memory, kv, total(), cudaMemcpyDeviceToHost, stream);
    return e == cudaSuccess && WaitStream(stream);
  }
  // The per-page baseline: one cudaMemcpyAsync per page of every segment.
  bool PerPage(bool to_device) {
    for (uint32_t c = 0; c < kChunks; ++c) {
      uint8_t* blob = static_cast<uint8_t*>(blobs[c]);
      uint64_t off = 0;
      for (const SegmentDesc& s : layout.segments) {
        for (uint32_t j = 0; j < kPpc; ++j) {
          void* page =
              reinterpret_cast<void*>(s.base + uint64_t{pages[c * kPpc + j]} * s.page_stride);
          const cudaError_t e =
              to_device
                  ? cudaMemcpyAsync(page, blob + off, s.page_bytes, cudaMemcpyHostToDevice, stream)
                  : cudaMemcpyAsync(blob + off, page, s.page_bytes, cudaMemcpyDeviceToHost, stream);
          if (e != cudaSuccess) return false;
          off += s.page_bytes;
        }
      }
    }
    return WaitStream(stream);
  }
};

const TransferMethod kMethods[] = {TransferMethod::kDirect, TransferMethod::kStaged,
                                   TransferMethod::kZeroCopy, TransferMethod::kAuto};

std::string MethodCase(TransferMethod m, std::unique_ptr<CopyEngine>* engine) {
  std::string name = TransferMethodName(m);
  if (m == TransferMethod::kAuto && *engine)
    name += std::string("_") + TransferMethodName((*engine)->method());
  return name;
}

void RunCopyWorkload(const Options& opt, bool cross_layer) {
  const std::string workload =
      cross_layer ? "llama3_8b_cross_layer_4096tok" : "llama3_8b_vllm_4096tok";
  Report report("bench_copy", workload,
                GpuName() + ", " + std::to_string(std::thread::hardware_concurrency()) + " cores");
  GpuSetup g(cross_layer);
  std::string err;
  const double d2h = MeasureGBps(g.total(), opt.iters, [&] { return g.Contiguous(false); }, &err);
  const double h2d = MeasureGBps(g.total(), opt.iters, [&] { return g.Contiguous(true); }, &err);
  const double page_d2h = MeasureGBps(g.total(), opt.iters, [&] { return g.PerPage(false); }, &err);
  const double page_h2d = MeasureGBps(g.total(), opt.iters, [&] { return g.PerPage(true); }, &err);
  report.Add(
      {"contiguous_cudaMemcpy_d2h", d2h, "GB/s", "", NAN, true,
       "the PCIe limit: one pinned copy of the same " + std::to_string(g.total() >> 20) + " MiB"});
  report.Add(
      {"contiguous_cudaMemcpy_h2d", h2d, "GB/s", "", NAN, true, "the PCIe limit, host to device"});
  report.Add(
      {"per_page_cudaMemcpyAsync_gather", page_d2h, "GB/s", "contiguous_cudaMemcpy_d2h", d2h, true,
       "one cudaMemcpyAsync per page and segment (raw CUDA, a stronger baseline than one torch "
       "copy per page, which bench_copy.py measures)"});
  report.Add({"per_page_cudaMemcpyAsync_scatter", page_h2d, "GB/s", "contiguous_cudaMemcpy_h2d",
              h2d, true, ""});

  for (TransferMethod m : kMethods) {
    CopyEngineOptions o;
    o.method = m;
    o.staging_bytes = opt.staging_bytes;
    auto created = CopyEngine::Create(g.layout, o);
    std::unique_ptr<CopyEngine> engine = created.ok() ? std::move(created).value() : nullptr;
    const std::string name = MethodCase(m, &engine);
    for (bool scatter : {false, true}) {
      Result r;
      r.case_name = name + (scatter ? "_scatter" : "_gather");
      r.unit = "GB/s";
      r.baseline = scatter ? "contiguous_cudaMemcpy_h2d" : "contiguous_cudaMemcpy_d2h";
      r.baseline_value = scatter ? h2d : d2h;
      if (!engine) {
        r.value = NAN;
        r.note = created.status().ToString();
      } else {
        std::string e;
        r.value = MeasureGBps(
            g.total(), opt.iters,
            [&] { return RunTransfer(*engine, scatter, g.pages, g.blobs, &e); }, &e);
        if (!e.empty()) r.note = e;
      }
      report.Add(r);
      if (m == TransferMethod::kAuto) {  // against the per-page copy (target: >= 40x)
        Result v = r;
        v.case_name += "_vs_per_page";
        v.baseline =
            scatter ? "per_page_cudaMemcpyAsync_scatter" : "per_page_cudaMemcpyAsync_gather";
        v.baseline_value = scatter ? page_h2d : page_d2h;
        report.Add(v);
      }
    }
  }
  Emit(report, opt, GpuTag(GpuName()), true);
}

// Times the matmul probe on `compute` (median ms over `iters`, after a warm-up) with events.
double MatmulMs(cudaStream_t compute, const void* a, const void* b, float* c, int iters) {
  cudaEvent_t start, stop;
  BENCH_CUDA(cudaEventCreate(&start));
  BENCH_CUDA(cudaEventCreate(&stop));
  BENCH_CUDA(LaunchMatmulProbe(a, b, c, kMatmulN, compute));
  if (!WaitStream(compute)) std::exit(1);
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    BENCH_CUDA(cudaEventRecord(start, compute));
    BENCH_CUDA(LaunchMatmulProbe(a, b, c, kMatmulN, compute));
    BENCH_CUDA(cudaEventRecord(stop, compute));
    if (!WaitStream(compute)) std::exit(1);
    float t = 0;
    BENCH_CUDA(cudaEventElapsedTime(&t, start, stop));
    ms.push_back(t);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return Median(ms);
}

// Loops `transfer` on a background thread while the matmul is timed; returns the matmul's median
// ms and, in *copy_gbps, the copies' own rate meanwhile.
double MatmulBeside(cudaStream_t compute, const void* a, const void* b, float* c, int iters,
                    uint64_t bytes, const std::function<bool()>& transfer, double* copy_gbps,
                    std::string* error) {
  std::atomic<bool> stop{false};
  std::atomic<int> done{0};
  std::atomic<bool> failed{false};
  Clock::time_point first, last;
  std::thread bg([&] {
    cudaSetDevice(0);
    while (!stop.load()) {
      if (!transfer()) {
        failed = true;
        return;
      }
      if (done.fetch_add(1) == 0) first = Clock::now();
      last = Clock::now();
    }
  });
  const auto deadline = Clock::now() + std::chrono::seconds(30);
  while (done.load() < 1 && !failed.load() && Clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  const int before = done.load();
  const double ms = failed ? NAN : MatmulMs(compute, a, b, c, iters);
  stop = true;
  bg.join();
  if (failed) *error = "the transfer failed beside the matmul";
  const int n = done.load() - before;
  *copy_gbps =
      n > 0 ? (done.load() - 1) * static_cast<double>(bytes) / Seconds(first, last) / 1e9 : NAN;
  return ms;
}

void RunMatmulWorkload(const Options& opt, bool cross_layer) {
  const std::string workload = cross_layer ? "matmul_beside_cross_layer" : "matmul_beside_vllm";
  Report report("bench_copy", workload,
                GpuName() + ", " + std::to_string(std::thread::hardware_concurrency()) + " cores");
  GpuSetup g(cross_layer);
  const size_t n2 = size_t{kMatmulN} * kMatmulN;
  void *a = nullptr, *b = nullptr;
  float* c = nullptr;
  BENCH_CUDA(cudaMalloc(&a, n2 * 2));
  BENCH_CUDA(cudaMalloc(&b, n2 * 2));
  BENCH_CUDA(cudaMalloc(reinterpret_cast<void**>(&c), n2 * 4));
  BENCH_CUDA(cudaMemset(a, 0x3c, n2 * 2));  // bf16 0x3c3c, about 0.0115
  BENCH_CUDA(cudaMemset(b, 0x3c, n2 * 2));
  cudaStream_t compute;
  BENCH_CUDA(cudaStreamCreateWithFlags(&compute, cudaStreamNonBlocking));
  const double alone = MatmulMs(compute, a, b, c, opt.iters);
  report.Add({"matmul_alone", alone, "ms", "", NAN, false,
              "bf16 " + std::to_string(kMatmulN) +
                  "^3 WMMA matmul probe on the compute stream, nothing beside it"});

  auto add = [&](const std::string& name, const std::function<bool()>& transfer) {
    double gbps = NAN;
    std::string e;
    const double ms = MatmulBeside(compute, a, b, c, opt.iters, g.total(), transfer, &gbps, &e);
    char note[160];
    std::snprintf(note, sizeof(note), "copies beside it ran at %.1f GB/s%s%s", gbps,
                  e.empty() ? "" : "; ", e.c_str());
    report.Add({"matmul_beside_" + name, ms, "ms", "matmul_alone", alone, false, note});
  };
  add("contiguous_d2h", [&] { return g.Contiguous(false); });
  add("contiguous_h2d", [&] { return g.Contiguous(true); });
  struct Variant {
    TransferMethod method;
    uint64_t staging_bytes;
    std::string suffix;
  };
  // auto is one of the three; staged also with 256 MiB of staging: under a busy GPU each fill's
  // kernel waits for SM slots, so fewer, larger fills keep the copy near the PCIe rate.
  const Variant variants[] = {{TransferMethod::kDirect, opt.staging_bytes, ""},
                              {TransferMethod::kStaged, opt.staging_bytes, ""},
                              {TransferMethod::kStaged, uint64_t{256} << 20, "_staging256MiB"},
                              {TransferMethod::kZeroCopy, opt.staging_bytes, ""}};
  for (const Variant& v : variants) {
    CopyEngineOptions o;
    o.method = v.method;
    o.staging_bytes = v.staging_bytes;
    const std::string name = std::string(TransferMethodName(v.method)) + v.suffix;
    auto created = CopyEngine::Create(g.layout, o);
    if (!created.ok()) {
      report.Add({"matmul_beside_" + name, NAN, "ms", "matmul_alone", alone, false,
                  created.status().ToString()});
      continue;
    }
    CopyEngine& engine = **created;
    for (bool scatter : {false, true}) {
      std::string e;
      add(name + (scatter ? "_scatter" : "_gather"),
          [&] { return RunTransfer(engine, scatter, g.pages, g.blobs, &e); });
    }
  }
  cudaStreamDestroy(compute);
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  Emit(report, opt, GpuTag(GpuName()), true);
}

#endif  // KVTIER_HAVE_CUDA

void NoGpu(const Options& opt, const std::string& workload, const std::string& why) {
  Report report("bench_copy", workload, bench::CpuMachine());
  Result r;
  r.case_name = "skipped";
  r.value = NAN;
  r.unit = "";
  r.note = "no GPU present: " + why;
  report.Add(r);
  Emit(report, opt, "cpu", false);
}

const char* const kAllWorkloads[] = {"llama3_8b_vllm_4096tok", "llama3_8b_cross_layer_4096tok",
                                     "matmul_beside_vllm", "matmul_beside_cross_layer",
                                     "cpu_llama3_8b_4096tok"};

int Main(int argc, char** argv) {
  Options opt;
  std::string list = "all";
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--workload=", 0) == 0) {
      list = a.substr(11);
    } else if (a.rfind("--out=", 0) == 0) {
      opt.out = a.substr(6);
    } else if (a.rfind("--iters=", 0) == 0) {
      opt.iters = std::max(1, std::atoi(a.c_str() + 8));
    } else if (a.rfind("--staging_bytes=", 0) == 0) {
      opt.staging_bytes = std::strtoull(a.c_str() + 16, nullptr, 10);
    } else {
      std::fprintf(stderr,
                   "usage: bench_copy [--workload=NAME[,NAME...]|all] [--out=DIR] [--iters=N] "
                   "[--staging_bytes=N]\nworkloads:");
      for (const char* w : kAllWorkloads) std::fprintf(stderr, " %s", w);
      std::fprintf(stderr, "\n");
      return a == "--help" ? 0 : 2;
    }
  }
  if (list == "all") {
    opt.workloads.assign(std::begin(kAllWorkloads), std::end(kAllWorkloads));
  } else {
    size_t start = 0;
    while (start <= list.size()) {
      size_t comma = list.find(',', start);
      if (comma == std::string::npos) comma = list.size();
      std::string w = list.substr(start, comma - start);
      if (std::find(std::begin(kAllWorkloads), std::end(kAllWorkloads), w) ==
          std::end(kAllWorkloads)) {
        std::fprintf(stderr, "unknown workload '%s'\n", w.c_str());
        return 2;
      }
      opt.workloads.push_back(w);
      start = comma + 1;
    }
  }
  std::string no_gpu;
  auto gpus = ListGpus();
  if (!gpus.ok())
    no_gpu = gpus.status().message();
  else if (gpus->empty())
    no_gpu = "no CUDA device";

  for (const std::string& w : opt.workloads) {
    if (w == "cpu_llama3_8b_4096tok") {
      RunCpuWorkload(opt);
      continue;
    }
    if (!no_gpu.empty()) {
      NoGpu(opt, w, no_gpu);
      continue;
    }
#if KVTIER_HAVE_CUDA
    const bool cross = w.find("cross_layer") != std::string::npos;
    if (w.rfind("matmul", 0) == 0) {
      RunMatmulWorkload(opt, cross);
    } else {
      RunCopyWorkload(opt, cross);
    }
#endif
  }
  return 0;
}

}  // namespace
}  // namespace kvtier

int main(int argc, char** argv) { return kvtier::Main(argc, argv); }
