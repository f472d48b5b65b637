// KeyList: an intrusive doubly linked list of chunk keys, for the eviction policies.
//
// Each policy keeps one hash-map node per key holding the key, the policy's per-key state and a
// KeyLink. Queues thread through those nodes, so moving a key between queues allocates nothing,
// and one hash lookup finds both the key's state and its place in its queue. (A std::list per
// queue would cost a second allocation per key and a second cache miss per hit.) Nodes of a
// std::unordered_map never move, so the links stay valid as the map grows.
//
// Not thread-safe: the owning policy is called under its index's mutex.
#pragma once

#include <cstddef>

#include "index/chunk_key.h"

namespace kvtier {

struct KeyLink {
  KeyLink* prev = nullptr;  // toward the front
  KeyLink* next = nullptr;  // toward the back
  const ChunkKey* key = nullptr;
};

class KeyList {
 public:
  KeyList() = default;
  KeyList(const KeyList&) = delete;
  KeyList& operator=(const KeyList&) = delete;
  KeyList(KeyList&& o) noexcept : front_(o.front_), back_(o.back_), size_(o.size_) {
    o.front_ = o.back_ = nullptr;
    o.size_ = 0;
  }

  KeyLink* front() const { return front_; }
  KeyLink* back() const { return back_; }
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }

  // REQUIRES: `n` is in no list.
  void PushFront(KeyLink* n) {
    n->prev = nullptr;
    n->next = front_;
    if (front_ != nullptr) {
      front_->prev = n;
    } else {
      back_ = n;
    }
    front_ = n;
    ++size_;
  }

  // REQUIRES: `n` is in this list.
  void Remove(KeyLink* n) {
    (n->prev != nullptr ? n->prev->next : front_) = n->next;
    (n->next != nullptr ? n->next->prev : back_) = n->prev;
    n->prev = n->next = nullptr;
    --size_;
  }

  // REQUIRES: `n` is in this list.
  void MoveToFront(KeyLink* n) {
    if (n == front_) return;
    Remove(n);
    PushFront(n);
  }

  // Moves every node of `other` to the front of this list, in their order; `other` ends empty.
  void PrependAll(KeyList& other) {
    if (other.empty()) return;
    other.back_->next = front_;
    if (front_ != nullptr) {
      front_->prev = other.back_;
    } else {
      back_ = other.back_;
    }
    front_ = other.front_;
    size_ += other.size_;
    other.front_ = other.back_ = nullptr;
    other.size_ = 0;
  }

 private:
  KeyLink* front_ = nullptr;
  KeyLink* back_ = nullptr;
  size_t size_ = 0;
};

}  // namespace kvtier
