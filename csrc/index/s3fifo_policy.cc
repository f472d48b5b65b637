// S3-FIFO eviction (Yang et al., "FIFO queues are all you need for cache eviction", SOSP'23):
// a small FIFO for new chunks, a main FIFO with a 2-bit access count, and a ghost FIFO of keys.
//
// Why it suits a KV tier: most stored prefixes are never read again (one-off prompts, the tails of
// finished conversations). S3-FIFO gives a new chunk only a short stay in the small queue; a chunk
// read during that stay moves to the main queue, one that was not leaves early, so a burst of
// one-off stores cannot flush the chunks that are being reused. The ghost remembers the keys
// that left the small queue unread: if one is stored again (recomputed after a miss, or promoted
// back from disk), it was reused after all, and it goes straight to the main queue.
//
// Choices where the paper and its reference code (libCacheSim S3FIFO.c) leave room:
// - Sizes count entries, not bytes (every chunk of a tier has the same size). The small queue's
//   share is 10% of the tracked entries, measured when a victim is needed: the index evicts only
//   when it is full, and blocks held by WRITING/DEMOTING entries are nobody's share.
// - Leaving the small queue: a chunk hit at least once while there moves to main (libCacheSim's
//   S3FIFO.c asks for two hits by default, move-to-main-threshold=2; its S3FIFOdv2 variant for
//   one). In a KV tier the store itself follows a miss, so one hit is already a reuse, and a
//   threshold of two would send a chunk that a multi-turn chat reads once per turn to the ghost.
//   Its count is cleared on the move, as in libCacheSim.
// - The ghost holds 90% of the largest number of entries ever tracked (libCacheSim's ratio, of the
//   tier's capacity once it has filled). As the paper suggests, it lives in the policy's own hash
//   map: a ghost key is a node marked kGhost with the sequence number of its eviction, and a FIFO
//   of (key, sequence) pairs retires the oldest; an eviction turns a node into a ghost and a ghost
//   hit turns it back, with no second map.
// - One call, one victim: PickVictim empties the small queue's tail (promoting read entries to
//   main) until it finds a victim, as libCacheSim's evict_small does, but never evicts twice.
// - Pinned entries: in the small queue a pinned, unread entry keeps its place and the scan goes
//   past it; in the main queue it is reinserted at the head like an entry with a nonzero count
//   (it is in use, so recently used), without a count to spend. Either way it stays tracked.
#include <algorithm>
#include <cstdint>
#include <deque>
#include <unordered_map>
#include <utility>

#include "index/eviction_policy.h"
#include "index/key_list.h"

namespace kvtier {
namespace {

constexpr size_t kSmallShareDivisor = 10;  // the small queue's share: 1/10 of the tracked entries
constexpr uint8_t kMaxFreq = 3;            // two bits

class S3FifoPolicy final : public EvictionPolicy {
 public:
  void OnInsert(const ChunkKey& key) override {
    auto [it, inserted] = nodes_.try_emplace(key);
    Node& n = it->second;
    if (inserted) {
      n.key = &it->first;
      n.queue = kSmall;
      small_.PushFront(&n);
    } else if (n.queue == kGhost) {  // evicted unread from small, yet back: a reuse; into main
      --ghost_live_;
      n.queue = kMain;
      main_.PushFront(&n);
    } else {
      return;  // already tracked
    }
    n.freq = 0;
    if (size() > peak_) {
      peak_ = size();
      ghost_capacity_ = std::max<size_t>(1, peak_ - peak_ / 10);
    }
  }

  void OnAccess(const ChunkKey& key) override {
    auto it = nodes_.find(key);
    if (it != nodes_.end() && it->second.queue != kGhost && it->second.freq < kMaxFreq)
      ++it->second.freq;
  }

  void OnRemove(const ChunkKey& key) override {
    auto it = nodes_.find(key);
    if (it == nodes_.end() || it->second.queue == kGhost) return;
    Node& n = it->second;
    const bool to_ghost = small_victim_ && key == last_victim_;  // an Erase leaves no ghost
    small_victim_ = false;
    (n.queue == kMain ? main_ : small_).Remove(&n);
    if (!to_ghost) {
      nodes_.erase(it);
      return;
    }
    n.queue = kGhost;
    n.ghost_seq = ++ghost_seq_;
    ghost_fifo_.emplace_back(key, n.ghost_seq);
    ++ghost_live_;
    TrimGhost();
  }

  bool PickVictim(EvictablePredicate evictable, ChunkKey* victim) override {
    small_victim_ = false;
    bool small_scanned = false;
    if (!small_.empty() && kSmallShareDivisor * small_.size() >= size()) {
      small_scanned = true;
      if (EvictFromSmall(evictable, victim)) return true;
    }
    if (EvictFromMain(evictable, victim)) return true;
    if (small_scanned || small_.empty()) return false;
    // Everything in main is pinned: take from small after all. Its scan may move read entries to
    // main, where a second pass can find them.
    if (EvictFromSmall(evictable, victim)) return true;
    return EvictFromMain(evictable, victim);
  }

  size_t size() const override { return small_.size() + main_.size(); }
  const char* name() const override { return "s3fifo"; }

 private:
  enum Queue : uint8_t { kSmall, kMain, kGhost };
  struct Node : KeyLink {
    uint8_t freq =
        0;  // reads since it entered its queue (or since main last reinserted it), capped
    Queue queue = kSmall;
    uint64_t ghost_seq = 0;  // kGhost: when it was evicted, in ghost insertions
  };
  static Node* AsNode(KeyLink* l) { return static_cast<Node*>(l); }

  // Scans small from its tail (back): read entries move to main's head, pinned unread ones stay
  // put, the first unpinned unread one is the victim (and will be remembered by the ghost).
  bool EvictFromSmall(const EvictablePredicate& evictable, ChunkKey* victim) {
    for (KeyLink* l = small_.back(); l != nullptr;) {
      Node* n = AsNode(l);
      KeyLink* newer = l->prev;
      if (n->freq >= 1) {
        small_.Remove(n);
        n->freq = 0;
        n->queue = kMain;
        main_.PushFront(n);
      } else if (evictable(*n->key)) {
        *victim = last_victim_ = *n->key;
        small_victim_ = true;
        return true;
      }
      l = newer;
    }
    return false;
  }

  // FIFO with reinsertion from main's tail: an entry with a count spends one and goes back to the
  // head; a pinned one goes back too; the first unpinned one with no count left is the victim.
  // After 4 rotations every count is spent (at most 3), so a longer search would find nothing.
  bool EvictFromMain(const EvictablePredicate& evictable, ChunkKey* victim) {
    const size_t limit = (kMaxFreq + 1) * main_.size();
    for (size_t step = 0; step < limit; ++step) {
      Node* n = AsNode(main_.back());
      if (n->freq > 0) {
        --n->freq;
      } else if (evictable(*n->key)) {
        *victim = *n->key;
        return true;
      }
      main_.MoveToFront(n);
    }
    return false;
  }

  // Retires the oldest ghosts beyond the capacity. A FIFO slot whose key has since come back (or
  // gone again, with a newer sequence number) is stale and only popped; stale slots are compacted
  // away once they outnumber live ones, so the FIFO stays O(capacity).
  void TrimGhost() {
    while (ghost_live_ > ghost_capacity_) {
      auto [k, seq] = ghost_fifo_.front();
      ghost_fifo_.pop_front();
      auto it = nodes_.find(k);
      if (it != nodes_.end() && it->second.queue == kGhost && it->second.ghost_seq == seq) {
        nodes_.erase(it);
        --ghost_live_;
      }
    }
    if (ghost_fifo_.size() > 2 * ghost_live_ + 64) {
      std::deque<std::pair<ChunkKey, uint64_t>> live;
      for (const auto& [k, seq] : ghost_fifo_) {
        auto it = nodes_.find(k);
        if (it != nodes_.end() && it->second.queue == kGhost && it->second.ghost_seq == seq)
          live.emplace_back(k, seq);
      }
      ghost_fifo_.swap(live);
    }
  }

  std::unordered_map<ChunkKey, Node, ChunkKeyHash> nodes_;  // tracked keys and ghosts
  KeyList small_, main_;  // front = head (newest), back = tail (next to leave)
  std::deque<std::pair<ChunkKey, uint64_t>> ghost_fifo_;  // (key, ghost_seq), oldest first
  size_t ghost_live_ = 0;
  size_t ghost_capacity_ = 1;
  uint64_t ghost_seq_ = 0;
  size_t peak_ = 0;            // most entries ever tracked: the tier's capacity once it filled
  bool small_victim_ = false;  // the last PickVictim chose last_victim_ from the small queue
  ChunkKey last_victim_;
};

}  // namespace

std::unique_ptr<EvictionPolicy> NewS3FifoPolicy() { return std::make_unique<S3FifoPolicy>(); }

}  // namespace kvtier
