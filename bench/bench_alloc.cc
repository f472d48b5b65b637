// bench_alloc: BlockAllocator throughput against a pure-Python free list measured in the same run.
//
//   bench_alloc [--workload=alloc_free_1t,alloc_free_2t,alloc_batch_free_1t] [--out=DIR]
//               [--repeats=5] [--pairs=N] [--py_pairs=N] [--python=python3]
//
// Workloads (all by default):
//   alloc_free_1t        Allocate + Free pairs, one thread.
//   alloc_free_2t        the same from two threads contending on one allocator.
//   alloc_batch_free_1t  AllocateBatch(16) + FreeBatch of those 16, one thread (counted per block).
// Baseline: the same loop over a Python free list (a list used as a stack, a bytearray of allocated
// flags, pin counts and counters, each call checking state as BlockAllocator does; two
// threading.Threads and one threading.Lock for the 2-thread case), run by `python3 -c` and timed
// with time.perf_counter inside that process. Both sides report the median of --repeats runs.
// Prints one JSON document (BENCH.md); --out=DIR also writes it to
// DIR/bench_alloc-alloc_free-cpu-<date>.json.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "bench_json.h"
#include "memory/block_allocator.h"

namespace kvtier {
namespace {

constexpr size_t kNumBlocks = 1024;
constexpr size_t kBlockBytes = 4096;
constexpr size_t kBatch = 16;

struct Options {
  std::vector<std::string> workloads = {"alloc_free_1t", "alloc_free_2t", "alloc_batch_free_1t"};
  std::string out_dir;
  std::string python = "python3";
  int repeats = 5;
  long pairs = 5'000'000;   // C++ iterations per run (per thread for alloc_free_2t)
  long py_pairs = 500'000;  // Python iterations per run (per thread for alloc_free_2t)
};

// The Python baseline. Kept free of single quotes: it travels inside python3 -c '...'.
// argv: workload, iterations, repeats. Prints the median rate (pairs/s or blocks/s).
constexpr const char* kPythonBaseline = R"PY(
import statistics, sys, threading, time

class FreeList:
    """BlockAllocator in plain Python: a list as the free stack, a bytearray of allocated flags."""

    def __init__(self, n):
        self.n = n
        self.free = list(range(n - 1, -1, -1))
        self.allocated = bytearray(n)
        self.pins = [0] * n
        self.allocations = self.frees = self.failed = self.peak = 0

    def allocate(self):
        if not self.free:
            self.failed += 1
            raise MemoryError("all blocks are in use")
        i = self.free.pop()
        self.allocated[i] = 1
        self.allocations += 1
        used = self.n - len(self.free)
        if used > self.peak:
            self.peak = used
        return i

    def free_one(self, i):
        if i < 0 or i >= self.n:
            raise ValueError("block id out of range")
        if not self.allocated[i]:
            raise RuntimeError("block is not allocated")
        if self.pins[i]:
            raise RuntimeError("block is pinned")
        self.allocated[i] = 0
        self.free.append(i)
        self.frees += 1

    def allocate_batch(self, k):
        if k > len(self.free):
            self.failed += 1
            raise MemoryError("batch larger than the free count")
        out = []
        for _ in range(k):
            i = self.free.pop()
            self.allocated[i] = 1
            out.append(i)
        self.allocations += k
        used = self.n - len(self.free)
        if used > self.peak:
            self.peak = used
        return out

    def free_batch(self, ids):
        marked = 0
        try:
            for i in ids:
                if i < 0 or i >= self.n:
                    raise ValueError("block id out of range")
                if not self.allocated[i]:
                    raise RuntimeError("block is not allocated")
                if self.allocated[i] == 2:
                    raise RuntimeError("block appears twice in one batch")
                if self.pins[i]:
                    raise RuntimeError("block is pinned")
                self.allocated[i] = 2
                marked += 1
        except Exception:
            for i in ids[:marked]:
                self.allocated[i] = 1
            raise
        for i in ids:
            self.allocated[i] = 0
            self.free.append(i)
        self.frees += len(ids)

NUM_BLOCKS, BATCH = int(sys.argv[4]), int(sys.argv[5])

def alloc_free_1t(n):
    fl = FreeList(NUM_BLOCKS)
    allocate, free_one = fl.allocate, fl.free_one
    t0 = time.perf_counter()
    for _ in range(n):
        free_one(allocate())
    return n / (time.perf_counter() - t0)

def alloc_free_2t(n):
    fl = FreeList(NUM_BLOCKS)
    lock = threading.Lock()
    start = threading.Barrier(3)

    def work():
        allocate, free_one = fl.allocate, fl.free_one
        start.wait()
        for _ in range(n):
            with lock:
                i = allocate()
            with lock:
                free_one(i)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return 2 * n / (time.perf_counter() - t0)

def alloc_batch_free_1t(n):
    fl = FreeList(NUM_BLOCKS)
    batches = max(1, n // BATCH)
    t0 = time.perf_counter()
    for _ in range(batches):
        fl.free_batch(fl.allocate_batch(BATCH))
    return batches * BATCH / (time.perf_counter() - t0)

fn = globals()[sys.argv[1]]
n, repeats = int(sys.argv[2]), int(sys.argv[3])
fn(max(1, n // 10))  # warm-up
print(statistics.median(fn(n) for _ in range(repeats)))
)PY";

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  size_t m = v.size() / 2;
  return v.size() % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
}

void Check(const Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "bench_alloc: %s failed: %s\n", what, s.ToString().c_str());
    std::exit(1);
  }
}

// ---- kvtier cases: each returns a rate for `n` iterations on a fresh allocator ------------------

double AllocFree1t(long n) {
  BlockAllocator alloc(kNumBlocks, kBlockBytes);
  auto t0 = Clock::now();
  for (long i = 0; i < n; ++i) {
    auto id = alloc.Allocate();
    if (!id.ok()) Check(id.status(), "Allocate");
    Check(alloc.Free(*id), "Free");
  }
  return n / Seconds(t0, Clock::now());
}

double AllocFree2t(long n) {
  BlockAllocator alloc(kNumBlocks, kBlockBytes);
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  auto work = [&] {
    ready.fetch_add(1);
    while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
    for (long i = 0; i < n; ++i) {
      auto id = alloc.Allocate();
      if (!id.ok()) Check(id.status(), "Allocate");
      Check(alloc.Free(*id), "Free");
    }
  };
  std::thread a(work), b(work);
  while (ready.load() < 2) std::this_thread::yield();
  auto t0 = Clock::now();
  go.store(true, std::memory_order_release);
  a.join();
  b.join();
  return 2.0 * n / Seconds(t0, Clock::now());
}

double AllocBatchFree1t(long n) {
  BlockAllocator alloc(kNumBlocks, kBlockBytes);
  std::vector<BlockId> ids;
  ids.reserve(kBatch);
  const long batches = std::max(1L, n / static_cast<long>(kBatch));
  auto t0 = Clock::now();
  for (long i = 0; i < batches; ++i) {
    ids.clear();
    Check(alloc.AllocateBatch(kBatch, &ids), "AllocateBatch");
    Check(alloc.FreeBatch(ids), "FreeBatch");
  }
  return static_cast<double>(batches * kBatch) / Seconds(t0, Clock::now());
}

struct Workload {
  const char* name;
  const char* unit;
  const char* baseline;
  std::function<double(long)> run;
};

const std::vector<Workload>& Workloads() {
  static const std::vector<Workload> w = {
      {"alloc_free_1t", "pairs/s", "python_free_list_1t", AllocFree1t},
      {"alloc_free_2t", "pairs/s", "python_free_list_2t", AllocFree2t},
      {"alloc_batch_free_1t", "blocks/s", "python_free_list_batch_1t", AllocBatchFree1t},
  };
  return w;
}

// The Python rate for `workload`, or a negative number when the baseline could not run.
double RunPythonBaseline(const Options& opt, const std::string& workload, std::string* why) {
  std::string cmd = opt.python + " -c " + bench::ShellQuote(kPythonBaseline) + " " + workload +
                    " " + std::to_string(opt.py_pairs) + " " + std::to_string(opt.repeats) + " " +
                    std::to_string(kNumBlocks) + " " + std::to_string(kBatch);
  auto out = bench::CaptureCommand(cmd);
  if (!out) {
    *why = "python baseline did not run (" + opt.python + " failed or is missing)";
    return -1;
  }
  try {
    return std::stod(*out);
  } catch (...) {
    *why = "python baseline printed no number: " + bench::Trim(*out);
    return -1;
  }
}

std::vector<std::string> SplitComma(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

bool Flag(const std::string& arg, const char* name, std::string* value) {
  std::string prefix = std::string("--") + name + "=";
  if (arg.rfind(prefix, 0) != 0) return false;
  *value = arg.substr(prefix.size());
  return true;
}

int Main(int argc, char** argv) {
  Options opt;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i], v;
    if (Flag(arg, "workload", &v)) {
      opt.workloads = SplitComma(v);
    } else if (Flag(arg, "out", &v)) {
      opt.out_dir = v;
    } else if (Flag(arg, "python", &v)) {
      opt.python = v;
    } else if (Flag(arg, "repeats", &v)) {
      opt.repeats = std::max(1, std::atoi(v.c_str()));
    } else if (Flag(arg, "pairs", &v)) {
      opt.pairs = std::max(1L, std::atol(v.c_str()));
    } else if (Flag(arg, "py_pairs", &v)) {
      opt.py_pairs = std::max(1L, std::atol(v.c_str()));
    } else {
      std::fprintf(stderr,
                   "usage: %s [--workload=a,b] [--out=DIR] [--repeats=N] [--pairs=N] "
                   "[--py_pairs=N] [--python=python3]\nunknown argument: %s\n",
                   argv[0], arg.c_str());
      return 2;
    }
  }
  for (const std::string& name : opt.workloads) {
    bool known = std::any_of(Workloads().begin(), Workloads().end(),
                             [&](const Workload& w) { return name == w.name; });
    if (!known) {
      std::fprintf(stderr,
                   "unknown workload '%s' (known: alloc_free_1t, alloc_free_2t, "
                   "alloc_batch_free_1t)\n",
                   name.c_str());
      return 2;
    }
  }

  bench::Report report("bench_alloc", "alloc_free", bench::CpuMachine());
  for (const Workload& w : Workloads()) {
    if (std::find(opt.workloads.begin(), opt.workloads.end(), w.name) == opt.workloads.end()) {
      continue;
    }
    std::fprintf(stderr, "bench_alloc: %s ...\n", w.name);
    w.run(std::max(1L, opt.pairs / 10));  // warm-up
    std::vector<double> rates;
    for (int r = 0; r < opt.repeats; ++r) rates.push_back(w.run(opt.pairs));

    bench::Result res;
    res.case_name = w.name;
    res.value = Median(rates);
    res.unit = w.unit;
    std::string why;
    double py = RunPythonBaseline(opt, w.name, &why);
    if (py > 0) {
      res.baseline = w.baseline;
      res.baseline_value = py;
    } else {
      res.note = why;
    }
    const bool two_threads = std::string(w.name).find("_2t") != std::string::npos;
    std::ostringstream note;
    if (!res.note.empty()) note << res.note << "; ";
    note << "median of " << opt.repeats << " runs; " << opt.pairs << " C++ / " << opt.py_pairs
         << " Python iterations a run" << (two_threads ? " per thread" : "") << "; " << kNumBlocks
         << " blocks";
    res.note = note.str();
    report.Add(res);
  }

  std::cout << report.ToJson();
  if (!opt.out_dir.empty()) {
    std::string path = report.WriteToDir(opt.out_dir, "cpu");
    if (path.empty()) return 1;
    std::fprintf(stderr, "bench_alloc: wrote %s\n", path.c_str());
  }
  return 0;
}

}  // namespace
}  // namespace kvtier

int main(int argc, char** argv) { return kvtier::Main(argc, argv); }
