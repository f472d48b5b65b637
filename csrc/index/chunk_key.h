// ChunkKey: the 16-byte chained key naming a chunk and its whole prefix (see
// python/kvtier/keys.py).
#pragma once

#include <cstdint>
#include <cstring>
#include <functional>
#include <string>

namespace kvtier {

struct ChunkKey {
  uint64_t lo = 0;
  uint64_t hi = 0;

  static ChunkKey FromBytes(const void* p) {
    ChunkKey k;
    std::memcpy(&k.lo, p, 8);
    std::memcpy(&k.hi, static_cast<const char*>(p) + 8, 8);
    return k;
  }
  void ToBytes(void* p) const {
    std::memcpy(p, &lo, 8);
    std::memcpy(static_cast<char*>(p) + 8, &hi, 8);
  }
  std::string Hex() const;
  bool operator==(const ChunkKey& o) const { return lo == o.lo && hi == o.hi; }
  bool operator!=(const ChunkKey& o) const { return !(*this == o); }
};

struct ChunkKeyHash {
  // Keys are blake2b output: any 64 bits of them are already uniformly distributed.
  size_t operator()(const ChunkKey& k) const { return static_cast<size_t>(k.lo ^ (k.hi >> 1)); }
};

}  // namespace kvtier
