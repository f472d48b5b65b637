// IoBackend on its own (both implementations): more requests than the queue depth, all complete
// and land where they should. Fault handling (short transfers, EAGAIN, ENOSPC, EIO, deadlines) is
// tested through the store in disk_store_test.cc, on both backends.
#include "storage/io_backend.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/mutex.h"
#include "storage/disk_test_util.h"

namespace kvtier {
namespace {

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<unsigned char, FreeDeleter>;

Buffer Aligned(size_t bytes) {
  void* p = nullptr;
  if (posix_memalign(&p, 4096, bytes) != 0) std::abort();
  return Buffer(static_cast<unsigned char*>(p));
}

class IoBackendTest : public ::testing::TestWithParam<IoBackendKind> {};

struct Counter final : IoCompletion {
  Mutex* mu;
  CondVar* cv;
  int* done_ok;
  int* released;
  void OnIoDone(const Status& s) override {
    MutexLock lk(&*mu);
    if (s.ok()) ++*done_ok;
  }
  void OnIoReleased() override {
    MutexLock lk(&*mu);
    ++*released;
    cv->NotifyAll();
  }
};

TEST_P(IoBackendTest, ManyMoreRequestsThanTheQueueDepthAllComplete) {
  test::TempDir dir{"kvtier_io_test"};
  std::string path = dir.path() + "/raw";
  int fd = open(path.c_str(), O_RDWR | O_CREAT | O_DIRECT, 0644);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(ftruncate(fd, 256 * 4096), 0);
  IoBackendOptions o;
  o.queue_depth = 2;
  o.posix_threads = 2;
  auto backend = CreateIoBackend(GetParam(), fd, o);
  if (!backend.ok()) {
    close(fd);
    GTEST_SKIP() << "SKIPPED (backend unavailable here): " << backend.status().ToString();
  }
  ASSERT_EQ((*backend)->kind(), GetParam());
  Mutex mu;
  CondVar cv;
  int done_ok = 0, released = 0;
  Buffer data = Aligned(256 * 4096);
  for (size_t i = 0; i < 256 * 4096; ++i) data.get()[i] = static_cast<unsigned char>(i * 31 + 7);
  std::vector<Counter> counters(256);
  std::vector<IoRequest> reqs(256);
  std::vector<IoRequest*> ptrs;
  for (int i = 0; i < 256; ++i) {
    counters[i] = Counter{};
    counters[i].mu = &mu;
    counters[i].cv = &cv;
    counters[i].done_ok = &done_ok;
    counters[i].released = &released;
    reqs[i].op = IoOp::kWrite;
    reqs[i].offset = i * 4096ull;
    reqs[i].iov[0] = {data.get() + i * 4096, 4096};
    reqs[i].iovcnt = 1;
    reqs[i].deadline_ns = MonotonicNowNs() + 10'000'000'000;
    reqs[i].completion = &counters[i];
    ptrs.push_back(&reqs[i]);
  }
  (*backend)->Submit(ptrs.data(), ptrs.size());
  {
    MutexLock lk(&mu);
    ASSERT_TRUE(cv.WaitFor(lk, std::chrono::seconds(20), [&] { return released == 256; }));
  }
  EXPECT_EQ(done_ok, 256);
  EXPECT_TRUE((*backend)->Shutdown(MonotonicNowNs() + 1'000'000'000).ok());
  EXPECT_EQ((*backend)->stats().submitted, 256u);
  std::vector<unsigned char> back(256 * 4096);
  int plain = open(path.c_str(), O_RDONLY);
  ASSERT_EQ(pread(plain, back.data(), back.size(), 0), static_cast<ssize_t>(back.size()));
  close(plain);
  EXPECT_EQ(std::memcmp(back.data(), data.get(), back.size()), 0);
  close(fd);
}

INSTANTIATE_TEST_SUITE_P(Backends, IoBackendTest,
                         ::testing::Values(IoBackendKind::kPosix, IoBackendKind::kIoUring),
                         [](const ::testing::TestParamInfo<IoBackendKind>& info) {
                           return info.param == IoBackendKind::kPosix ? std::string("Posix")
                                                                      : std::string("IoUring");
                         });

}  // namespace
}  // namespace kvtier
