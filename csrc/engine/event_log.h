// EventLog: a bounded queue of KV events (a chunk stored in or removed from a medium, or a medium
// cleared), recorded by the tiers as chunks become findable or stop being findable, and taken by
// whoever publishes them (kvtier.events).
//
// Bounded: past `capacity` events the oldest are dropped and counted (dropped()); recording never
// blocks nor fails. Capacity 0 records nothing.
//
// Thread safety: every method may be called concurrently from any thread. Its mutex is a leaf:
// Record is called under the index's and the disk store's locks, and takes no other lock.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <vector>

#include "common/mutex.h"
#include "common/thread_annotations.h"
#include "index/chunk_key.h"

namespace kvtier {

enum class EventKind : uint8_t { kStored = 0, kRemoved = 1, kCleared = 2 };
// Where: the numbers kvtier.events maps to its media names (the GPU tier records its own events).
enum class EventMedium : uint8_t { kGpu = 0, kCpu = 1, kDisk = 2 };

struct Event {
  EventKind kind;
  EventMedium medium;
  ChunkKey key;  // zero for kCleared
};

class EventLog {
 public:
  explicit EventLog(size_t capacity) : capacity_(capacity) {}
  EventLog(const EventLog&) = delete;
  EventLog& operator=(const EventLog&) = delete;

  bool enabled() const { return capacity_ > 0; }
  size_t capacity() const { return capacity_; }

  // Appends one event; a full log drops its oldest first.
  void Record(EventKind kind, EventMedium medium, const ChunkKey& key) EXCLUDES(mu_);
  // Removes and returns the oldest `max` events (all of them when max is 0), oldest first.
  std::vector<Event> Take(size_t max) EXCLUDES(mu_);

  uint64_t recorded() const EXCLUDES(mu_);  // events recorded since creation, dropped ones included
  uint64_t dropped() const EXCLUDES(mu_);   // events dropped because the log was full
  size_t pending() const EXCLUDES(mu_);     // events waiting to be taken

  // A VisibilityObserver (index/visibility_observer.h) recording into the EventLog `ctx` for the
  // CPU tier and the disk tier.
  static void OnCpuVisibility(void* ctx, const ChunkKey& key, bool visible);
  static void OnDiskVisibility(void* ctx, const ChunkKey& key, bool visible);

 private:
  const size_t capacity_;
  mutable Mutex mu_;
  std::deque<Event> events_ GUARDED_BY(mu_);
  uint64_t recorded_ GUARDED_BY(mu_) = 0;
  uint64_t dropped_ GUARDED_BY(mu_) = 0;
};

}  // namespace kvtier
