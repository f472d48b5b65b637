// Tests for Arena: host alignment and writability, the pinned -> host fallback, bad sizes, and a
// device request on a machine without a GPU (an error value, never a crash).
#include "memory/arena.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>

namespace kvtier {
namespace {

constexpr size_t kTwoMiB = size_t{2} << 20;

bool Aligned(const void* p, size_t to) { return reinterpret_cast<uintptr_t>(p) % to == 0; }

TEST(ArenaTest, KindNames) {
  EXPECT_STREQ(ArenaKindName(ArenaKind::kDevice), "device");
  EXPECT_STREQ(ArenaKindName(ArenaKind::kPinnedHost), "pinned_host");
  EXPECT_STREQ(ArenaKindName(ArenaKind::kHost), "host");
}

TEST(ArenaTest, HostArenaIsTwoMiBAlignedZeroedAndWritable) {
  // Sizes below, at and above the 2 MiB rounding, including an odd one.
  for (size_t bytes :
       {size_t{1}, size_t{4096}, kTwoMiB - 1, kTwoMiB, kTwoMiB + 3, 3 * kTwoMiB + 17}) {
    SCOPED_TRACE(bytes);
    auto arena = Arena::Create(ArenaKind::kHost, bytes);
    ASSERT_TRUE(arena.ok()) << arena.status().ToString();
    const Arena& a = **arena;
    EXPECT_EQ(a.kind(), ArenaKind::kHost);
    EXPECT_EQ(a.requested_kind(), ArenaKind::kHost);
    EXPECT_EQ(a.size(), bytes);
    EXPECT_TRUE(a.fallback_reason().empty());
    EXPECT_EQ(a.device_alias(), nullptr);
    ASSERT_NE(a.base(), nullptr);
    EXPECT_TRUE(Aligned(a.base(), kTwoMiB)) << a.base();

    auto* p = static_cast<unsigned char*>(a.base());
    // Anonymous mappings start zeroed; check the ends and the middle.
    EXPECT_EQ(p[0], 0);
    EXPECT_EQ(p[bytes / 2], 0);
    EXPECT_EQ(p[bytes - 1], 0);
    for (size_t i = 0; i < bytes; ++i) p[i] = static_cast<unsigned char>(i * 131 + 7);
    for (size_t i = 0; i < bytes; ++i) {
      ASSERT_EQ(p[i], static_cast<unsigned char>(i * 131 + 7)) << "at byte " << i;
    }
  }
}

TEST(ArenaTest, TwoHostArenasDoNotOverlap) {
  auto a = Arena::Create(ArenaKind::kHost, kTwoMiB + 1);
  auto b = Arena::Create(ArenaKind::kHost, kTwoMiB + 1);
  ASSERT_TRUE(a.ok() && b.ok());
  auto a0 = reinterpret_cast<uintptr_t>((*a)->base());
  auto b0 = reinterpret_cast<uintptr_t>((*b)->base());
  EXPECT_TRUE(a0 + (*a)->size() <= b0 || b0 + (*b)->size() <= a0);
  std::memset((*a)->base(), 0xAA, (*a)->size());
  std::memset((*b)->base(), 0x55, (*b)->size());
  EXPECT_EQ(static_cast<unsigned char*>((*a)->base())[(*a)->size() - 1], 0xAA);
  EXPECT_EQ(static_cast<unsigned char*>((*b)->base())[0], 0x55);
}

// Passes on both kinds of machine: with a usable driver the arena is pinned; without one (or in a
// build without CUDA) it is plain host memory that says why.
TEST(ArenaTest, PinnedArenaIsPinnedOrFallsBackToHostWithAReason) {
  const size_t bytes = kTwoMiB + 4096;
  auto arena = Arena::Create(ArenaKind::kPinnedHost, bytes);
  ASSERT_TRUE(arena.ok()) << arena.status().ToString();
  const Arena& a = **arena;
  EXPECT_EQ(a.requested_kind(), ArenaKind::kPinnedHost);
  EXPECT_EQ(a.size(), bytes);
  ASSERT_NE(a.base(), nullptr);
  EXPECT_TRUE(Aligned(a.base(), kTwoMiB));

  const Status probe = ProbePinnedMemory();
  if (a.kind() == ArenaKind::kPinnedHost) {
    EXPECT_TRUE(a.fallback_reason().empty()) << a.fallback_reason();
    EXPECT_TRUE(probe.ok()) << probe.ToString();
  } else {
    EXPECT_EQ(a.kind(), ArenaKind::kHost);
    EXPECT_FALSE(a.fallback_reason().empty());
    EXPECT_EQ(a.device_alias(), nullptr);
    EXPECT_EQ(probe.code(), StatusCode::kUnavailable);
    EXPECT_FALSE(probe.message().empty());
  }
#if !KVTIER_HAVE_CUDA
  EXPECT_EQ(a.kind(), ArenaKind::kHost) << "a build without CUDA cannot pin memory";
#endif

  // Either way the bytes are ordinary host memory.
  auto* p = static_cast<unsigned char*>(a.base());
  std::memset(p, 0x5A, bytes);
  EXPECT_EQ(p[0], 0x5A);
  EXPECT_EQ(p[bytes - 1], 0x5A);
}

TEST(ArenaTest, ZeroBytesIsInvalidArgumentForEveryKind) {
  for (ArenaKind kind : {ArenaKind::kHost, ArenaKind::kPinnedHost, ArenaKind::kDevice}) {
    SCOPED_TRACE(ArenaKindName(kind));
    auto arena = Arena::Create(kind, 0);
    ASSERT_FALSE(arena.ok());
    EXPECT_EQ(arena.status().code(), StatusCode::kInvalidArgument);
  }
}

TEST(ArenaTest, ImpossibleHostSizeIsAnErrorNotACrash) {
  // More than the address space can map: mmap refuses and the arena says so.
  auto arena = Arena::Create(ArenaKind::kHost, size_t{1} << 62);
  ASSERT_FALSE(arena.ok());
  EXPECT_EQ(arena.status().code(), StatusCode::kResourceExhausted);
  EXPECT_FALSE(arena.status().message().empty());
}

// Regression: sizes near SIZE_MAX overflowed the 2 MiB round-up and produced an "OK" arena whose
// size() claimed far more bytes than were mapped.
TEST(ArenaTest, SizeThatOverflowsTheRoundUpIsRefused) {
  for (size_t bytes : {SIZE_MAX, SIZE_MAX - kTwoMiB + 2, SIZE_MAX / 2 + 1}) {
    SCOPED_TRACE(bytes);
    for (ArenaKind kind : {ArenaKind::kHost, ArenaKind::kPinnedHost}) {
      auto arena = Arena::Create(kind, bytes);
      ASSERT_FALSE(arena.ok()) << "arena of " << bytes << " bytes claimed success";
      EXPECT_EQ(arena.status().code(), StatusCode::kResourceExhausted);
    }
  }
}

// Without a GPU (or without CUDA compiled in) a device arena is an error value; with one it works.
TEST(ArenaTest, DeviceArenaWithoutAGpuIsAnErrorNotACrash) {
  auto arena = Arena::Create(ArenaKind::kDevice, size_t{1} << 20);
  if (arena.ok()) {
    EXPECT_EQ((*arena)->kind(), ArenaKind::kDevice);
    EXPECT_NE((*arena)->base(), nullptr);
    EXPECT_TRUE((*arena)->fallback_reason().empty());
    GTEST_SKIP() << "a GPU is present: the device arena was allocated";
  }
  EXPECT_TRUE(arena.status().code() == StatusCode::kUnavailable ||
              arena.status().code() == StatusCode::kResourceExhausted)
      << arena.status().ToString();
  EXPECT_FALSE(arena.status().message().empty());
#if !KVTIER_HAVE_CUDA
  EXPECT_EQ(arena.status().code(), StatusCode::kUnavailable);
#endif
}

TEST(ArenaTest, DeviceArenaOnANonexistentGpuIsAnError) {
  auto arena = Arena::Create(ArenaKind::kDevice, size_t{1} << 20, /*device=*/4096);
  ASSERT_FALSE(arena.ok());
  EXPECT_FALSE(arena.status().message().empty());
}

}  // namespace
}  // namespace kvtier
