// EventLog: bounded, oldest dropped and counted, taken oldest first, off at capacity 0.
#include "engine/event_log.h"

#include <gtest/gtest.h>

namespace kvtier {
namespace {

ChunkKey Key(uint64_t i) { return ChunkKey{i + 1, ~i}; }

TEST(EventLogTest, TakesEventsOldestFirstAndAtMostMax) {
  EventLog log(8);
  for (uint64_t i = 0; i < 5; ++i) log.Record(EventKind::kStored, EventMedium::kCpu, Key(i));
  std::vector<Event> first = log.Take(2);
  ASSERT_EQ(first.size(), 2u);
  EXPECT_EQ(first[0].key, Key(0));
  EXPECT_EQ(first[1].key, Key(1));
  std::vector<Event> rest = log.Take(0);  // 0: all of them
  ASSERT_EQ(rest.size(), 3u);
  EXPECT_EQ(rest[2].key, Key(4));
  EXPECT_EQ(log.pending(), 0u);
  EXPECT_TRUE(log.Take(0).empty());
}

TEST(EventLogTest, AFullLogDropsTheOldestAndCountsThem) {
  EventLog log(3);
  for (uint64_t i = 0; i < 5; ++i) log.Record(EventKind::kRemoved, EventMedium::kDisk, Key(i));
  EXPECT_EQ(log.recorded(), 5u);
  EXPECT_EQ(log.dropped(), 2u);
  std::vector<Event> events = log.Take(0);
  ASSERT_EQ(events.size(), 3u);
  EXPECT_EQ(events[0].key, Key(2));
  EXPECT_EQ(events[0].kind, EventKind::kRemoved);
  EXPECT_EQ(events[0].medium, EventMedium::kDisk);
}

TEST(EventLogTest, CapacityZeroRecordsNothing) {
  EventLog log(0);
  EXPECT_FALSE(log.enabled());
  log.Record(EventKind::kStored, EventMedium::kCpu, Key(0));
  EventLog::OnCpuVisibility(&log, Key(1), true);
  EXPECT_EQ(log.recorded(), 0u);
  EXPECT_EQ(log.dropped(), 0u);
  EXPECT_TRUE(log.Take(0).empty());
}

TEST(EventLogTest, VisibilityObserversRecordStoredAndRemovedPerMedium) {
  EventLog log(8);
  EventLog::OnCpuVisibility(&log, Key(0), true);
  EventLog::OnDiskVisibility(&log, Key(0), false);
  std::vector<Event> events = log.Take(0);
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0].kind, EventKind::kStored);
  EXPECT_EQ(events[0].medium, EventMedium::kCpu);
  EXPECT_EQ(events[1].kind, EventKind::kRemoved);
  EXPECT_EQ(events[1].medium, EventMedium::kDisk);
}

}  // namespace
}  // namespace kvtier
