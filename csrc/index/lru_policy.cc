// LRU eviction: one recency list; a hit moves the entry to the front, victims come from the back.
#include <unordered_map>

#include "index/eviction_policy.h"
#include "index/key_list.h"

namespace kvtier {
namespace {

class LruPolicy final : public EvictionPolicy {
 public:
  void OnInsert(const ChunkKey& key) override {
    auto [it, inserted] = nodes_.try_emplace(key);
    if (!inserted) return;
    it->second.key = &it->first;
    order_.PushFront(&it->second);
  }

  void OnAccess(const ChunkKey& key) override {
    auto it = nodes_.find(key);
    if (it != nodes_.end()) order_.MoveToFront(&it->second);
  }

  void OnRemove(const ChunkKey& key) override {
    auto it = nodes_.find(key);
    if (it == nodes_.end()) return;
    order_.Remove(&it->second);
    nodes_.erase(it);
  }

  bool PickVictim(EvictablePredicate evictable, ChunkKey* victim) override {
    // Least recently used first; pinned entries keep their place.
    for (KeyLink* n = order_.back(); n != nullptr; n = n->prev) {
      if (evictable(*n->key)) {
        *victim = *n->key;
        return true;
      }
    }
    return false;
  }

  size_t size() const override { return order_.size(); }
  const char* name() const override { return "lru"; }

 private:
  std::unordered_map<ChunkKey, KeyLink, ChunkKeyHash> nodes_;
  KeyList order_;  // front = most recently used
};

}  // namespace

std::unique_ptr<EvictionPolicy> NewLruPolicy() { return std::make_unique<LruPolicy>(); }

}  // namespace kvtier
