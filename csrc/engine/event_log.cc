// EventLog: a deque under one mutex, trimmed from the front when full.
#include "engine/event_log.h"

#include <algorithm>

namespace kvtier {

void EventLog::Record(EventKind kind, EventMedium medium, const ChunkKey& key) {
  if (capacity_ == 0) return;
  MutexLock lock(&mu_);
  if (events_.size() >= capacity_) {
    events_.pop_front();
    ++dropped_;
  }
  events_.push_back(Event{kind, medium, key});
  ++recorded_;
}

std::vector<Event> EventLog::Take(size_t max) {
  MutexLock lock(&mu_);
  const size_t n = max == 0 ? events_.size() : std::min(max, events_.size());
  std::vector<Event> out(events_.begin(), events_.begin() + static_cast<std::ptrdiff_t>(n));
  events_.erase(events_.begin(), events_.begin() + static_cast<std::ptrdiff_t>(n));
  return out;
}

uint64_t EventLog::recorded() const {
  MutexLock lock(&mu_);
  return recorded_;
}

uint64_t EventLog::dropped() const {
  MutexLock lock(&mu_);
  return dropped_;
}

size_t EventLog::pending() const {
  MutexLock lock(&mu_);
  return events_.size();
}

void EventLog::OnCpuVisibility(void* ctx, const ChunkKey& key, bool visible) {
  static_cast<EventLog*>(ctx)->Record(visible ? EventKind::kStored : EventKind::kRemoved,
                                      EventMedium::kCpu, key);
}

void EventLog::OnDiskVisibility(void* ctx, const ChunkKey& key, bool visible) {
  static_cast<EventLog*>(ctx)->Record(visible ? EventKind::kStored : EventKind::kRemoved,
                                      EventMedium::kDisk, key);
}

}  // namespace kvtier
