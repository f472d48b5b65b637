// EvictionPolicy: the order in which a ChunkIndex gives up its READY chunks, as a plug-in.
// Built in: "lru" (the default), "s3fifo" and "lfu" (LFU with aging); see the factory below.
//
// Thread safety: none of its own. A policy belongs to one ChunkIndex, which calls it only while
// holding the index mutex; a policy never calls back into the index (the predicate handed to
// PickVictim is the index's own, evaluated under that same lock).
//
// The index tells its policy what happens to its entries. "Tracked" keys are those between
// OnInsert and OnRemove: exactly the READY entries. WRITING entries (bytes still being copied) and
// DEMOTING ones (handed to a write-back, still readable) are not tracked, so never chosen.
//
//   OnInsert(key)   the entry became READY (a store committed, a chunk was promoted from disk).
//     REQUIRES: key is not tracked.
//   OnAccess(key)   a hit: a reader acquired the entry. For a prefix the index calls it for the
//                   tail first and the head last, so "most recent" means the head of the prefix.
//     REQUIRES: key is tracked.
//   OnRemove(key)   the entry leaves the policy's charge: erased, evicted, or turned DEMOTING.
//     REQUIRES: key is tracked.
//   PickVictim(evictable, &key)   the next victim: a tracked key for which evictable(key) is true
//                   (the index says false for entries pinned by readers). Returns false if there
//                   is none. The victim stays tracked until the index calls OnRemove(victim), which
//                   it does before any other call. Keys passed over stay tracked; a policy may
//                   reorder them (S3-FIFO promotes and reinserts as it scans), never drop them.
// A call that breaks a REQUIRES line is ignored; the policy stays consistent.
//
// Cost: every call is O(1) amortized, plus one step for each entry PickVictim passes over because
// evictable() said no.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "common/status.h"
#include "index/chunk_key.h"

namespace kvtier {

// A borrowed callable `bool(const ChunkKey&)`, valid for one PickVictim call. Cheaper than a
// std::function: no allocation, one indirect call.
class EvictablePredicate {
 public:
  template <typename F,
            typename = std::enable_if_t<!std::is_same_v<std::decay_t<F>, EvictablePredicate>>>
  EvictablePredicate(const F& f)  // NOLINT(google-explicit-constructor): lambdas pass straight in
      : ctx_(&f), call_([](const void* ctx, const ChunkKey& k) {
          return static_cast<bool>((*static_cast<const F*>(ctx))(k));
        }) {}
  bool operator()(const ChunkKey& key) const { return call_(ctx_, key); }

 private:
  const void* ctx_;
  bool (*call_)(const void*, const ChunkKey&);
};

class EvictionPolicy {
 public:
  virtual ~EvictionPolicy() = default;

  virtual void OnInsert(const ChunkKey& key) = 0;
  virtual void OnAccess(const ChunkKey& key) = 0;
  virtual void OnRemove(const ChunkKey& key) = 0;
  virtual bool PickVictim(EvictablePredicate evictable, ChunkKey* victim) = 0;

  // Number of tracked keys.
  virtual size_t size() const = 0;
  // The name the factory knows it by ("lru", "s3fifo", "lfu").
  virtual const char* name() const = 0;
};

// The built-in policies by name: "lru", "s3fifo" or "lfu". InvalidArgument, naming the allowed
// names, for any other.
StatusOr<std::unique_ptr<EvictionPolicy>> MakeEvictionPolicy(const std::string& name);
// The names MakeEvictionPolicy accepts, default first.
const std::vector<std::string>& EvictionPolicyNames();

// The built-ins themselves (each in its own file).
std::unique_ptr<EvictionPolicy> NewLruPolicy();
std::unique_ptr<EvictionPolicy> NewS3FifoPolicy();
std::unique_ptr<EvictionPolicy> NewLfuPolicy();

}  // namespace kvtier
