// Test-only reference models of the built-in eviction policies: the same rules written the plain
// way (vectors, linear scans), with none of the production code's data structures, so a randomized
// test can compare the two step by step. Included by the *_test.cc files only.
#pragma once

#include <algorithm>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "index/chunk_key.h"

namespace kvtier::reference {

using Evictable = std::function<bool(const ChunkKey&)>;

class Model {
 public:
  virtual ~Model() = default;
  virtual void Insert(const ChunkKey& k) = 0;
  virtual void Access(const ChunkKey& k) = 0;
  virtual void Remove(const ChunkKey& k) = 0;
  virtual bool Pick(const Evictable& ok, ChunkKey* out) = 0;
  virtual size_t size() const = 0;
};

// Recency list, most recent first; the victim is the last evictable one.
class Lru final : public Model {
 public:
  void Insert(const ChunkKey& k) override { v_.insert(v_.begin(), k); }
  void Access(const ChunkKey& k) override {
    Remove(k);
    Insert(k);
  }
  void Remove(const ChunkKey& k) override { v_.erase(std::find(v_.begin(), v_.end(), k)); }
  bool Pick(const Evictable& ok, ChunkKey* out) override {
    for (size_t i = v_.size(); i-- > 0;) {
      if (ok(v_[i])) {
        *out = v_[i];
        return true;
      }
    }
    return false;
  }
  size_t size() const override { return v_.size(); }

 private:
  std::vector<ChunkKey> v_;
};

// S3-FIFO as csrc/index/s3fifo_policy.cc states it: queues as vectors, index 0 = tail (oldest).
class S3Fifo final : public Model {
 public:
  void Insert(const ChunkKey& k) override {
    auto g = std::find(ghost_.begin(), ghost_.end(), k);
    if (g != ghost_.end()) {
      ghost_.erase(g);
      main_.push_back({k, 0});
    } else {
      small_.push_back({k, 0});
    }
    peak_ = std::max(peak_, size());
  }
  void Access(const ChunkKey& k) override {
    E* e = Find(k);
    if (e->freq < 3) ++e->freq;
  }
  void Remove(const ChunkKey& k) override {
    if (small_victim_ && k == last_victim_) {
      ghost_.push_back(k);
      const size_t cap = std::max<size_t>(1, peak_ - peak_ / 10);
      while (ghost_.size() > cap) ghost_.pop_front();
    }
    small_victim_ = false;
    for (auto* q : {&small_, &main_}) {
      for (size_t i = 0; i < q->size(); ++i) {
        if ((*q)[i].k == k) {
          q->erase(q->begin() + i);
          return;
        }
      }
    }
  }
  bool Pick(const Evictable& ok, ChunkKey* out) override {
    small_victim_ = false;
    bool scanned = false;
    if (!small_.empty() && 10 * small_.size() >= size()) {
      scanned = true;
      if (Small(ok, out)) return true;
    }
    if (Main(ok, out)) return true;
    if (scanned || small_.empty()) return false;
    if (Small(ok, out)) return true;
    return Main(ok, out);
  }
  size_t size() const override { return small_.size() + main_.size(); }
  bool InGhost(const ChunkKey& k) const {
    return std::find(ghost_.begin(), ghost_.end(), k) != ghost_.end();
  }

 private:
  struct E {
    ChunkKey k;
    int freq;
  };
  E* Find(const ChunkKey& k) {
    for (auto* q : {&small_, &main_}) {
      for (auto& e : *q) {
        if (e.k == k) return &e;
      }
    }
    return nullptr;
  }
  bool Small(const Evictable& ok, ChunkKey* out) {
    for (size_t i = 0; i < small_.size();) {
      E e = small_[i];
      if (e.freq >= 1) {
        small_.erase(small_.begin() + i);
        main_.push_back({e.k, 0});
        continue;
      }
      if (ok(e.k)) {
        *out = last_victim_ = e.k;
        small_victim_ = true;
        return true;
      }
      ++i;
    }
    return false;
  }
  bool Main(const Evictable& ok, ChunkKey* out) {
    const size_t limit = 4 * main_.size();
    for (size_t step = 0; step < limit; ++step) {
      E e = main_.front();
      if (e.freq > 0) {
        --e.freq;
      } else if (ok(e.k)) {
        *out = e.k;
        return true;
      }
      main_.erase(main_.begin());
      main_.push_back(e);
    }
    return false;
  }

  std::vector<E> small_, main_;
  std::deque<ChunkKey> ghost_;  // front = oldest
  size_t peak_ = 0;
  bool small_victim_ = false;
  ChunkKey last_victim_;
};

// LFU with aging as csrc/index/lfu_policy.cc states it: the victim is the evictable entry with the
// smallest (count, time it reached that count); aging halves counts and renumbers times in
// (old count, old time) order.
class Lfu final : public Model {
 public:
  void Insert(const ChunkKey& k) override {
    v_.push_back({k, 1, ++clock_});
    Tick();
  }
  void Access(const ChunkKey& k) override {
    for (auto& e : v_) {
      if (e.k == k) {
        ++e.count;
        e.stamp = ++clock_;
      }
    }
    Tick();
  }
  void Remove(const ChunkKey& k) override {
    v_.erase(std::find_if(v_.begin(), v_.end(), [&](const E& e) { return e.k == k; }));
  }
  bool Pick(const Evictable& ok, ChunkKey* out) override {
    const E* best = nullptr;
    for (const auto& e : v_) {
      if (!ok(e.k)) continue;
      if (best == nullptr || e.count < best->count ||
          (e.count == best->count && e.stamp < best->stamp))
        best = &e;
    }
    if (best == nullptr) return false;
    *out = best->k;
    return true;
  }
  size_t size() const override { return v_.size(); }
  uint32_t count(const ChunkKey& k) const {
    for (const auto& e : v_) {
      if (e.k == k) return e.count;
    }
    return 0;
  }

 private:
  struct E {
    ChunkKey k;
    uint32_t count;
    uint64_t stamp;
  };
  void Tick() {
    if (++events_ < std::max<uint64_t>(160, 10 * v_.size())) return;
    events_ = 0;
    std::sort(v_.begin(), v_.end(), [](const E& a, const E& b) {
      return a.count != b.count ? a.count < b.count : a.stamp < b.stamp;
    });
    clock_ = 0;
    for (auto& e : v_) {
      e.count /= 2;
      e.stamp = ++clock_;
    }
  }
  std::vector<E> v_;
  uint64_t clock_ = 0;
  uint64_t events_ = 0;
};

inline std::unique_ptr<Model> Make(const std::string& name) {
  if (name == "lru") return std::make_unique<Lru>();
  if (name == "s3fifo") return std::make_unique<S3Fifo>();
  if (name == "lfu") return std::make_unique<Lfu>();
  return nullptr;
}

}  // namespace kvtier::reference
