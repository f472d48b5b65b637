// bench_index: chunk-index operations per second in C++ (lookup of a 64-chunk prefix, acquire +
// release, insert + commit with eviction), each beside a bare std::unordered_map doing the same
// hash-table work with no lock, state or eviction order, measured in the same run: the ratio is
// what the index's bookkeeping costs over the hash table floor. acquire_release and insert_evict
// run once per built-in eviction policy (lru, the default, keeps the case names it always had;
// the others carry the policy's name as a suffix).
//
//   bench_index [--workload=lookup,acquire_release,insert_evict] [--out=DIR]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#include "bench_json.h"
#include "index/chunk_index.h"
#include "index/eviction_policy.h"

namespace {

using kvtier::BlockAllocator;
using kvtier::BlockId;
using kvtier::ChunkIndex;
using kvtier::ChunkKey;
using kvtier::ChunkKeyHash;
using kvtier::EvictionPolicyNames;
using kvtier::MakeEvictionPolicy;
using Clock = std::chrono::steady_clock;

constexpr size_t kChunks = 1 << 16;  // cached chunks
constexpr size_t kPrefix = 64;       // chunks per lookup (a 16k-token prompt of 256-token chunks)

std::vector<ChunkKey> MakeKeys(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<ChunkKey> keys(n);
  for (auto& k : keys) k = ChunkKey{rng(), rng()};
  return keys;
}

template <typename F>
double ChunksPerSecond(size_t chunks_per_call, F&& call) {
  // Repeat until 0.3 s have passed; best of 3 runs.
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    size_t calls = 0;
    auto t0 = Clock::now();
    double secs = 0;
    do {
      for (int i = 0; i < 256; ++i) call(calls++);
      secs = std::chrono::duration<double>(Clock::now() - t0).count();
    } while (secs < 0.3);
    best = std::max(best, calls * chunks_per_call / secs);
  }
  return best;
}

bool Wants(const std::string& list, const std::string& name) {
  return list.empty() || ("," + list + ",").find("," + name + ",") != std::string::npos;
}

// An index over its own allocator, filled with `keys` (all READY): full, so every insert evicts.
struct FilledIndex {
  BlockAllocator alloc{kChunks, 64};
  std::unique_ptr<ChunkIndex> index;
  FilledIndex(const std::string& policy, const std::vector<ChunkKey>& keys) {
    index = std::make_unique<ChunkIndex>(&alloc, std::move(MakeEvictionPolicy(policy)).value());
    for (const ChunkKey& k : keys) {
      if (!index->BeginInsert(k).ok() || !index->CommitInsert(k).ok()) std::abort();
    }
  }
};

// "case" for the default policy (the name the case always had), "case_<policy>" for the others.
std::string CaseName(const std::string& base, const std::string& policy) {
  return policy == EvictionPolicyNames().front() ? base : base + "_" + policy;
}

}  // namespace

int main(int argc, char** argv) {
  std::string workloads, out_dir;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--workload=", 0) == 0)
      workloads = a.substr(11);
    else if (a.rfind("--out=", 0) == 0)
      out_dir = a.substr(6);
    else {
      std::fprintf(
          stderr,
          "usage: bench_index [--workload=lookup,acquire_release,insert_evict] [--out=DIR]\n");
      return 2;
    }
  }

  BlockAllocator alloc(kChunks, 64);
  ChunkIndex index(&alloc);
  std::unordered_map<ChunkKey, BlockId, ChunkKeyHash> bare;
  bare.reserve(kChunks);
  auto keys = MakeKeys(kChunks, 1);
  for (size_t i = 0; i < kChunks; ++i) {
    auto b = index.BeginInsert(keys[i]);
    if (!b.ok() || !index.CommitInsert(keys[i]).ok()) return 1;
    bare.emplace(keys[i], *b);
  }
  const size_t windows = kChunks / kPrefix;
  kvtier::bench::Report report("bench_index", "chunk_index_64k", kvtier::bench::CpuMachine());
  volatile size_t sink = 0;

  if (Wants(workloads, "lookup")) {
    double idx = ChunksPerSecond(
        kPrefix, [&](size_t c) { sink += index.Lookup(&keys[(c % windows) * kPrefix], kPrefix); });
    double raw = ChunksPerSecond(kPrefix, [&](size_t c) {
      size_t n = 0;
      const ChunkKey* k = &keys[(c % windows) * kPrefix];
      while (n < kPrefix && bare.find(k[n]) != bare.end()) ++n;
      sink += n;
    });
    report.Add({"lookup_64_chunk_prefix", idx, "chunks/s", "bare_unordered_map_find", raw});
  }
  if (Wants(workloads, "acquire_release")) {
    // Every hit is a policy access too (64 per call, tail first). Each policy is measured next to
    // its own run of the baseline, so both see the same machine load.
    std::vector<BlockId> blocks;
    for (const std::string& policy : EvictionPolicyNames()) {
      FilledIndex filled(policy, keys);
      ChunkIndex& idx_p = *filled.index;
      double idx = ChunksPerSecond(kPrefix, [&](size_t c) {
        blocks.clear();
        const ChunkKey* k = &keys[(c % windows) * kPrefix];
        size_t n = idx_p.Acquire(k, kPrefix, &blocks);
        (void)idx_p.Release(k, n);
      });
      double raw = ChunksPerSecond(kPrefix, [&](size_t c) {
        blocks.clear();
        const ChunkKey* k = &keys[(c % windows) * kPrefix];
        for (size_t n = 0; n < kPrefix; ++n) {
          auto it = bare.find(k[n]);
          if (it == bare.end()) break;
          blocks.push_back(it->second);
        }
      });
      report.Add({CaseName("acquire_release_64_chunk_prefix", policy), idx, "chunks/s",
                  "bare_unordered_map_find", raw, true, "eviction policy: " + policy});
    }
  }
  if (Wants(workloads, "insert_evict")) {
    // The index is full: every insert evicts the policy's victim first. Fresh keys, never hit: for
    // S3-FIFO every victim leaves the small queue (and its key enters the ghost), for LFU every
    // victim comes from the lowest count.
    auto fresh = MakeKeys(1 << 20, 2);
    for (const std::string& policy : EvictionPolicyNames()) {
      FilledIndex filled(policy, keys);
      ChunkIndex& idx_p = *filled.index;
      double idx = ChunksPerSecond(1, [&](size_t c) {
        const ChunkKey& k = fresh[c % fresh.size()];
        auto b = idx_p.BeginInsert(k);
        if (b.ok()) (void)idx_p.CommitInsert(k);
      });
      std::unordered_map<ChunkKey, BlockId, ChunkKeyHash> ring(bare);
      std::vector<ChunkKey> order(keys);
      size_t head = 0;
      double raw = ChunksPerSecond(1, [&](size_t c) {
        // FIFO replacement in a bare map: erase the oldest, insert the new one.
        const ChunkKey& k = fresh[(c + 7) % fresh.size()];
        auto it = ring.find(order[head]);
        BlockId b = it == ring.end() ? 0 : it->second;
        if (it != ring.end()) ring.erase(it);
        if (ring.emplace(k, b).second) order[head] = k;
        head = (head + 1) % order.size();
      });
      report.Add({CaseName("insert_commit_with_eviction", policy), idx, "chunks/s",
                  "bare_unordered_map_erase_insert", raw, true, "eviction policy: " + policy});
    }
  }
  std::cout << report.ToJson();
  if (!out_dir.empty())
    std::fprintf(stderr, "wrote %s\n", report.WriteToDir(out_dir, "cpu").c_str());
  return sink == 42 ? 3 : 0;
}
