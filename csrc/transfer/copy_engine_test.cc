// Tests for CopyEngine: layout and request validation, the CPU path (round trips, layer waits,
// callbacks, concurrency) and, where a GPU is present, every CUDA method (skipped otherwise).
#include "transfer/copy_engine.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/cuda_runtime.h"

#if KVTIER_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

namespace kvtier {
namespace {

constexpr int64_t kTimeoutMs = 30000;

// A vLLM-style per-layer KV cache in one buffer: layer l, K/V kv, page p at
// ((l * 2 + kv) * num_pages + p) * page_bytes. Segment (l, kv) = index l * 2 + kv.
struct VllmLayout {
  int layers;
  uint64_t num_pages;
  uint64_t page_bytes;
  uint32_t ppc;

  uint64_t bytes() const { return uint64_t(layers) * 2 * num_pages * page_bytes; }
  LayoutDesc Describe(uint64_t base, int device) const {
    LayoutDesc d;
    d.device = device;
    d.pages_per_chunk = ppc;
    for (int l = 0; l < layers; ++l) {
      d.layer_segments.push_back({uint32_t(2 * l), uint32_t(2 * l + 1)});
      for (int kv = 0; kv < 2; ++kv) {
        d.segments.push_back({base + (uint64_t(l) * 2 + kv) * num_pages * page_bytes, page_bytes,
                              page_bytes, num_pages});
      }
    }
    return d;
  }
  // The blob of one chunk built by hand: segment-major, pages in chunk order.
  std::vector<uint8_t> ExpectedBlob(const std::vector<uint8_t>& kv, const uint32_t* pages) const {
    std::vector<uint8_t> blob;
    for (int seg = 0; seg < layers * 2; ++seg) {
      for (uint32_t j = 0; j < ppc; ++j) {
        const uint8_t* p = kv.data() + (uint64_t(seg) * num_pages + pages[j]) * page_bytes;
        blob.insert(blob.end(), p, p + page_bytes);
      }
    }
    return blob;
  }
};

std::vector<uint8_t> RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(rng());
  return v;
}

std::vector<uint32_t> RandomPages(uint64_t num_pages, size_t n, uint32_t seed) {
  std::vector<uint32_t> all(num_pages);
  std::iota(all.begin(), all.end(), 0u);
  std::mt19937 rng(seed);
  std::shuffle(all.begin(), all.end(), rng);
  all.resize(n);
  return all;
}

std::unique_ptr<CopyEngine> MakeCpuEngine(const LayoutDesc& d, int threads = 2) {
  CopyEngineOptions o;
  o.cpu_threads = threads;
  auto e = CopyEngine::Create(d, o);
  EXPECT_TRUE(e.ok()) << e.status().ToString();
  return e.ok() ? std::move(e).value() : nullptr;
}

TEST(LayoutValidationTest, RejectsBadLayoutsNamingTheProblem) {
  VllmLayout v{2, 8, 64, 2};
  std::vector<uint8_t> kv(v.bytes());
  const uint64_t base = reinterpret_cast<uint64_t>(kv.data());
  EXPECT_TRUE(ValidateLayout(v.Describe(base, -1)).ok());

  struct Case {
    const char* what;
    void (*mutate)(LayoutDesc&);
    const char* message_part;
  };
  const Case cases[] = {
      {"no segments",
       [](LayoutDesc& d) {
         d.segments.clear();
         d.layer_segments.clear();
       },
       "no segments"},
      {"null base", [](LayoutDesc& d) { d.segments[1].base = 0; },
       "segment 1: base pointer is null"},
      {"zero page bytes", [](LayoutDesc& d) { d.segments[0].page_bytes = 0; }, "page_bytes"},
      {"zero pages", [](LayoutDesc& d) { d.segments[0].num_pages = 0; }, "num_pages"},
      {"overlapping pages", [](LayoutDesc& d) { d.segments[2].page_stride = 32; },
       "page_stride 32"},
      {"zero pages per chunk", [](LayoutDesc& d) { d.pages_per_chunk = 0; }, "pages_per_chunk"},
      {"bad device", [](LayoutDesc& d) { d.device = -2; }, "device"},
      {"segment twice in a layer", [](LayoutDesc& d) { d.layer_segments[1] = {2, 3, 2}; },
       "segment 2 is listed twice in layer 1"},
      {"segment missing", [](LayoutDesc& d) { d.layer_segments[1] = {3}; },
       "segment 2 is in no layer"},
      {"segment out of range", [](LayoutDesc& d) { d.layer_segments[1] = {2, 9}; }, "segment 9"},
      {"empty layer", [](LayoutDesc& d) { d.layer_segments.push_back({}); },
       "layer 2 has no segments"},
      {"overflow", [](LayoutDesc& d) { d.segments[0].base = ~uint64_t{0} - 10; }, "overflows"},
  };
  for (const Case& c : cases) {
    LayoutDesc d = v.Describe(base, -1);
    c.mutate(d);
    Status s = ValidateLayout(d);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << c.what;
    EXPECT_NE(s.message().find(c.message_part), std::string::npos) << c.what << ": " << s.message();
    auto e = CopyEngine::Create(d, CopyEngineOptions{});
    EXPECT_EQ(e.status().code(), StatusCode::kInvalidArgument) << c.what;
  }
}

TEST(LayoutValidationTest, ChunkBlobBytesIsSegmentPagesTimesPagesPerChunk) {
  VllmLayout v{3, 8, 48, 4};
  std::vector<uint8_t> kv(v.bytes());
  EXPECT_EQ(ChunkBlobBytes(v.Describe(reinterpret_cast<uint64_t>(kv.data()), -1)), 3u * 2 * 48 * 4);
}

TEST(CopyEngineCreateTest, RejectsMethodsThatDoNotFitTheLayout) {
  VllmLayout v{1, 4, 16, 1};
  std::vector<uint8_t> kv(v.bytes());
  LayoutDesc d = v.Describe(reinterpret_cast<uint64_t>(kv.data()), -1);
  for (TransferMethod m :
       {TransferMethod::kDirect, TransferMethod::kStaged, TransferMethod::kZeroCopy}) {
    CopyEngineOptions o;
    o.method = m;
    auto e = CopyEngine::Create(d, o);
    EXPECT_EQ(e.status().code(), StatusCode::kInvalidArgument) << TransferMethodName(m);
    EXPECT_NE(e.status().message().find("GPU"), std::string::npos);
  }
  CopyEngineOptions o;
  o.cpu_threads = 0;
  EXPECT_EQ(CopyEngine::Create(d, o).status().code(), StatusCode::kInvalidArgument);
  o = CopyEngineOptions{};
  o.method = static_cast<TransferMethod>(42);
  EXPECT_EQ(CopyEngine::Create(d, o).status().code(), StatusCode::kInvalidArgument);

  auto cpu = CopyEngine::Create(d, CopyEngineOptions{});
  ASSERT_TRUE(cpu.ok());
  EXPECT_EQ((*cpu)->method(), TransferMethod::kCpu);
  EXPECT_EQ((*cpu)->blob_bytes(), 2u * 16);
}

TEST(CopyEngineCreateTest, GpuLayoutWithoutGpuIsUnavailable) {
  if (GpuCount() > 0) GTEST_SKIP() << "a GPU is present: this test covers machines without one";
  LayoutDesc d;
  d.device = 0;
  d.segments.push_back({0x100000, 64, 64, 8});
  auto e = CopyEngine::Create(d, CopyEngineOptions{});
  EXPECT_EQ(e.status().code(), StatusCode::kUnavailable) << e.status().ToString();
}

class CpuCopyEngineTest : public ::testing::TestWithParam<std::tuple<uint64_t, uint32_t, int>> {};

TEST_P(CpuCopyEngineTest, GatherThenScatterRoundTripsBitExact) {
  const auto [page_bytes, ppc, threads] = GetParam();
  VllmLayout v{3, 64, page_bytes, ppc};
  std::vector<uint8_t> kv = RandomBytes(v.bytes(), 1);
  auto engine = MakeCpuEngine(v.Describe(reinterpret_cast<uint64_t>(kv.data()), -1), threads);
  ASSERT_NE(engine, nullptr);
  const size_t chunks = 5;
  const uint64_t blob_bytes = engine->blob_bytes();
  std::vector<uint8_t> blobs(chunks * blob_bytes, 0xEE);
  std::vector<void*> ptrs;
  for (size_t c = 0; c < chunks; ++c) ptrs.push_back(blobs.data() + c * blob_bytes);
  const std::vector<uint32_t> src_pages = RandomPages(v.num_pages, chunks * ppc, 2);

  std::atomic<int> calls{0};
  auto t = engine->Gather(src_pages, ptrs, 0, [&](const Status& s) {
    EXPECT_TRUE(s.ok());
    calls++;
  });
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  ASSERT_TRUE((*t)->Wait(kTimeoutMs).ok());
  EXPECT_EQ(calls.load(), 1);  // the callback ran, once, before Wait returned
  EXPECT_TRUE((*t)->Done());
  EXPECT_EQ((*t)->method(), TransferMethod::kCpu);
  for (size_t c = 0; c < chunks; ++c) {
    std::vector<uint8_t> want = v.ExpectedBlob(kv, src_pages.data() + c * ppc);
    ASSERT_EQ(0, std::memcmp(want.data(), blobs.data() + c * blob_bytes, blob_bytes))
        << "chunk " << c;
  }

  // Scatter into a zeroed cache at other pages: exactly those pages change.
  std::vector<uint8_t> kv2(v.bytes(), 0);
  auto engine2 = MakeCpuEngine(v.Describe(reinterpret_cast<uint64_t>(kv2.data()), -1), threads);
  const std::vector<uint32_t> dst_pages = RandomPages(v.num_pages, chunks * ppc, 3);
  auto s = engine2->Scatter(ptrs, dst_pages, 0, nullptr);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  ASSERT_TRUE((*s)->Wait(kTimeoutMs).ok());
  std::vector<int> written(v.num_pages, -1);
  for (size_t i = 0; i < dst_pages.size(); ++i) written[dst_pages[i]] = static_cast<int>(i);
  for (int seg = 0; seg < v.layers * 2; ++seg) {
    for (uint64_t p = 0; p < v.num_pages; ++p) {
      const uint8_t* got = kv2.data() + (seg * v.num_pages + p) * page_bytes;
      if (written[p] < 0) {
        ASSERT_TRUE(std::all_of(got, got + page_bytes, [](uint8_t b) { return b == 0; }))
            << "page " << p;
      } else {
        const uint8_t* want = kv.data() + (seg * v.num_pages + src_pages[written[p]]) * page_bytes;
        ASSERT_EQ(0, std::memcmp(want, got, page_bytes)) << "segment " << seg << " page " << p;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(PageSizesAndThreads, CpuCopyEngineTest,
                         ::testing::Values(std::make_tuple(uint64_t{16}, 1u, 1),
                                           std::make_tuple(uint64_t{48}, 4u, 2),
                                           std::make_tuple(uint64_t{4096}, 8u, 3),
                                           std::make_tuple(uint64_t{300000}, 2u, 4)),
                         [](const auto& info) {
                           return std::to_string(std::get<0>(info.param)) + "B_" +
                                  std::to_string(std::get<1>(info.param)) + "ppc_" +
                                  std::to_string(std::get<2>(info.param)) + "threads";
                         });

TEST(CpuCopyEngineTest2, RejectsBadRequestsAndStartsNothing) {
  VllmLayout v{2, 16, 32, 2};
  std::vector<uint8_t> kv = RandomBytes(v.bytes(), 4);
  const std::vector<uint8_t> before = kv;
  auto engine = MakeCpuEngine(v.Describe(reinterpret_cast<uint64_t>(kv.data()), -1));
  std::vector<uint8_t> blob(engine->blob_bytes() * 2);
  std::vector<void*> two = {blob.data(), blob.data() + engine->blob_bytes()};
  int calls = 0;
  auto cb = [&](const Status&) { calls++; };

  auto r = engine->Gather({1, 2, 3}, two, 0, cb);
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("page_ids has 3 entries"), std::string::npos)
      << r.status().message();

  r = engine->Gather({1, 2, 3, 16}, two, 0, cb);
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("page id 16 (page_ids[3]) is out of range [0, 16)"),
            std::string::npos);

  r = engine->Scatter(two, {5, 6, 7, 5}, 0, cb);
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("page id 5 is repeated"), std::string::npos)
      << r.status().message();

  r = engine->Gather({1, 2, 3, 4}, {blob.data(), nullptr}, 0, cb);
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("blobs[1] is null"), std::string::npos);

  r = engine->Gather({1, 2, 3, 4}, two, 0x1234, cb);
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("after_stream"), std::string::npos);

  EXPECT_EQ(calls, 0);
  EXPECT_EQ(kv, before);

  // A gather may read one page twice.
  r = engine->Gather({5, 5, 5, 5}, two, 0, cb);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE((*r)->Wait(kTimeoutMs).ok());
  EXPECT_EQ(calls, 1);
}

TEST(CpuCopyEngineTest2, LayerWaitsAndTheirErrors) {
  VllmLayout v{4, 256, 16384, 16};
  std::vector<uint8_t> kv = RandomBytes(v.bytes(), 5);
  auto engine = MakeCpuEngine(v.Describe(reinterpret_cast<uint64_t>(kv.data()), -1));
  const size_t chunks = 8;
  std::vector<uint8_t> blobs = RandomBytes(chunks * engine->blob_bytes(), 6);
  std::vector<void*> ptrs;
  for (size_t c = 0; c < chunks; ++c) ptrs.push_back(blobs.data() + c * engine->blob_bytes());
  const std::vector<uint32_t> pages = RandomPages(v.num_pages, chunks * v.ppc, 7);
  auto t = engine->Scatter(ptrs, pages, 0, nullptr);
  ASSERT_TRUE(t.ok());
  EXPECT_EQ((*t)->num_layers(), 4);
  for (int l = 0; l < 4; ++l) {
    ASSERT_TRUE((*t)->WaitLayer(l, kTimeoutMs).ok());
    // Layer l has landed: its pages hold the blob bytes now, whatever the other layers do.
    for (size_t c = 0; c < chunks; ++c) {
      for (int kv_half = 0; kv_half < 2; ++kv_half) {
        const int seg = 2 * l + kv_half;
        for (uint32_t j = 0; j < v.ppc; ++j) {
          const uint8_t* got =
              kv.data() + (seg * v.num_pages + pages[c * v.ppc + j]) * v.page_bytes;
          const uint8_t* want =
              blobs.data() + c * engine->blob_bytes() + (seg * v.ppc + j) * v.page_bytes;
          ASSERT_EQ(0, std::memcmp(got, want, v.page_bytes)) << "layer " << l;
        }
      }
    }
  }
  EXPECT_EQ((*t)->WaitLayer(4, 10).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ((*t)->WaitLayer(-1, 10).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ((*t)->Wait(-1).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ((*t)->StreamWaitLayer(0, 0).code(), StatusCode::kUnavailable);
  EXPECT_TRUE((*t)->Wait(kTimeoutMs).ok());
}

// A cross-layer pool: one segment (a page holds every layer), listed by every layer. Each layer's
// wait completes once that segment has landed; the bytes are copied once.
TEST(CpuCopyEngineTest2, LayersSharingOneSegment) {
  const uint64_t num_pages = 32, page_bytes = 3 * 2 * 64;
  std::vector<uint8_t> kv = RandomBytes(num_pages * page_bytes, 13);
  LayoutDesc d;
  d.device = -1;
  d.pages_per_chunk = 4;
  d.segments.push_back({reinterpret_cast<uint64_t>(kv.data()), page_bytes, page_bytes, num_pages});
  d.layer_segments = {{0}, {0}, {0}};
  auto engine = MakeCpuEngine(d);
  ASSERT_NE(engine, nullptr);
  EXPECT_EQ(engine->blob_bytes(), 4 * page_bytes);
  std::vector<uint8_t> blobs(2 * engine->blob_bytes());
  const auto pages = RandomPages(num_pages, 8, 14);
  auto t = engine->Gather(pages, {blobs.data(), blobs.data() + engine->blob_bytes()}, 0, nullptr);
  ASSERT_TRUE(t.ok());
  EXPECT_EQ((*t)->num_layers(), 3);
  for (int l = 0; l < 3; ++l) ASSERT_TRUE((*t)->WaitLayer(l, kTimeoutMs).ok());
  ASSERT_TRUE((*t)->Wait(kTimeoutMs).ok());
  for (size_t i = 0; i < pages.size(); ++i) {
    ASSERT_EQ(0, std::memcmp(blobs.data() + i * page_bytes, kv.data() + pages[i] * page_bytes,
                             page_bytes));
  }
}

TEST(CpuCopyEngineTest2, TinyTimeoutOnABigTransferReturnsWithoutHanging) {
  VllmLayout v{2, 1024, 65536, 64};  // 256 MiB of KV, 64 MiB moved
  std::vector<uint8_t> kv(v.bytes(), 1);
  auto engine = MakeCpuEngine(v.Describe(reinterpret_cast<uint64_t>(kv.data()), -1), 1);
  const size_t chunks = 4;
  std::vector<uint8_t> blobs(chunks * engine->blob_bytes());
  std::vector<void*> ptrs;
  for (size_t c = 0; c < chunks; ++c) ptrs.push_back(blobs.data() + c * engine->blob_bytes());
  auto t = engine->Gather(RandomPages(v.num_pages, chunks * v.ppc, 8), ptrs, 0, nullptr);
  ASSERT_TRUE(t.ok());
  Status s = (*t)->Wait(0);
  EXPECT_TRUE(s.ok() || s.code() == StatusCode::kDeadlineExceeded) << s.ToString();
  s = (*t)->WaitLayer(1, 0);
  EXPECT_TRUE(s.ok() || s.code() == StatusCode::kDeadlineExceeded) << s.ToString();
  EXPECT_TRUE((*t)->Wait(kTimeoutMs).ok());
}

TEST(CpuCopyEngineTest2, ZeroChunksCompletesAtOnce) {
  VllmLayout v{1, 4, 16, 2};
  std::vector<uint8_t> kv(v.bytes());
  auto engine = MakeCpuEngine(v.Describe(reinterpret_cast<uint64_t>(kv.data()), -1));
  int calls = 0;
  auto t = engine->Gather({}, {}, 0, [&](const Status& s) {
    EXPECT_TRUE(s.ok());
    calls++;
  });
  ASSERT_TRUE(t.ok());
  EXPECT_TRUE((*t)->Done());
  EXPECT_EQ(calls, 1);
  EXPECT_TRUE((*t)->WaitLayer(0, 0).ok());
  EXPECT_TRUE((*t)->Wait(0).ok());
}

TEST(CpuCopyEngineTest2, ConcurrentTransfersFromManyThreads) {
  VllmLayout v{2, 512, 1024, 4};
  std::vector<uint8_t> kv = RandomBytes(v.bytes(), 9);
  auto engine = MakeCpuEngine(v.Describe(reinterpret_cast<uint64_t>(kv.data()), -1), 3);
  const int kThreads = 8;
  const std::vector<uint32_t> all = RandomPages(v.num_pages, v.num_pages, 10);
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] {
      // Each thread owns 64 pages: gathers them, scrambles, scatters them back, 10 times.
      const size_t chunks = 16;
      std::vector<uint32_t> mine(all.begin() + i * chunks * v.ppc,
                                 all.begin() + (i + 1) * chunks * v.ppc);
      std::vector<uint8_t> blobs(chunks * engine->blob_bytes());
      std::vector<void*> ptrs;
      for (size_t c = 0; c < chunks; ++c) ptrs.push_back(blobs.data() + c * engine->blob_bytes());
      for (int round = 0; round < 10; ++round) {
        auto g = engine->Gather(mine, ptrs, 0, nullptr);
        if (!g.ok() || !(*g)->Wait(kTimeoutMs).ok()) failures++;
        for (size_t c = 0; c < chunks; ++c) {
          if (v.ExpectedBlob(kv, mine.data() + c * v.ppc) !=
              std::vector<uint8_t>(blobs.begin() + c * engine->blob_bytes(),
                                   blobs.begin() + (c + 1) * engine->blob_bytes())) {
            failures++;
          }
        }
        std::reverse(ptrs.begin(), ptrs.end());  // chunk c's bytes go to chunk n-1-c's pages
        auto s = engine->Scatter(ptrs, mine, 0, nullptr);
        if (!s.ok() || !(*s)->Wait(kTimeoutMs).ok()) failures++;
        std::reverse(ptrs.begin(), ptrs.end());
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
}

TEST(CpuCopyEngineTest2, EngineDestroyedWithTransfersInFlightFinishesThem) {
  VllmLayout v{2, 256, 65536, 16};
  std::vector<uint8_t> kv = RandomBytes(v.bytes(), 11);
  auto engine = MakeCpuEngine(v.Describe(reinterpret_cast<uint64_t>(kv.data()), -1), 1);
  const size_t chunks = 8;
  std::vector<uint8_t> blobs(chunks * engine->blob_bytes());
  std::vector<void*> ptrs;
  for (size_t c = 0; c < chunks; ++c) ptrs.push_back(blobs.data() + c * engine->blob_bytes());
  const auto pages = RandomPages(v.num_pages, chunks * v.ppc, 12);
  auto t = engine->Gather(pages, ptrs, 0, nullptr);
  ASSERT_TRUE(t.ok());
  std::shared_ptr<Transfer> transfer = *t;
  engine.reset();
  EXPECT_TRUE(transfer->Done());
  EXPECT_TRUE(transfer->Wait(0).ok());
  EXPECT_EQ(v.ExpectedBlob(kv, pages.data() + 7 * v.ppc),
            std::vector<uint8_t>(blobs.begin() + 7 * (blobs.size() / chunks), blobs.end()));
}

#if KVTIER_HAVE_CUDA

// GPU round trips for every method; skipped (loudly) without a GPU.
class CudaCopyEngineTest : public ::testing::TestWithParam<std::tuple<TransferMethod, uint64_t>> {
 protected:
  void SetUp() override {
    if (GpuCount() == 0) GTEST_SKIP() << "SKIPPED: no usable CUDA GPU on this machine";
  }
};

TEST_P(CudaCopyEngineTest, GatherThenScatterRoundTripsBitExact) {
  const auto [method, page_bytes] = GetParam();
  VllmLayout v{3, 128, page_bytes, 8};
  const std::vector<uint8_t> host_kv = RandomBytes(v.bytes(), 21);
  void* dkv = nullptr;
  ASSERT_EQ(cudaMalloc(&dkv, v.bytes()), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(dkv, host_kv.data(), v.bytes(), cudaMemcpyHostToDevice), cudaSuccess);
  CopyEngineOptions o;
  o.method = method;
  o.staging_bytes = 4 * 2 * page_bytes * 4 + 4096;  // a small staging area: many fills
  auto e = CopyEngine::Create(v.Describe(reinterpret_cast<uint64_t>(dkv), 0), o);
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  auto& engine = *e;
  const size_t chunks = 6;
  const uint64_t bb = engine->blob_bytes();
  uint8_t* blobs = nullptr;
  ASSERT_EQ(cudaHostAlloc(reinterpret_cast<void**>(&blobs), chunks * bb, cudaHostAllocDefault),
            cudaSuccess);
  std::memset(blobs, 0xEE, chunks * bb);
  std::vector<void*> ptrs;
  for (size_t c = 0; c < chunks; ++c) ptrs.push_back(blobs + c * bb);
  const auto src = RandomPages(v.num_pages, chunks * v.ppc, 22);
  std::atomic<int> calls{0};
  auto t = engine->Gather(src, ptrs, 0, [&](const Status& s) {
    EXPECT_TRUE(s.ok()) << s.ToString();
    calls++;
  });
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  ASSERT_TRUE((*t)->Wait(kTimeoutMs).ok());
  EXPECT_EQ(calls.load(), 1);
  for (size_t c = 0; c < chunks; ++c) {
    ASSERT_EQ(
        0, std::memcmp(v.ExpectedBlob(host_kv, src.data() + c * v.ppc).data(), blobs + c * bb, bb))
        << TransferMethodName(engine->method()) << " chunk " << c;
  }
  ASSERT_EQ(cudaMemset(dkv, 0, v.bytes()), cudaSuccess);
  const auto dst = RandomPages(v.num_pages, chunks * v.ppc, 23);
  auto s = engine->Scatter(ptrs, dst, 0, nullptr);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  for (int l = 0; l < 3; ++l) ASSERT_TRUE((*s)->WaitLayer(l, kTimeoutMs).ok());
  ASSERT_TRUE((*s)->Wait(kTimeoutMs).ok());
  std::vector<uint8_t> back(v.bytes());
  ASSERT_EQ(cudaMemcpy(back.data(), dkv, v.bytes(), cudaMemcpyDeviceToHost), cudaSuccess);
  for (size_t i = 0; i < dst.size(); ++i) {
    for (int seg = 0; seg < 6; ++seg) {
      ASSERT_EQ(
          0, std::memcmp(back.data() + (seg * v.num_pages + dst[i]) * page_bytes,
                         host_kv.data() + (seg * v.num_pages + src[i]) * page_bytes, page_bytes));
    }
  }
  engine.reset();
  cudaFreeHost(blobs);
  cudaFree(dkv);
}

INSTANTIATE_TEST_SUITE_P(
    Methods, CudaCopyEngineTest,
    ::testing::Combine(::testing::Values(TransferMethod::kDirect, TransferMethod::kStaged,
                                         TransferMethod::kZeroCopy, TransferMethod::kAuto),
                       ::testing::Values(uint64_t{7}, uint64_t{36}, uint64_t{48}, uint64_t{4096},
                                         uint64_t{300000})),
    [](const auto& info) {
      return std::string(TransferMethodName(std::get<0>(info.param))) + "_" +
             std::to_string(std::get<1>(info.param)) + "B";
    });

TEST(CudaCopyEngineErrorsTest, ZeroCopyRejectsPageableBlobsAndStagedTinyStaging) {
  if (GpuCount() == 0) GTEST_SKIP() << "SKIPPED: no usable CUDA GPU on this machine";
  VllmLayout v{1, 16, 4096, 2};
  void* dkv = nullptr;
  ASSERT_EQ(cudaMalloc(&dkv, v.bytes()), cudaSuccess);
  CopyEngineOptions o;
  o.method = TransferMethod::kZeroCopy;
  auto e = CopyEngine::Create(v.Describe(reinterpret_cast<uint64_t>(dkv), 0), o);
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  std::vector<uint8_t> pageable((*e)->blob_bytes());
  auto t = (*e)->Gather({1, 2}, {pageable.data()}, 0, nullptr);
  EXPECT_EQ(t.status().code(), StatusCode::kInvalidArgument) << t.status().ToString();
  EXPECT_NE(t.status().message().find("pinned"), std::string::npos);

  o.method = TransferMethod::kStaged;
  o.staging_bytes = 4096;  // four slots of 1 KiB cannot hold a 4 KiB page
  auto s = CopyEngine::Create(v.Describe(reinterpret_cast<uint64_t>(dkv), 0), o);
  EXPECT_EQ(s.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("staging_bytes"), std::string::npos);

  // Host memory described as a GPU layout.
  std::vector<uint8_t> host(v.bytes());
  o.method = TransferMethod::kAuto;
  auto h = CopyEngine::Create(v.Describe(reinterpret_cast<uint64_t>(host.data()), 0), o);
  EXPECT_EQ(h.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(h.status().message().find("not memory of GPU 0"), std::string::npos)
      << h.status().message();
  e->reset();
  cudaFree(dkv);
}

#endif  // KVTIER_HAVE_CUDA

}  // namespace
}  // namespace kvtier
