// Tests of the eviction policies on their own: the factory, each policy's characteristic order,
// pinned keys passed over but kept, and a randomized comparison with the reference models.
#include "index/eviction_policy.h"

#include <gtest/gtest.h>

#include <random>
#include <set>
#include <string>
#include <vector>

#include "index/eviction_policy_reference.h"

namespace kvtier {
namespace {

ChunkKey K(uint64_t i) { return ChunkKey{i * 0x9E3779B97F4A7C15ull + 1, i}; }

std::unique_ptr<EvictionPolicy> Policy(const std::string& name) {
  auto p = MakeEvictionPolicy(name);
  EXPECT_TRUE(p.ok()) << p.status().ToString();
  return std::move(p).value();
}

auto kAny = [](const ChunkKey&) { return true; };

// Picks a victim among all keys and removes it, as the index does; K(-1) if there is none.
ChunkKey Evict(EvictionPolicy& p) {
  ChunkKey v = K(~0ull);
  if (p.PickVictim(kAny, &v)) p.OnRemove(v);
  return v;
}

TEST(EvictionPolicyTest, FactoryKnowsEachBuiltInByName) {
  ASSERT_EQ(EvictionPolicyNames(), (std::vector<std::string>{"lru", "s3fifo", "lfu"}));
  for (const auto& name : EvictionPolicyNames()) {
    auto p = MakeEvictionPolicy(name);
    ASSERT_TRUE(p.ok());
    EXPECT_EQ(std::string((*p)->name()), name);
    EXPECT_EQ((*p)->size(), 0u);
  }
}

TEST(EvictionPolicyTest, UnknownNameIsInvalidArgumentNamingTheChoices) {
  for (const std::string bad : {"", "LRU", "arc", "s3-fifo"}) {
    auto p = MakeEvictionPolicy(bad);
    ASSERT_FALSE(p.ok());
    EXPECT_EQ(p.status().code(), StatusCode::kInvalidArgument);
    const std::string& m = p.status().message();
    EXPECT_NE(m.find("eviction_policy"), std::string::npos) << m;
    for (const char* allowed : {"'lru'", "'s3fifo'", "'lfu'"})
      EXPECT_NE(m.find(allowed), std::string::npos) << m;
    EXPECT_NE(m.find("'" + bad + "'"), std::string::npos) << m;
  }
}

class EvictionPolicyBuiltinTest : public testing::TestWithParam<std::string> {};

TEST_P(EvictionPolicyBuiltinTest, EmptyHasNoVictimAndMisuseIsIgnored) {
  auto p = Policy(GetParam());
  ChunkKey v;
  EXPECT_FALSE(p->PickVictim(kAny, &v));
  p->OnAccess(K(1));  // untracked: ignored
  p->OnRemove(K(1));
  p->OnInsert(K(1));
  p->OnInsert(K(1));  // already tracked: ignored
  EXPECT_EQ(p->size(), 1u);
  EXPECT_EQ(Evict(*p), K(1));
  EXPECT_EQ(p->size(), 0u);
  EXPECT_FALSE(p->PickVictim(kAny, &v));
}

TEST_P(EvictionPolicyBuiltinTest, PinnedKeysAreNeverChosenAndStayTracked) {
  auto p = Policy(GetParam());
  for (int i = 0; i < 10; ++i) p->OnInsert(K(i));
  for (int i = 0; i < 10; i += 3) p->OnAccess(K(i));
  const std::set<uint64_t> pinned = {0, 2, 5, 9};  // K(i).hi == i
  auto unpinned = [&](const ChunkKey& k) { return pinned.count(k.hi) == 0; };
  std::set<uint64_t> evicted;
  ChunkKey v;
  while (p->PickVictim(unpinned, &v)) {
    EXPECT_EQ(pinned.count(v.hi), 0u);
    evicted.insert(v.hi);
    p->OnRemove(v);
  }
  EXPECT_EQ(evicted.size(), 6u);
  EXPECT_EQ(p->size(), 4u);  // the pinned ones, all still tracked
  EXPECT_FALSE(p->PickVictim([](const ChunkKey&) { return false; }, &v));
  EXPECT_EQ(p->size(), 4u);
  for (int round = 0; round < 4; ++round)
    EXPECT_EQ(pinned.count(Evict(*p).hi), 1u);  // unpinned: they go
  EXPECT_EQ(p->size(), 0u);
}

INSTANTIATE_TEST_SUITE_P(Builtins, EvictionPolicyBuiltinTest,
                         testing::Values("lru", "s3fifo", "lfu"),
                         [](const auto& info) { return info.param; });

TEST(EvictionPolicyTest, LruEvictsLeastRecentlyUsed) {
  auto p = Policy("lru");
  for (int i = 0; i < 4; ++i) p->OnInsert(K(i));
  p->OnAccess(K(0));
  EXPECT_EQ(Evict(*p), K(1));
  EXPECT_EQ(Evict(*p), K(2));
  EXPECT_EQ(Evict(*p), K(3));
  EXPECT_EQ(Evict(*p), K(0));
}

TEST(EvictionPolicyTest, S3FifoEvictsOneHitWondersBeforeAnOlderReusedKey) {
  auto p = Policy("s3fifo");
  p->OnInsert(K(0));  // oldest, and read once
  p->OnAccess(K(0));
  for (int i = 1; i < 10; ++i) p->OnInsert(K(i));
  // K(0) moves to main on the way; the one-hit wonders leave in FIFO order.
  for (int i = 1; i < 10; ++i) EXPECT_EQ(Evict(*p), K(i));
  EXPECT_EQ(Evict(*p), K(0));
}

TEST(EvictionPolicyTest, S3FifoMainReinsertsWhileCountsLast) {
  auto p = Policy("s3fifo");
  for (int i = 0; i < 3; ++i) p->OnInsert(K(i));
  for (int i = 0; i < 3; ++i) p->OnAccess(K(i));  // all three move to main with count 0
  ChunkKey v;
  ASSERT_TRUE(p->PickVictim(kAny, &v));  // small: 0, 1, 2 move to main; main's tail is 0
  EXPECT_EQ(v, K(0));
  p->OnRemove(v);
  p->OnAccess(K(1));
  p->OnAccess(K(1));  // K(1) has two reinsertions to spend, K(2) none
  EXPECT_EQ(Evict(*p), K(2));
  EXPECT_EQ(Evict(*p), K(1));
}

TEST(EvictionPolicyTest, S3FifoGhostHitGoesStraightToMain) {
  auto p = Policy("s3fifo");
  for (int i = 0; i < 10; ++i) p->OnInsert(K(i));
  EXPECT_EQ(Evict(*p), K(0));  // unread: evicted from small, remembered by the ghost
  p->OnInsert(K(0));           // back: a ghost hit, so into main
  p->OnInsert(K(100));         // a new key: into small, behind K(1)..K(9)
  // Small holds 10 of 11 entries, so victims come from small: all of it before K(0).
  for (int i = 1; i < 10; ++i) EXPECT_EQ(Evict(*p), K(i));
  EXPECT_EQ(Evict(*p), K(100));
  EXPECT_EQ(Evict(*p), K(0));
}

TEST(EvictionPolicyTest, S3FifoErasedKeyIsNoGhost) {
  auto p = Policy("s3fifo");
  for (int i = 0; i < 3; ++i) p->OnInsert(K(i));
  p->OnRemove(K(0));  // an Erase, not an eviction
  p->OnInsert(K(0));  // so this is a plain new key: small, behind K(2)
  p->OnInsert(K(3));  // (a ghost hit would have put K(0) in main, to leave after K(3))
  EXPECT_EQ(Evict(*p), K(1));
  EXPECT_EQ(Evict(*p), K(2));
  EXPECT_EQ(Evict(*p), K(0));
  EXPECT_EQ(Evict(*p), K(3));
}

TEST(EvictionPolicyTest, LfuKeepsAFrequentlyHitKeyOverRecentlyInsertedOnes) {
  auto p = Policy("lfu");
  p->OnInsert(K(0));
  for (int i = 0; i < 3; ++i) p->OnAccess(K(0));
  for (int i = 1; i < 5; ++i) p->OnInsert(K(i));
  p->OnAccess(K(1));           // K(1) count 2: after the count-1 keys, before K(0)
  EXPECT_EQ(Evict(*p), K(2));  // count 1, least recent among them
  EXPECT_EQ(Evict(*p), K(3));
  EXPECT_EQ(Evict(*p), K(4));
  EXPECT_EQ(Evict(*p), K(1));
  EXPECT_EQ(Evict(*p), K(0));
}

TEST(EvictionPolicyTest, LfuAgingLetsAFormerlyHotKeyGo) {
  auto p = Policy("lfu");
  p->OnInsert(K(0));
  for (int i = 0; i < 50; ++i) p->OnAccess(K(0));  // count 51
  // Churn through a full cache of 8: each newcomer is hit twice (count 3). Without aging K(0)
  // would outrank every newcomer for ever; with it, its count halves every 160 events.
  for (int i = 1; i < 8; ++i) p->OnInsert(K(i));
  uint64_t next = 8;
  bool hot_evicted = false;
  for (int round = 0; round < 2000 && !hot_evicted; ++round) {
    ChunkKey v = Evict(*p);
    if (v == K(0)) hot_evicted = true;
    p->OnInsert(K(next));
    p->OnAccess(K(next));
    p->OnAccess(K(next));
    ++next;
  }
  EXPECT_TRUE(hot_evicted);
  EXPECT_LT(next, 8u + 300u);  // within a few aging periods (51 -> 0 in 6 halvings)
}

// Random inserts, hits, erases, pins and evictions (the policy kept at a capacity, as the index
// does), checked against the reference model after every step.
void CompareWithReference(const std::string& name, uint32_t seed, size_t capacity, size_t universe,
                          int steps) {
  auto impl = Policy(name);
  auto ref = reference::Make(name);
  std::mt19937 rng(seed);
  std::vector<uint64_t> tracked;
  std::set<uint64_t> pinned;
  auto unpinned = [&](const ChunkKey& k) { return pinned.count(k.hi) == 0; };
  auto is_tracked = [&](uint64_t id) {
    return std::find(tracked.begin(), tracked.end(), id) != tracked.end();
  };
  auto untrack = [&](uint64_t id) {
    tracked.erase(std::find(tracked.begin(), tracked.end(), id));
    pinned.erase(id);
  };
  int victims = 0;
  auto evict_one = [&]() {
    ChunkKey a, b;
    bool got_a = impl->PickVictim(unpinned, &a);
    bool got_b = ref->Pick(unpinned, &b);
    ASSERT_EQ(got_a, got_b);
    if (!got_a) return;
    ASSERT_EQ(a, b) << "victim " << a.hi << " vs reference " << b.hi;
    ASSERT_TRUE(is_tracked(a.hi));
    ASSERT_EQ(pinned.count(a.hi), 0u);
    impl->OnRemove(a);
    ref->Remove(a);
    untrack(a.hi);
    ++victims;
  };
  for (int step = 0; step < steps; ++step) {
    const int op = rng() % 100;
    if (op < 40) {  // insert (evicting first when full, as BeginInsert does)
      uint64_t id = rng() % universe;
      if (is_tracked(id)) continue;
      if (tracked.size() >= capacity) {
        evict_one();
        if (::testing::Test::HasFatalFailure()) return;
        if (tracked.size() >= capacity) continue;  // all pinned
      }
      impl->OnInsert(K(id));
      ref->Insert(K(id));
      tracked.push_back(id);
    } else if (op < 75) {  // hits on a short run of tracked keys, tail first
      if (tracked.empty()) continue;
      int n = 1 + rng() % 3;
      std::vector<uint64_t> run;
      for (int i = 0; i < n; ++i) run.push_back(tracked[rng() % tracked.size()]);
      for (auto it = run.rbegin(); it != run.rend(); ++it) {
        impl->OnAccess(K(*it));
        ref->Access(K(*it));
      }
    } else if (op < 82) {  // erase
      if (tracked.empty()) continue;
      uint64_t id = tracked[rng() % tracked.size()];
      if (pinned.count(id)) continue;
      impl->OnRemove(K(id));
      ref->Remove(K(id));
      untrack(id);
    } else if (op < 90) {  // pin or unpin
      if (tracked.empty()) continue;
      uint64_t id = tracked[rng() % tracked.size()];
      if (!pinned.erase(id) && pinned.size() < capacity / 2) pinned.insert(id);
    } else {  // an eviction with no insert behind it (a demotion, say)
      evict_one();
      if (::testing::Test::HasFatalFailure()) return;
    }
    ASSERT_EQ(impl->size(), tracked.size()) << "step " << step;
    ASSERT_EQ(ref->size(), tracked.size()) << "step " << step;
  }
  EXPECT_GT(victims, steps / 10);  // the comparison did look at many victims
}

TEST_P(EvictionPolicyBuiltinTest, MatchesReferenceModelOverRandomOperations) {
  for (uint32_t seed = 1; seed <= 4; ++seed) {
    CompareWithReference(GetParam(), seed, /*capacity=*/16, /*universe=*/48, /*steps=*/5000);
    if (HasFatalFailure()) return;
  }
  CompareWithReference(GetParam(), 99, /*capacity=*/200, /*universe=*/600, /*steps=*/20000);
  CompareWithReference(GetParam(), 7, /*capacity=*/3, /*universe=*/8, /*steps=*/5000);
}

}  // namespace
}  // namespace kvtier
