// LFU with aging: evict the chunk with the fewest uses (its store counts one, each hit one more),
// the least recently used among equals; every so often all counts are halved.
//
// Why this frequency-aware policy, and not W-TinyLFU:
// - KV reuse is skewed and lasting: system prompts, few-shot templates and shared documents head
//   many requests for hours, and a prefix's head is shared by more requests than its tail. Counting
//   uses ranks chunks the way their reuse ranks them, and a scan of one-off prompts (count 1)
//   cannot displace chunks that have been hit. Ties fall back to recency, so within a count the
//   index's tail-first refresh still makes a prefix lose its tail before its head.
// - Aging makes it forget: popularity moves (a new system prompt replaces the old one), and plain
//   LFU would keep yesterday's hot chunks for ever. Halving every count once per 10 x (tracked
//   entries) uses -- TinyLFU's reset period -- keeps counts to the recent past, bounds them, and
//   drops stale single-use chunks to 0, below any fresh store.
// - W-TinyLFU's strength is its admission filter: a count-min sketch keeps frequencies of keys not
//   in the cache, to refuse a newcomer that is rarer than the victim. In this index the newcomer's
//   bytes are already copied into its block when the policy hears of it, so refusing it saves no
//   work; what it would still add (memory of evicted keys) S3-FIFO's ghost gives. Exact counts of
//   resident chunks need no sketch, no hash collisions and no tuning of its size, and the policy
//   is small enough that a reference model in a test can check it step by step.
// - The price: a chunk not yet hit is the first to go, so reuse that comes late and once (the next
//   turn of a slow conversation) fares worse than under LRU or S3-FIFO. Pick by workload.
//
// O(1) per operation (Shah, Mitra, Matani, "An O(1) algorithm for implementing the LFU cache
// eviction scheme", 2010): buckets of equal count in a list ordered by count, each a recency list
// (intrusive, see key_list.h); a hit moves its entry to the next bucket. Aging walks all entries:
// O(n) every 10n events.
#include <algorithm>
#include <cstdint>
#include <iterator>
#include <list>
#include <unordered_map>

#include "index/eviction_policy.h"
#include "index/key_list.h"

namespace kvtier {
namespace {

constexpr uint32_t kMaxCount = 1u << 30;
constexpr uint64_t kAgingPeriodFactor = 10;  // halve all counts once per 10 x tracked events
constexpr uint64_t kMinAgingPeriod = 160;    // so that a nearly empty index does not age every call

class LfuPolicy final : public EvictionPolicy {
 public:
  void OnInsert(const ChunkKey& key) override {
    auto [it, inserted] = nodes_.try_emplace(key);
    if (!inserted) return;
    Node& n = it->second;
    n.key = &it->first;
    // Counts are >= 0 and the bucket list is sorted, so the bucket of count 1 is first or second.
    auto b = buckets_.begin();
    if (b != buckets_.end() && b->count < 1) ++b;
    if (b == buckets_.end() || b->count != 1) b = buckets_.emplace(b, 1);
    b->keys.PushFront(&n);
    n.bucket = b;
    Tick();
  }

  void OnAccess(const ChunkKey& key) override {
    auto it = nodes_.find(key);
    if (it == nodes_.end()) return;
    Node& n = it->second;
    auto from = n.bucket;
    if (from->count >= kMaxCount) {
      from->keys.MoveToFront(&n);
    } else {
      auto to = std::next(from);
      if (to == buckets_.end() || to->count != from->count + 1)
        to = buckets_.emplace(to, from->count + 1);
      from->keys.Remove(&n);
      to->keys.PushFront(&n);
      n.bucket = to;
      if (from->keys.empty()) buckets_.erase(from);
    }
    Tick();
  }

  void OnRemove(const ChunkKey& key) override {
    auto it = nodes_.find(key);
    if (it == nodes_.end()) return;
    auto b = it->second.bucket;
    b->keys.Remove(&it->second);
    if (b->keys.empty()) buckets_.erase(b);
    nodes_.erase(it);
  }

  bool PickVictim(EvictablePredicate evictable, ChunkKey* victim) override {
    // Fewest uses first, least recently used first among equals; pinned entries keep their place.
    for (auto& b : buckets_) {
      for (KeyLink* n = b.keys.back(); n != nullptr; n = n->prev) {
        if (evictable(*n->key)) {
          *victim = *n->key;
          return true;
        }
      }
    }
    return false;
  }

  size_t size() const override { return nodes_.size(); }
  const char* name() const override { return "lfu"; }

 private:
  struct Bucket {
    explicit Bucket(uint32_t c) : count(c) {}
    uint32_t count;
    KeyList keys;  // front = most recently used
  };
  using BucketList = std::list<Bucket>;  // ascending count
  struct Node : KeyLink {
    BucketList::iterator bucket;
  };

  void Tick() {
    const uint64_t period = std::max<uint64_t>(kMinAgingPeriod, kAgingPeriodFactor * nodes_.size());
    if (++events_ >= period) Age();
  }

  // Halves every count. Buckets that meet (2 and 3 both become 1) merge, the entries of the lower
  // old count on the least recently used side, so the order of victims is kept.
  void Age() {
    events_ = 0;
    for (auto b = buckets_.begin(); b != buckets_.end();) {
      const uint32_t halved = b->count / 2;
      if (b != buckets_.begin() && std::prev(b)->count == halved) {
        auto into = std::prev(b);
        for (KeyLink* n = b->keys.front(); n != nullptr; n = n->next)
          static_cast<Node*>(n)->bucket = into;
        into->keys.PrependAll(b->keys);
        b = buckets_.erase(b);
      } else {
        b->count = halved;
        ++b;
      }
    }
  }

  BucketList buckets_;
  std::unordered_map<ChunkKey, Node, ChunkKeyHash> nodes_;
  uint64_t events_ = 0;  // inserts and hits since the last aging
};

}  // namespace

std::unique_ptr<EvictionPolicy> NewLfuPolicy() { return std::make_unique<LfuPolicy>(); }

}  // namespace kvtier
