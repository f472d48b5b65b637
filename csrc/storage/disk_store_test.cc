// DiskStore and its I/O backends: round trips, eviction, recovery, corruption, faults
// (ENOSPC, EIO, short transfers, EAGAIN, lost completions) and deadlines. Every test runs on
// both backends; io_uring skips loudly where the kernel refuses it.
#include "storage/disk_store.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "common/mutex.h"
#include "storage/crc32c.h"
#include "storage/disk_test_util.h"
#include "storage/uring_backend.h"

namespace kvtier {
namespace {

using Clock = std::chrono::steady_clock;

std::string CacheFile(const test::TempDir& d) { return d.path() + "/" + kDiskCacheFileName; }

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<unsigned char, FreeDeleter>;

Buffer Aligned(size_t bytes) {
  void* p = nullptr;
  if (posix_memalign(&p, 4096, std::max<size_t>(bytes, 1)) != 0) std::abort();
  std::memset(p, 0, bytes);
  return Buffer(static_cast<unsigned char*>(p));
}

ChunkKey Key(uint64_t i) { return ChunkKey{0x9e3779b97f4a7c15ull * (i + 1), i ^ 0xabcdefull}; }

// Each key's blob is a pseudo-random function of the key, so any read can be checked.
void FillFor(const ChunkKey& key, unsigned char* p, size_t n) {
  std::mt19937_64 rng(key.lo ^ key.hi);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t v = rng();
    std::memcpy(p + i, &v, 8);
  }
  for (; i < n; ++i) p[i] = static_cast<unsigned char>(rng());
}

bool MatchesKey(const ChunkKey& key, const unsigned char* p, size_t n) {
  std::vector<unsigned char> want(n);
  FillFor(key, want.data(), n);
  return std::memcmp(want.data(), p, n) == 0;
}

// A callback and a bounded wait for it.
class Waiter {
 public:
  DiskStore::Callback Callback() {
    auto state = state_;
    return [state](const Status& s) {
      MutexLock lk(&state->mu);
      state->status = s;
      ++state->calls;
      state->cv.NotifyAll();
    };
  }
  Status Wait(int64_t ms = 10000) {
    MutexLock lk(&state_->mu);
    if (!state_->cv.WaitFor(lk, std::chrono::milliseconds(ms), [&] { return state_->calls > 0; })) {
      return Status::DeadlineExceeded("test wait timed out");
    }
    return state_->status;
  }
  int calls() {
    MutexLock lk(&state_->mu);
    return state_->calls;
  }

 private:
  struct State {
    Mutex mu;
    CondVar cv;
    Status status;
    int calls = 0;
  };
  std::shared_ptr<State> state_ = std::make_shared<State>();
};

Status WriteSync(DiskStore& store, const ChunkKey& key, const void* src) {
  Waiter w;
  Status s = store.Write(key, src, w.Callback());
  if (!s.ok()) return s;
  return w.Wait();
}

Status ReadSync(DiskStore& store, const ChunkKey& key, void* dst) {
  Waiter w;
  Status s = store.Read(key, dst, w.Callback());
  if (!s.ok()) return s;
  return w.Wait();
}

// Faults the tests switch on and off while a store runs.
struct Faults {
  std::atomic<int> write_errno{0};  // fail every write with -errno
  std::atomic<bool> lose_writes{false};
  std::atomic<bool> lose_reads{false};
  std::atomic<int64_t> lose_reads_at{-1};    // lose reads starting at this file offset
  std::atomic<bool> short_and_retry{false};  // halve transfers, and answer -EAGAIN / -EINTR first
  std::atomic<uint64_t> calls{0};

  IoFaultInjector Injector() {
    return [this](IoOp op, uint64_t offset, size_t, int res) -> int {
      uint64_t n = calls.fetch_add(1);
      if (op == IoOp::kWrite && lose_writes) return kIoFaultLoseCompletion;
      if (op == IoOp::kRead && lose_reads) return kIoFaultLoseCompletion;
      if (op == IoOp::kRead && static_cast<int64_t>(offset) == lose_reads_at)
        return kIoFaultLoseCompletion;
      if (op == IoOp::kWrite && write_errno != 0) return -write_errno;
      if (short_and_retry) {
        if (n % 3 == 0) return n % 2 ? -EAGAIN : -EINTR;
        // The bytes did move; reporting fewer makes the backend redo the rest (O_DIRECT needs
        // whole blocks, so the short count stays a multiple of 4 KiB).
        if (res >= 8192) return (res / 2) & ~4095;
      }
      return res;
    };
  }
};

class DiskStoreTest : public ::testing::TestWithParam<IoBackendKind> {
 protected:
  void SetUp() override {
    if (GetParam() == IoBackendKind::kIoUring) {
      const std::string why = test::UringUnavailable();
      if (!why.empty()) GTEST_SKIP() << "SKIPPED (io_uring unavailable here): " << why;
    }
  }

  DiskStoreOptions Options(uint64_t blob_bytes, size_t slots) {
    DiskStoreOptions o;
    o.dir = dir_.path();
    o.blob_bytes = blob_bytes;
    o.capacity_bytes = kDiskBlockBytes + slots * SlotBytesFor(blob_bytes);
    for (int i = 0; i < 16; ++i) o.layout_fingerprint[i] = static_cast<uint8_t>(0xA0 + i);
    o.backend = GetParam();
    o.queue_depth = 8;
    o.posix_threads = 4;
    o.io_timeout_ms = 5000;
    o.fault_injector = faults_.Injector();
    return o;
  }

  std::unique_ptr<DiskStore> OpenOrDie(const DiskStoreOptions& o) {
    auto s = DiskStore::Open(o);
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    if (!s.ok()) return nullptr;
    EXPECT_EQ(s.value()->backend(), GetParam());
    return std::move(s).value();
  }

  // Writes keys [first, first + n) with their blobs.
  void WriteKeys(DiskStore& store, uint64_t first, uint64_t n) {
    Buffer buf = Aligned(store.blob_bytes());
    for (uint64_t i = first; i < first + n; ++i) {
      FillFor(Key(i), buf.get(), store.blob_bytes());
      ASSERT_TRUE(WriteSync(store, Key(i), buf.get()).ok()) << i;
    }
  }

  void ExpectExact(DiskStore& store, uint64_t i) {
    Buffer buf = Aligned(store.blob_bytes());
    Status s = ReadSync(store, Key(i), buf.get());
    ASSERT_TRUE(s.ok()) << "key " << i << ": " << s.ToString();
    EXPECT_TRUE(MatchesKey(Key(i), buf.get(), store.blob_bytes())) << "key " << i;
  }

  // Overwrites bytes of the cache file behind the store's back (buffered; O_DIRECT reads see it).
  void Scribble(uint64_t offset, size_t n, unsigned char value) {
    int fd = open(CacheFile(dir_).c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    std::vector<unsigned char> bytes(n, value);
    ASSERT_EQ(pwrite(fd, bytes.data(), n, static_cast<off_t>(offset)), static_cast<ssize_t>(n));
    fsync(fd);
    close(fd);
  }

  test::TempDir dir_{"kvtier_disk_test"};
  Faults faults_;
};

TEST_P(DiskStoreTest, RoundTripLookupAndAlreadyExists) {
  auto store = OpenOrDie(Options(64 << 10, 16));
  ASSERT_TRUE(store);
  WriteKeys(*store, 0, 8);
  for (uint64_t i = 0; i < 8; ++i) ExpectExact(*store, i);
  std::vector<ChunkKey> keys = {Key(0), Key(1), Key(2), Key(100), Key(3)};
  EXPECT_EQ(store->Lookup(keys.data(), keys.size()), 3u);
  EXPECT_TRUE(store->Contains(Key(7)));
  EXPECT_FALSE(store->Contains(Key(8)));
  Buffer buf = Aligned(64 << 10);
  EXPECT_EQ(store->Write(Key(0), buf.get(), nullptr).code(), StatusCode::kAlreadyExists);
  EXPECT_EQ(store->Read(Key(9), buf.get(), nullptr).code(), StatusCode::kNotFound);
  DiskStoreStats st = store->stats();
  EXPECT_EQ(st.writes, 8u);
  EXPECT_EQ(st.reads, 8u);
  EXPECT_EQ(st.slots_used, 8u);
  EXPECT_EQ(st.slots_total, 16u);
  EXPECT_EQ(st.write_bytes, 8u * (64 << 10));
  EXPECT_EQ(st.backend, IoBackendKindName(GetParam()));
  EXPECT_TRUE(st.direct_io);
}

TEST_P(DiskStoreTest, MisalignedBuffersAreRefused) {
  auto store = OpenOrDie(Options(8192, 4));
  ASSERT_TRUE(store);
  Buffer buf = Aligned(8192 + 4096);
  EXPECT_EQ(store->Write(Key(0), buf.get() + 512, nullptr).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(store->Write(Key(0), nullptr, nullptr).code(), StatusCode::kInvalidArgument);
  EXPECT_FALSE(store->Contains(Key(0)));
}

TEST_P(DiskStoreTest, BlobNotAMultipleOfTheBlockSurvivesRoundTripAndReopen) {
  const uint64_t blob = 10000;  // 2 whole blocks + 1808 bytes through the bounce block
  {
    auto store = OpenOrDie(Options(blob, 8));
    ASSERT_TRUE(store);
    WriteKeys(*store, 0, 5);
    for (uint64_t i = 0; i < 5; ++i) ExpectExact(*store, i);
  }
  auto store = OpenOrDie(Options(blob, 8));
  ASSERT_TRUE(store);
  EXPECT_EQ(store->stats().recovered_slots, 5u);
  for (uint64_t i = 0; i < 5; ++i) ExpectExact(*store, i);
}

TEST_P(DiskStoreTest, EvictsLeastRecentlyUsedAtCapacity) {
  auto store = OpenOrDie(Options(8192, 4));
  ASSERT_TRUE(store);
  WriteKeys(*store, 0, 4);
  ExpectExact(*store, 0);  // key 0 becomes most recent: key 1 is now the oldest
  WriteKeys(*store, 4, 1);
  EXPECT_FALSE(store->Contains(Key(1)));
  for (uint64_t i : {0, 2, 3, 4}) ExpectExact(*store, i);
  EXPECT_EQ(store->stats().evictions, 1u);
  EXPECT_EQ(store->stats().slots_used, 4u);
}

TEST_P(DiskStoreTest, ReadBatchLeavesThePrefixHeadMostRecent) {
  auto store = OpenOrDie(Options(8192, 4));
  ASSERT_TRUE(store);
  WriteKeys(*store, 0, 4);
  Buffer a = Aligned(8192), b = Aligned(8192);
  ChunkKey keys[2] = {Key(0), Key(1)};
  void* dsts[2] = {a.get(), b.get()};
  std::atomic<int> ok{0};
  Waiter w0, w1;
  auto cb0 = w0.Callback(), cb1 = w1.Callback();
  ASSERT_TRUE(
      store->ReadBatch(keys, dsts, 2, [&](size_t i, const Status& s) { (i == 0 ? cb0 : cb1)(s); })
          .ok());
  ASSERT_TRUE(w0.Wait().ok());
  ASSERT_TRUE(w1.Wait().ok());
  EXPECT_TRUE(MatchesKey(Key(0), a.get(), 8192));
  EXPECT_TRUE(MatchesKey(Key(1), b.get(), 8192));
  // Recency now, oldest first: 2, 3, 1, 0. Three new chunks evict 2, 3 and 1 in that order.
  WriteKeys(*store, 10, 3);
  EXPECT_TRUE(store->Contains(Key(0)));
  EXPECT_FALSE(store->Contains(Key(1)));
  EXPECT_FALSE(store->Contains(Key(2)));
  // A batch with one missing key starts nothing.
  ASSERT_TRUE(store->Flush(5000).ok());  // `done` runs just before its request is released
  ChunkKey mixed[2] = {Key(0), Key(1)};
  EXPECT_EQ(store->ReadBatch(mixed, dsts, 2, nullptr).code(), StatusCode::kNotFound);
  EXPECT_EQ(store->stats().in_flight, 0u);
  EXPECT_EQ(store->stats().slots_pinned, 0u);
}

TEST_P(DiskStoreTest, PinnedSlotIsNeverEvicted) {
  DiskStoreOptions o = Options(8192, 2);
  o.io_timeout_ms = 400;
  auto store = OpenOrDie(o);
  ASSERT_TRUE(store);
  WriteKeys(*store, 0, 2);
  Buffer dst = Aligned(8192);
  // The read of key 0 (slot 0) stays in flight, pinned, until its deadline.
  faults_.lose_reads_at = static_cast<int64_t>(SlotOffset(0, SlotBytesFor(8192)));
  Waiter reading;
  ASSERT_TRUE(store->Read(Key(0), dst.get(), reading.Callback()).ok());
  WriteKeys(*store, 2, 1);  // evicts key 1, the only unpinned chunk
  EXPECT_TRUE(store->Contains(Key(0)));
  EXPECT_FALSE(store->Contains(Key(1)));
  WriteKeys(*store, 3, 1);  // key 0 is now least recent but pinned: key 2 goes
  EXPECT_TRUE(store->Contains(Key(0)));
  EXPECT_FALSE(store->Contains(Key(2)));
  EXPECT_EQ(store->stats().slots_pinned, 1u);
  EXPECT_EQ(reading.Wait().code(), StatusCode::kDeadlineExceeded);
  ASSERT_TRUE(store->Flush(5000).ok());
  faults_.lose_reads_at = -1;
  EXPECT_TRUE(store->Contains(Key(0)));  // a timed-out read keeps the entry
  ExpectExact(*store, 0);
}

TEST_P(DiskStoreTest, WriteIsRefusedWhenEverySlotIsPinned) {
  DiskStoreOptions o = Options(8192, 1);
  o.io_timeout_ms = 300;
  auto store = OpenOrDie(o);
  ASSERT_TRUE(store);
  WriteKeys(*store, 0, 1);
  Buffer dst = Aligned(8192), src = Aligned(8192);
  faults_.lose_reads = true;
  Waiter reading;
  ASSERT_TRUE(store->Read(Key(0), dst.get(), reading.Callback()).ok());
  EXPECT_EQ(store->Write(Key(1), src.get(), nullptr).code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(store->stats().writes_rejected_busy, 1u);
  EXPECT_EQ(store->Erase(Key(0)).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(reading.Wait().code(), StatusCode::kDeadlineExceeded);
  ASSERT_TRUE(store->Flush(5000).ok());
  faults_.lose_reads = false;
  WriteKeys(*store, 1, 1);
  ExpectExact(*store, 1);
}

TEST_P(DiskStoreTest, RecoveryBringsBackEveryChunkBitExactInLruOrder) {
  {
    auto store = OpenOrDie(Options(16 << 10, 32));
    ASSERT_TRUE(store);
    WriteKeys(*store, 0, 20);
  }
  auto store = OpenOrDie(Options(16 << 10, 32));
  ASSERT_TRUE(store);
  DiskStoreStats st = store->stats();
  EXPECT_EQ(st.recovered_slots, 20u);
  EXPECT_EQ(st.skipped_slots_at_open, 0u);
  EXPECT_TRUE(st.payloads_verified_at_open);
  EXPECT_FALSE(st.reformatted_at_open);
  EXPECT_GT(st.open_seconds, 0.0);
  for (uint64_t i = 0; i < 20; ++i) EXPECT_TRUE(store->Contains(Key(i)));
  // Fill the 12 free slots, then one more: the oldest write (key 0) is evicted first.
  WriteKeys(*store, 100, 13);
  EXPECT_FALSE(store->Contains(Key(0)));
  for (uint64_t i = 1; i < 20; ++i) ExpectExact(*store, i);
}

// What a VisibilityObserver hears: +(i+1) for "Key(i) became visible", -(i+1) for "stopped".
void HearVisibility(void* ctx, const ChunkKey& key, bool visible) {
  const int64_t i = static_cast<int64_t>(key.hi ^ 0xabcdefull);
  static_cast<std::vector<int64_t>*>(ctx)->push_back(visible ? i + 1 : -(i + 1));
}

TEST_P(DiskStoreTest, VisibilityObserverHearsEachChangeOnce) {
  auto store = OpenOrDie(Options(8192, 3));
  ASSERT_TRUE(store);
  WriteKeys(*store, 0, 2);  // slots 0 and 1
  std::vector<int64_t> heard;
  store->SetVisibilityObserver(&HearVisibility, &heard);  // what is visible now, LRU first
  EXPECT_EQ(heard, (std::vector<int64_t>{1, 2}));
  WriteKeys(*store, 2, 2);  // key 2 takes slot 2; key 3 evicts key 0, the least recent
  EXPECT_EQ(heard, (std::vector<int64_t>{1, 2, 3, -1, 4}));
  ASSERT_TRUE(store->Erase(Key(1)).ok());
  EXPECT_EQ(heard.back(), -2);
  ASSERT_TRUE(store->Flush(5000).ok());  // the erase's header write ends: slot 1 is free again
  faults_.write_errno = EIO;             // a failed write was never visible: nothing to hear
  Buffer buf = Aligned(8192);
  FillFor(Key(5), buf.get(), 8192);
  EXPECT_FALSE(WriteSync(*store, Key(5), buf.get()).ok());
  faults_.write_errno = 0;
  EXPECT_EQ(heard.size(), 6u);
  Scribble(SlotOffset(2, SlotBytesFor(8192)) + kDiskBlockBytes + 100, 1, 0x5A);  // key 2's payload
  EXPECT_EQ(ReadSync(*store, Key(2), buf.get()).code(), StatusCode::kCorruption);
  EXPECT_EQ(heard, (std::vector<int64_t>{1, 2, 3, -1, 4, -2, -3}));
}

TEST_P(DiskStoreTest, CorruptPayloadIsAMissNeverWrongBytes) {
  {
    auto store = OpenOrDie(Options(8192, 8));
    ASSERT_TRUE(store);
    WriteKeys(*store, 0, 4);
    // Corrupt key 1's payload while the store is open: the read must catch it.
    Scribble(SlotOffset(1, SlotBytesFor(8192)) + kDiskBlockBytes + 100, 1, 0x5A);
    Buffer dst = Aligned(8192);
    Status s = ReadSync(*store, Key(1), dst.get());
    EXPECT_EQ(s.code(), StatusCode::kCorruption) << s.ToString();
    EXPECT_FALSE(store->Contains(Key(1)));
    EXPECT_EQ(store->stats().corrupt_detected, 1u);
    ExpectExact(*store, 0);
    // Damage key 2 while closed.
  }
  Scribble(SlotOffset(2, SlotBytesFor(8192)) + kDiskBlockBytes + 5000, 3, 0x00);
  {
    // Full verification at open: key 2 is skipped (key 1's slot too: its bytes are still bad).
    auto store = OpenOrDie(Options(8192, 8));
    ASSERT_TRUE(store);
    DiskStoreStats st = store->stats();
    EXPECT_TRUE(st.payloads_verified_at_open);
    EXPECT_EQ(st.recovered_slots, 2u);
    EXPECT_EQ(st.skipped_slots_at_open, 2u);
    EXPECT_FALSE(store->Contains(Key(2)));
    ExpectExact(*store, 0);
    ExpectExact(*store, 3);
  }
  // Headers only: key 2 looks present until its first read, which reports and drops it.
  DiskStoreOptions o = Options(8192, 8);
  o.verify_at_open = VerifyAtOpen::kHeaders;
  auto store = OpenOrDie(o);
  ASSERT_TRUE(store);
  EXPECT_FALSE(store->stats().payloads_verified_at_open);
  EXPECT_TRUE(store->Contains(Key(2)));
  Buffer dst = Aligned(8192);
  EXPECT_EQ(ReadSync(*store, Key(2), dst.get()).code(), StatusCode::kCorruption);
  EXPECT_FALSE(store->Contains(Key(2)));
  EXPECT_EQ(store->stats().corrupt_detected, 1u);
}

// A caller that knows the blob's CRC32C passes it: the right one reads back, a wrong one is
// caught by the read's check (a miss, never wrong bytes), like a corrupt payload.
TEST_P(DiskStoreTest, AKnownChecksumIsTakenAndAWrongOneIsAMiss) {
  auto store = OpenOrDie(Options(8192, 8));
  ASSERT_TRUE(store);
  Buffer buf = Aligned(8192);
  for (uint64_t i : {1, 2}) {
    FillFor(Key(i), buf.get(), 8192);
    const uint32_t crc = Crc32c(0, buf.get(), 8192) ^ (i == 2 ? 1u : 0u);  // key 2: wrong
    Waiter w;
    ASSERT_TRUE(store->Write(Key(i), buf.get(), crc, w.Callback()).ok());
    ASSERT_TRUE(w.Wait().ok());
  }
  ExpectExact(*store, 1);
  Buffer dst = Aligned(8192);
  EXPECT_EQ(ReadSync(*store, Key(2), dst.get()).code(), StatusCode::kCorruption);
  EXPECT_FALSE(store->Contains(Key(2)));
  EXPECT_EQ(store->stats().corrupt_detected, 1u);
}

TEST_P(DiskStoreTest, CorruptHeaderIsSkippedAndReclaimed) {
  {
    auto store = OpenOrDie(Options(8192, 4));
    ASSERT_TRUE(store);
    WriteKeys(*store, 0, 4);
  }
  Scribble(SlotOffset(3, SlotBytesFor(8192)) + 20, 1, 0x77);  // inside the key field
  auto store = OpenOrDie(Options(8192, 4));
  ASSERT_TRUE(store);
  EXPECT_EQ(store->stats().recovered_slots, 3u);
  EXPECT_EQ(store->stats().skipped_slots_at_open, 1u);
  EXPECT_FALSE(store->Contains(Key(3)));
  WriteKeys(*store, 10, 1);  // the reclaimed slot is free: nothing is evicted
  EXPECT_EQ(store->stats().evictions, 0u);
  for (uint64_t i : {0, 1, 2, 10}) ExpectExact(*store, i);
}

TEST_P(DiskStoreTest, TruncatedFileLosesOnlyTheCutSlots) {
  {
    auto store = OpenOrDie(Options(8192, 8));
    ASSERT_TRUE(store);
    WriteKeys(*store, 0, 8);
  }
  // Cut the file in the middle of slot 5's payload.
  ASSERT_EQ(truncate(CacheFile(dir_).c_str(),
                     static_cast<off_t>(SlotOffset(5, SlotBytesFor(8192)) + 6000)),
            0);
  auto store = OpenOrDie(Options(8192, 8));
  ASSERT_TRUE(store);
  EXPECT_EQ(store->stats().recovered_slots, 5u);
  for (uint64_t i = 0; i < 5; ++i) ExpectExact(*store, i);
  for (uint64_t i = 5; i < 8; ++i) EXPECT_FALSE(store->Contains(Key(i)));
}

TEST_P(DiskStoreTest, OtherLayoutOrLabelIsRefusedAndTheCacheKept) {
  DiskStoreOptions mine = Options(8192, 4);
  mine.geometry_label = "model_id='m' chunk_tokens=16";
  {
    auto store = OpenOrDie(mine);
    ASSERT_TRUE(store);
    WriteKeys(*store, 0, 3);
  }
  DiskStoreOptions other_layout = mine;
  other_layout.layout_fingerprint[0] ^= 1;
  DiskStoreOptions other_label = mine;
  other_label.geometry_label = "model_id='n' chunk_tokens=16";
  for (const DiskStoreOptions& o : {other_layout, other_label}) {
    auto refused = DiskStore::Open(o);
    ASSERT_FALSE(refused.ok());
    EXPECT_EQ(refused.status().code(), StatusCode::kGeometryMismatch)
        << refused.status().ToString();
    const std::string& m = refused.status().message();
    EXPECT_NE(m.find("a0a1a2a3"), std::string::npos) << m;  // what the file holds
    EXPECT_NE(m.find("model_id='m'"), std::string::npos) << m;
    EXPECT_NE(m.find(o.geometry_label), std::string::npos) << m;  // what was asked
    EXPECT_NE(m.find("kvtier cache reset"), std::string::npos) << m;
  }
  auto store = OpenOrDie(mine);  // nothing was lost
  ASSERT_TRUE(store);
  EXPECT_EQ(store->stats().recovered_slots, 3u);
  EXPECT_FALSE(store->stats().reformatted_at_open);
  for (uint64_t i = 0; i < 3; ++i) ExpectExact(*store, i);
}

TEST_P(DiskStoreTest, HeaderWithoutGeometryRecordIsKeptAndGetsOne) {
  {
    auto store = OpenOrDie(Options(8192, 4));
    ASSERT_TRUE(store);
    WriteKeys(*store, 0, 3);
  }
  // A file written before the header recorded its layout: zeros after the first header CRC.
  Scribble(64, kDiskBlockBytes - 64, 0);
  {
    auto store = OpenOrDie(Options(8192, 4));
    ASSERT_TRUE(store);
    EXPECT_EQ(store->stats().recovered_slots, 3u);
    EXPECT_FALSE(store->stats().reformatted_at_open);
  }
  DiskStoreOptions other = Options(8192, 4);
  other.layout_fingerprint[0] ^= 1;
  auto refused = DiskStore::Open(other);  // the record written at the last open is checked
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), StatusCode::kGeometryMismatch);
}

TEST_P(DiskStoreTest, ResetOnMismatchWipesOnlyWhenAsked) {
  {
    auto store = OpenOrDie(Options(8192, 4));
    ASSERT_TRUE(store);
    WriteKeys(*store, 0, 4);
  }
  DiskStoreOptions other = Options(8192, 4);
  other.layout_fingerprint[0] ^= 1;
  other.reset_on_mismatch = true;
  auto store = OpenOrDie(other);
  ASSERT_TRUE(store);
  DiskStoreStats st = store->stats();
  EXPECT_TRUE(st.reformatted_at_open);
  EXPECT_NE(st.reformat_reason.find("reset_on_mismatch"), std::string::npos) << st.reformat_reason;
  EXPECT_EQ(st.recovered_slots, 0u);
  WriteKeys(*store, 10, 4);  // every slot is free for the new geometry
  EXPECT_EQ(store->stats().evictions, 0u);
}

TEST_P(DiskStoreTest, ResetDeletesTheFileOnlyWhenNoStoreHasIt) {
  std::string held;
  EXPECT_EQ(DiskStore::Reset(dir_.path(), &held).code(), StatusCode::kNotFound);
  DiskStoreOptions o = Options(8192, 4);
  o.geometry_label = "model_id='m'";
  {
    auto store = OpenOrDie(o);
    ASSERT_TRUE(store);
    WriteKeys(*store, 0, 2);
    EXPECT_EQ(DiskStore::Reset(dir_.path(), &held).code(), StatusCode::kFailedPrecondition);
    ExpectExact(*store, 0);
  }
  ASSERT_TRUE(DiskStore::Reset(dir_.path(), &held).ok());
  EXPECT_NE(held.find("chunk_bytes 8192"), std::string::npos) << held;
  EXPECT_NE(held.find("model_id='m'"), std::string::npos) << held;
  struct stat st {};
  EXPECT_NE(stat(CacheFile(dir_).c_str(), &st), 0);
  auto store = OpenOrDie(Options(16384, 4));  // any geometry may use the directory now
  ASSERT_TRUE(store);
  EXPECT_EQ(store->stats().recovered_slots, 0u);
}

TEST_P(DiskStoreTest, GeometryChangeIsRefusedAndCapacityChangeKeepsWhatFits) {
  {
    auto store = OpenOrDie(Options(8192, 8));
    ASSERT_TRUE(store);
    WriteKeys(*store, 0, 8);
  }
  {
    auto store = OpenOrDie(Options(8192, 4));  // smaller: slots 4..7 are cut off
    ASSERT_TRUE(store);
    EXPECT_EQ(store->stats().recovered_slots, 4u);
    EXPECT_EQ(store->num_slots(), 4u);
    struct stat st {};
    ASSERT_EQ(stat(CacheFile(dir_).c_str(), &st), 0);
    EXPECT_LE(static_cast<uint64_t>(st.st_size), Options(8192, 4).capacity_bytes);
    for (uint64_t i = 0; i < 4; ++i) ExpectExact(*store, i);
  }
  // Another blob size (another chunk size): refused, naming both, and the file left as it was.
  auto refused = DiskStore::Open(Options(16384, 4));
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), StatusCode::kGeometryMismatch) << refused.status().ToString();
  EXPECT_NE(refused.status().message().find("chunk_bytes 8192"), std::string::npos)
      << refused.status().message();
  EXPECT_NE(refused.status().message().find("chunk_bytes 16384"), std::string::npos)
      << refused.status().message();
  {
    auto store = OpenOrDie(Options(8192, 4));
    ASSERT_TRUE(store);
    EXPECT_EQ(store->stats().recovered_slots, 4u);
    for (uint64_t i = 0; i < 4; ++i) ExpectExact(*store, i);
  }
  DiskStoreOptions reset = Options(16384, 4);
  reset.reset_on_mismatch = true;  // asked for: the old slots go
  auto store = OpenOrDie(reset);
  ASSERT_TRUE(store);
  DiskStoreStats st = store->stats();
  EXPECT_TRUE(st.reformatted_at_open);
  EXPECT_NE(st.reformat_reason.find("chunk_bytes 8192"), std::string::npos) << st.reformat_reason;
  EXPECT_EQ(st.recovered_slots, 0u);
}

TEST_P(DiskStoreTest, EraseIsImmediateAndPersistent) {
  {
    auto store = OpenOrDie(Options(8192, 4));
    ASSERT_TRUE(store);
    WriteKeys(*store, 0, 3);
    ASSERT_TRUE(store->Erase(Key(1)).ok());
    EXPECT_FALSE(store->Contains(Key(1)));
    EXPECT_EQ(store->Erase(Key(1)).code(), StatusCode::kNotFound);
    ASSERT_TRUE(store->Flush(5000).ok());
    EXPECT_EQ(store->stats().erases, 1u);
  }
  auto store = OpenOrDie(Options(8192, 4));
  ASSERT_TRUE(store);
  EXPECT_EQ(store->stats().recovered_slots, 2u);
  EXPECT_FALSE(store->Contains(Key(1)));
  ExpectExact(*store, 0);
  ExpectExact(*store, 2);
}

TEST_P(DiskStoreTest, EnospcFailsTheWritePausesAdmissionAndKeepsCachedChunks) {
  DiskStoreOptions o = Options(8192, 8);
  o.nospace_retry_ms = 150;
  auto store = OpenOrDie(o);
  ASSERT_TRUE(store);
  WriteKeys(*store, 0, 2);
  Buffer src = Aligned(8192);
  FillFor(Key(5), src.get(), 8192);
  faults_.write_errno = ENOSPC;
  Status s = WriteSync(*store, Key(5), src.get());
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted) << s.ToString();
  EXPECT_FALSE(store->Contains(Key(5)));
  DiskStoreStats st = store->stats();
  EXPECT_EQ(st.enospc, 1u);
  EXPECT_TRUE(st.nospace);
  EXPECT_EQ(st.slots_used, 2u);
  // Paused: refused at once, without I/O.
  EXPECT_EQ(store->Write(Key(6), src.get(), nullptr).code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(store->stats().writes_refused_nospace, 1u);
  ExpectExact(*store, 0);
  ExpectExact(*store, 1);
  // Space returns; after the retry interval one probe write goes through and resumes admission.
  faults_.write_errno = 0;
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  WriteKeys(*store, 5, 2);
  EXPECT_FALSE(store->stats().nospace);
  for (uint64_t i : {0, 1, 5, 6}) ExpectExact(*store, i);
}

TEST_P(DiskStoreTest, EioOnWriteIsNeverVisible) {
  auto store = OpenOrDie(Options(8192, 4));
  ASSERT_TRUE(store);
  WriteKeys(*store, 0, 1);
  Buffer src = Aligned(8192);
  faults_.write_errno = EIO;
  Status s = WriteSync(*store, Key(1), src.get());
  EXPECT_EQ(s.code(), StatusCode::kIoError) << s.ToString();
  EXPECT_FALSE(store->Contains(Key(1)));
  EXPECT_EQ(store->stats().write_failures, 1u);
  EXPECT_FALSE(store->stats().nospace);
  faults_.write_errno = 0;
  WriteKeys(*store, 1, 1);
  ExpectExact(*store, 0);
  ExpectExact(*store, 1);
}

TEST_P(DiskStoreTest, ShortTransfersEagainAndEintrAreResubmitted) {
  auto store = OpenOrDie(Options(256 << 10, 8));
  ASSERT_TRUE(store);
  faults_.short_and_retry = true;
  WriteKeys(*store, 0, 6);
  for (uint64_t i = 0; i < 6; ++i) ExpectExact(*store, i);
  faults_.short_and_retry = false;
  EXPECT_GT(store->stats().io_resubmits, 12u);
  EXPECT_EQ(store->stats().write_failures, 0u);
  store.reset();
  auto reopened = OpenOrDie(Options(256 << 10, 8));
  ASSERT_TRUE(reopened);
  EXPECT_EQ(reopened->stats().recovered_slots, 6u);
  for (uint64_t i = 0; i < 6; ++i) ExpectExact(*reopened, i);
}

TEST_P(DiskStoreTest, WritePastItsDeadlineFailsInTimeAndIsNeverVisible) {
  DiskStoreOptions o = Options(8192, 2);
  o.io_timeout_ms = 300;
  auto store = OpenOrDie(o);
  ASSERT_TRUE(store);
  Buffer src = Aligned(8192);
  FillFor(Key(0), src.get(), 8192);
  faults_.lose_writes = true;
  auto t0 = Clock::now();
  Waiter w;
  ASSERT_TRUE(store->Write(Key(0), src.get(), w.Callback()).ok());
  EXPECT_EQ(w.Wait(5000).code(), StatusCode::kDeadlineExceeded);
  double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  EXPECT_GE(secs, 0.25);
  EXPECT_LT(secs, 3.0);
  EXPECT_EQ(w.calls(), 1);
  EXPECT_FALSE(store->Contains(Key(0)));
  ASSERT_TRUE(store->Flush(5000).ok());
  DiskStoreStats st = store->stats();
  EXPECT_EQ(st.deadline_exceeded, 1u);
  EXPECT_EQ(st.abandoned_in_flight, 0u);
  EXPECT_EQ(st.write_failures, 1u);
  faults_.lose_writes = false;
  WriteKeys(*store, 0, 2);  // both slots usable again
  ExpectExact(*store, 0);
  ExpectExact(*store, 1);
}

TEST_P(DiskStoreTest, FlushHasADeadline) {
  DiskStoreOptions o = Options(8192, 2);
  o.io_timeout_ms = 600;
  auto store = OpenOrDie(o);
  ASSERT_TRUE(store);
  Buffer src = Aligned(8192);
  faults_.lose_writes = true;
  Waiter w;
  ASSERT_TRUE(store->Write(Key(0), src.get(), w.Callback()).ok());
  EXPECT_EQ(store->Flush(50).code(), StatusCode::kDeadlineExceeded);
  EXPECT_EQ(w.Wait().code(), StatusCode::kDeadlineExceeded);
  EXPECT_TRUE(store->Flush(5000).ok());
}

TEST_P(DiskStoreTest, ConcurrentWritersAndReadersNeverSeeWrongBytes) {
  auto store = OpenOrDie(Options(32 << 10, 16));
  ASSERT_TRUE(store);
  std::atomic<int> wrong{0}, read_ok{0}, write_ok{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      Buffer buf = Aligned(32 << 10);
      for (int i = 0; i < 150; ++i) {
        uint64_t k = rng() % 40;  // more keys than slots: constant eviction
        if (rng() % 2) {
          FillFor(Key(k), buf.get(), 32 << 10);
          if (WriteSync(*store, Key(k), buf.get()).ok()) ++write_ok;
        } else if (ReadSync(*store, Key(k), buf.get()).ok()) {
          ++read_ok;
          if (!MatchesKey(Key(k), buf.get(), 32 << 10)) ++wrong;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_GT(write_ok.load(), 0);
  EXPECT_GT(read_ok.load(), 0);
  ASSERT_TRUE(store->Flush(5000).ok());
  DiskStoreStats st = store->stats();
  EXPECT_LE(st.slots_used, 16u);
  EXPECT_EQ(st.corrupt_detected, 0u);
  EXPECT_EQ(st.in_flight, 0u);
}

TEST_P(DiskStoreTest, SecondStoreOnTheSameDirIsRefused) {
  auto store = OpenOrDie(Options(8192, 4));
  ASSERT_TRUE(store);
  auto second = DiskStore::Open(Options(8192, 4));
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(second.status().message().find(kDiskCacheFileName), std::string::npos);
}

TEST_P(DiskStoreTest, CapacityIsAHardBound) {
  DiskStoreOptions o = Options(8192, 5);
  o.capacity_bytes += 8191;  // not enough for a sixth slot
  auto store = OpenOrDie(o);
  ASSERT_TRUE(store);
  EXPECT_EQ(store->num_slots(), 5u);
  struct stat st {};
  ASSERT_EQ(stat(CacheFile(dir_).c_str(), &st), 0);
  EXPECT_LE(static_cast<uint64_t>(st.st_size), o.capacity_bytes);
  WriteKeys(*store, 0, 12);
  EXPECT_EQ(store->stats().slots_used, 5u);
  EXPECT_EQ(store->stats().evictions, 7u);
}

TEST_P(DiskStoreTest, BadOptionsAndDirectoriesAreNamed) {
  DiskStoreOptions o = Options(8192, 4);
  o.dir = dir_.path() + "/does-not-exist";
  auto s = DiskStore::Open(o);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("does-not-exist"), std::string::npos) << s.status().message();

  std::string file = dir_.path() + "/plain-file";
  close(open(file.c_str(), O_CREAT | O_WRONLY, 0644));
  o.dir = file;
  s = DiskStore::Open(o);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("not a directory"), std::string::npos);

  o = Options(8192, 4);
  o.blob_bytes = 0;
  EXPECT_EQ(DiskStore::Open(o).status().code(), StatusCode::kInvalidArgument);
  o = Options(8192, 4);
  o.capacity_bytes = 4096;
  s = DiskStore::Open(o);
  EXPECT_EQ(s.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("capacity_bytes"), std::string::npos);
  o = Options(8192, 4);
  o.queue_depth = 0;
  EXPECT_EQ(DiskStore::Open(o).status().code(), StatusCode::kInvalidArgument);
  o = Options(8192, 4);
  o.io_timeout_ms = 0;
  EXPECT_EQ(DiskStore::Open(o).status().code(), StatusCode::kInvalidArgument);
}

INSTANTIATE_TEST_SUITE_P(Backends, DiskStoreTest,
                         ::testing::Values(IoBackendKind::kPosix, IoBackendKind::kIoUring),
                         [](const ::testing::TestParamInfo<IoBackendKind>& info) {
                           return info.param == IoBackendKind::kPosix ? std::string("Posix")
                                                                      : std::string("IoUring");
                         });

}  // namespace
}  // namespace kvtier
