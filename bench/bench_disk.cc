// bench_disk: the disk store's chunk reads and writes (2, 4, 8 MiB blobs at queue depths 1, 4, 16,
// 64) on the io_uring and POSIX backends (POSIX with threads = queue depth, for equal
// concurrency), each beside the device's limit measured in the same run: large sequential
// O_DIRECT reads / writes at high queue depth on a plain file, with no kvtier code. Also the time
// to reopen a cache of 100k slots, beside the time the device needs to read what that reopen reads.
//
//   bench_disk [--workload=chunk_io,reopen_100k] [--dir=DIR] [--bytes=N] [--blobs=2,4,8]
//              [--depths=1,4,16,64] [--out=DIR]
//
// --dir: where the cache files go (a real disk: not tmpfs); --bytes: data moved per case.
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#if KVTIER_HAVE_LIBURING
#include <liburing.h>
#endif

#include "bench_json.h"
#include "storage/crc32c.h"
#include "storage/disk_store.h"

namespace {

using kvtier::ChunkKey;
using kvtier::DiskStore;
using kvtier::DiskStoreOptions;
using kvtier::IoBackendKind;
using kvtier::Status;
using Clock = std::chrono::steady_clock;

constexpr uint64_t MiB = 1ull << 20;

double Seconds(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "bench_disk: %s\n", what.c_str());
  std::exit(1);
}

void Check(const Status& s, const char* what) {
  if (!s.ok()) Die(std::string(what) + ": " + s.ToString());
}

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<unsigned char, FreeDeleter>;

Buffer Aligned(size_t n) {
  void* p = nullptr;
  if (posix_memalign(&p, 2 * MiB, n) != 0) Die("out of memory");
  auto* b = static_cast<unsigned char*>(p);
  std::mt19937_64 rng(n);
  for (size_t i = 0; i + 8 <= n; i += 8) {
    uint64_t v = rng();
    std::memcpy(b + i, &v, 8);
  }
  return Buffer(b);
}

std::vector<uint64_t> ParseList(const std::string& s) {
  std::vector<uint64_t> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(std::stoull(item));
  return out;
}

bool Wants(const std::string& list, const std::string& name) {
  return list.empty() || ("," + list + ",").find("," + name + ",") != std::string::npos;
}

// "vda (ext4)": the block device and file system under `dir`.
std::string DiskOf(const std::string& dir) {
  struct stat st {};
  std::string dev = "unknown device";
  if (stat(dir.c_str(), &st) == 0) {
    std::string link = "/sys/dev/block/" + std::to_string(major(st.st_dev)) + ":" +
                       std::to_string(minor(st.st_dev));
    std::error_code ec;
    auto target = std::filesystem::read_symlink(link, ec);
    if (!ec) dev = target.filename().string();
  }
  struct statfs sfs {};
  std::string fs = "?";
  if (statfs(dir.c_str(), &sfs) == 0) {
    fs = sfs.f_type == 0xEF53       ? "ext4"
         : sfs.f_type == 0x58465342 ? "xfs"
         : sfs.f_type == 0x01021994 ? "tmpfs"
                                    : "other fs";
  }
  return dev + " (" + fs + ")";
}

// ---- the device's limit: plain O_DIRECT I/O on a plain file, no kvtier code
// -------------------------

// Moves `len` bytes at each of `offsets` with `depth` requests in flight; returns seconds.
double RawIo(int fd, bool write, const std::vector<uint64_t>& offsets, size_t len, unsigned depth,
             unsigned char* buf) {
  auto t0 = Clock::now();
#if KVTIER_HAVE_LIBURING
  io_uring ring;
  if (io_uring_queue_init(std::max(8u, depth), &ring, 0) < 0) Die("io_uring_queue_init");
  size_t next = 0, done = 0;
  unsigned inflight = 0;
  while (done < offsets.size()) {
    while (inflight < depth && next < offsets.size()) {
      io_uring_sqe* sqe = io_uring_get_sqe(&ring);
      if (write) {
        io_uring_prep_write(sqe, fd, buf, static_cast<unsigned>(len), offsets[next]);
      } else {
        io_uring_prep_read(sqe, fd, buf, static_cast<unsigned>(len), offsets[next]);
      }
      ++next;
      ++inflight;
    }
    io_uring_submit_and_wait(&ring, 1);
    io_uring_cqe* cqe;
    unsigned head, n = 0;
    io_uring_for_each_cqe(&ring, head, cqe) {
      if (cqe->res != static_cast<int>(len)) Die("raw I/O failed: " + std::to_string(cqe->res));
      ++n;
    }
    io_uring_cq_advance(&ring, n);
    inflight -= n;
    done += n;
  }
  io_uring_queue_exit(&ring);
#else
  std::atomic<size_t> next{0};
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < depth; ++t) {
    threads.emplace_back([&] {
      for (size_t i; (i = next.fetch_add(1)) < offsets.size();) {
        ssize_t n = write ? pwrite(fd, buf, len, offsets[i]) : pread(fd, buf, len, offsets[i]);
        if (n != static_cast<ssize_t>(len)) Die("raw I/O failed");
      }
    });
  }
  for (auto& t : threads) t.join();
#endif
  return Seconds(t0);
}

struct DeviceLimit {
  double write_gbs = 0;
  double read_gbs = 0;
};

// Sequential O_DIRECT writes into a fresh preallocated file of `bytes` (the state the store's first
// writes meet), then reads of it, for request sizes 2, 4, 8 MiB at queue depths 16 and 64: the
// best of that grid is the device's limit.
DeviceLimit MeasureDeviceLimit(const std::string& dir, uint64_t bytes) {
  std::string path = dir + "/bench_disk_device_limit.bin";
  DeviceLimit best;
  for (size_t len : {2 * MiB, 4 * MiB, 8 * MiB}) {
    Buffer buf = Aligned(len);
    for (unsigned depth : {16u, 64u}) {
      int fd = open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_DIRECT, 0644);
      if (fd < 0) Die("cannot create " + path + ": " + std::strerror(errno));
      uint64_t n = std::max<uint64_t>(bytes / len, depth);
      if (fallocate(fd, 0, 0, static_cast<off_t>(n * len)) != 0)
        Die("fallocate: " + std::string(std::strerror(errno)));
      std::vector<uint64_t> offsets(n);
      for (uint64_t i = 0; i < n; ++i) offsets[i] = i * len;
      double w = n * len / RawIo(fd, true, offsets, len, depth, buf.get()) / 1e9;
      double r = n * len / RawIo(fd, false, offsets, len, depth, buf.get()) / 1e9;
      std::fprintf(stderr, "  raw %zu MiB qd%u: write %.2f read %.2f GB/s\n", len / MiB, depth, w,
                   r);
      best.write_gbs = std::max(best.write_gbs, w);
      best.read_gbs = std::max(best.read_gbs, r);
      close(fd);
      unlink(path.c_str());
    }
  }
  return best;
}

// ---- the store
// ------------------------------------------------------------------------------------

ChunkKey Key(uint64_t i) { return ChunkKey{0x9e3779b97f4a7c15ull * (i + 1), i}; }

// Runs n asynchronous calls with at most `depth` in flight, each given a buffer index.
template <typename Submit>
double RunAtDepth(uint64_t n, unsigned depth, Submit&& submit) {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<unsigned> free_bufs(depth);
  std::iota(free_bufs.begin(), free_bufs.end(), 0u);
  uint64_t finished = 0;
  std::string error;
  auto t0 = Clock::now();
  for (uint64_t i = 0; i < n; ++i) {
    unsigned b;
    {
      std::unique_lock<std::mutex> lk(mu);
      cv.wait(lk, [&] { return !free_bufs.empty(); });
      b = free_bufs.back();
      free_bufs.pop_back();
    }
    Status s = submit(i, b, [&, b](const Status& st) {
      std::lock_guard<std::mutex> lk(mu);
      if (!st.ok() && error.empty()) error = st.ToString();
      free_bufs.push_back(b);
      ++finished;
      cv.notify_all();
    });
    Check(s, "submit");
  }
  std::unique_lock<std::mutex> lk(mu);
  cv.wait(lk, [&] { return finished == n; });
  double secs = Seconds(t0);
  if (!error.empty()) Die("I/O failed: " + error);
  return secs;
}

struct ChunkResult {
  double write_gbs = 0;
  double read_gbs = 0;
};

ChunkResult MeasureStore(const std::string& dir, IoBackendKind backend, uint64_t blob,
                         unsigned depth, uint64_t bytes, const std::vector<Buffer>& bufs) {
  const uint64_t n = std::max<uint64_t>(bytes / blob, 2 * depth);
  std::string sub = dir + "/bench_disk_store";
  std::filesystem::remove_all(sub);
  std::filesystem::create_directories(sub);
  DiskStoreOptions o;
  o.dir = sub;
  o.blob_bytes = blob;
  o.capacity_bytes = kvtier::kDiskBlockBytes + n * kvtier::SlotBytesFor(blob);
  o.backend = backend;
  o.queue_depth = depth;
  o.posix_threads = depth;
  o.io_timeout_ms = 60000;
  ChunkResult r;
  {
    auto opened = DiskStore::Open(o);
    Check(opened.status(), "DiskStore::Open");
    DiskStore& store = **opened;
    if (store.backend() != backend) Die("backend mismatch");
    double w = RunAtDepth(n, depth, [&](uint64_t i, unsigned b, DiskStore::Callback done) {
      return store.Write(Key(i), bufs[b].get(), std::move(done));
    });
    std::vector<uint64_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), std::mt19937_64(blob + depth));
    double rd = RunAtDepth(n, depth, [&](uint64_t i, unsigned b, DiskStore::Callback done) {
      return store.Read(Key(order[i]), bufs[b].get(), std::move(done));
    });
    r.write_gbs = n * blob / w / 1e9;
    r.read_gbs = n * blob / rd / 1e9;
    auto st = store.stats();
    if (st.corrupt_detected != 0 || st.reads != n) Die("reads did not verify");
  }
  std::filesystem::remove_all(sub);
  return r;
}

// The same I/O as MeasureStore (n requests of `blob` bytes at `depth`, written in order, read in
// the same shuffled order) on a plain preallocated file with plain io_uring: no header, no
// checksum, no index. The ratio against it is what the store's own work costs.
ChunkResult MeasurePlain(const std::string& dir, uint64_t blob, unsigned depth, uint64_t bytes,
                         unsigned char* buf) {
  const uint64_t n = std::max<uint64_t>(bytes / blob, 2 * depth);
  std::string path = dir + "/bench_disk_plain.bin";
  int fd = open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_DIRECT, 0644);
  if (fd < 0) Die("cannot create " + path + ": " + std::strerror(errno));
  if (fallocate(fd, 0, 0, static_cast<off_t>(n * blob)) != 0)
    Die("fallocate: " + std::string(std::strerror(errno)));
  std::vector<uint64_t> offsets(n);
  for (uint64_t i = 0; i < n; ++i) offsets[i] = i * blob;
  ChunkResult r;
  r.write_gbs = n * blob / RawIo(fd, true, offsets, blob, depth, buf) / 1e9;
  std::shuffle(offsets.begin(), offsets.end(), std::mt19937_64(blob + depth));
  r.read_gbs = n * blob / RawIo(fd, false, offsets, blob, depth, buf) / 1e9;
  close(fd);
  unlink(path.c_str());
  return r;
}

// ---- reopen of 100k slots
// ---------------------------------------------------------------------------

void Reopen100k(const std::string& dir, kvtier::bench::Report* report) {
  const uint64_t slots = 100000, blob = 4096;
  std::string sub = dir + "/bench_disk_reopen";
  std::filesystem::remove_all(sub);
  std::filesystem::create_directories(sub);
  DiskStoreOptions o;
  o.dir = sub;
  o.blob_bytes = blob;
  o.capacity_bytes = kvtier::kDiskBlockBytes + slots * kvtier::SlotBytesFor(blob);
  o.queue_depth = 64;
  o.posix_threads = 64;
  o.io_timeout_ms = 60000;
  {
    auto opened = DiskStore::Open(o);
    Check(opened.status(), "DiskStore::Open (fill)");
    std::vector<Buffer> bufs;
    for (int i = 0; i < 64; ++i) bufs.push_back(Aligned(blob));
    double secs = RunAtDepth(slots, 64, [&](uint64_t i, unsigned b, DiskStore::Callback done) {
      std::memcpy(bufs[b].get(), &i, 8);  // every chunk distinct
      return (*opened)->Write(Key(i), bufs[b].get(), std::move(done));
    });
    std::fprintf(stderr, "filled %llu slots of 4 KiB in %.2f s (%s)\n",
                 static_cast<unsigned long long>(slots), secs, (*opened)->backend_name());
  }
  const std::string file = sub + "/" + kvtier::kDiskCacheFileName;
  const uint64_t slot_bytes = kvtier::SlotBytesFor(blob);

  // Floors: what each recovery mode reads, read by plain io_uring / threads with no kvtier code.
  int fd = open(file.c_str(), O_RDONLY | O_DIRECT);
  if (fd < 0) Die("cannot open " + file);
  const size_t run = 4 * MiB;
  uint64_t file_bytes = kvtier::kDiskBlockBytes + slots * slot_bytes;
  std::vector<uint64_t> seq;
  for (uint64_t off = kvtier::kDiskBlockBytes; off + run <= file_bytes; off += run)
    seq.push_back(off);
  Buffer big = Aligned(run);
  std::vector<uint64_t> headers(slots);
  for (uint64_t i = 0; i < slots; ++i) headers[i] = kvtier::SlotOffset(i, slot_bytes);
  Buffer small = Aligned(kvtier::kDiskBlockBytes);
  double floor_full = 1e9, floor_headers = 1e9;
  for (int rep = 0; rep < 3; ++rep) {  // best of 3, as for the store below
    floor_full = std::min(floor_full, RawIo(fd, false, seq, run, 16, big.get()));
    floor_headers = std::min(floor_headers,
                             RawIo(fd, false, headers, kvtier::kDiskBlockBytes, 64, small.get()));
  }
  floor_full *=
      static_cast<double>(file_bytes) / (seq.size() * run);  // the few bytes past the last run
  close(fd);

  for (IoBackendKind backend : {IoBackendKind::kIoUring, IoBackendKind::kPosix}) {
    for (kvtier::VerifyAtOpen mode :
         {kvtier::VerifyAtOpen::kFull, kvtier::VerifyAtOpen::kHeaders}) {
      DiskStoreOptions r = o;
      r.backend = backend;
      r.verify_at_open = mode;
      double best = 1e9;
      std::string name;
      for (int rep = 0; rep < 3; ++rep) {
        auto t0 = Clock::now();
        auto opened = DiskStore::Open(r);
        double secs = Seconds(t0);
        Check(opened.status(), "DiskStore::Open (reopen)");
        auto st = (*opened)->stats();
        if (st.recovered_slots != slots)
          Die("reopen recovered " + std::to_string(st.recovered_slots) + " slots");
        best = std::min(best, secs);
        name = (*opened)->backend_name();
      }
      const bool full = mode == kvtier::VerifyAtOpen::kFull;
      kvtier::bench::Result res;
      res.case_name =
          "reopen_100k_slots_" + std::string(full ? "full_verify" : "headers_only") + "_" + name;
      res.value = best;
      res.unit = "s";
      res.higher_is_better = false;
      res.baseline = full ? "plain_odirect_sequential_read_of_the_file_qd16"
                          : "plain_odirect_4KiB_header_reads_qd64";
      res.baseline_value = full ? floor_full : floor_headers;
      res.note = full ? "4 KiB payloads (8 KiB slots, 800 MiB file) so 100k slots fit on this "
                        "disk; headers and "
                        "payload CRCs all checked; best of 3; target <= 2 s"
                      : "100k slot-header reads at queue depth 64, payload CRCs checked lazily on "
                        "first read; the "
                        "same reads as a 100k-slot cache of any blob size (8 MiB blobs: 800 GB); "
                        "best of 3; target "
                        "<= 2 s";
      report->Add(res);
    }
  }
  std::filesystem::remove_all(sub);
}

}  // namespace

int main(int argc, char** argv) {
  std::string workloads, out_dir, dir = "/tmp";
  uint64_t bytes = 1ull << 30;
  std::vector<uint64_t> blobs_mib = {2, 4, 8}, depths = {1, 4, 16, 64};
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--workload=", 0) == 0)
      workloads = a.substr(11);
    else if (a.rfind("--out=", 0) == 0)
      out_dir = a.substr(6);
    else if (a.rfind("--dir=", 0) == 0)
      dir = a.substr(6);
    else if (a.rfind("--bytes=", 0) == 0)
      bytes = std::stoull(a.substr(8));
    else if (a.rfind("--blobs=", 0) == 0)
      blobs_mib = ParseList(a.substr(8));
    else if (a.rfind("--depths=", 0) == 0)
      depths = ParseList(a.substr(9));
    else {
      std::fprintf(stderr,
                   "usage: bench_disk [--workload=chunk_io,reopen_100k] [--dir=DIR] [--bytes=N] "
                   "[--blobs=2,4,8] "
                   "[--depths=1,4,16,64] [--out=DIR]\n");
      return 2;
    }
  }
  std::string workload;
  for (const char* w : {"chunk_io", "reopen_100k"}) {
    if (Wants(workloads, w)) workload += (workload.empty() ? "" : "+") + std::string(w);
  }
  if (workload.empty()) Die("no known workload in --workload=" + workloads);

  std::string machine = kvtier::bench::CpuMachine() + "; cache dir " + dir + " on " + DiskOf(dir);
  kvtier::bench::Report report("bench_disk", workload, machine);

  if (Wants(workloads, "chunk_io")) {
    // Measured before and after the cases; the higher of the two is the limit (the stricter ratio).
    DeviceLimit limit = MeasureDeviceLimit(dir, bytes);
    std::fprintf(stderr, "device limit: write %.2f GB/s, read %.2f GB/s\n", limit.write_gbs,
                 limit.read_gbs);
    struct Measured {
      std::string tag;
      ChunkResult uring, posix, plain;
    };
    std::vector<Measured> measured;
    for (uint64_t mib : blobs_mib) {
      const uint64_t blob = mib * MiB;
      std::vector<Buffer> bufs;
      for (uint64_t d = 0; d < *std::max_element(depths.begin(), depths.end()); ++d)
        bufs.push_back(Aligned(blob));
      for (uint64_t depth : depths) {
        // Best of two runs each, the backends interleaved so drift in the device hits both alike.
        ChunkResult uring, posix, plain;
        auto keep_best = [](ChunkResult* best, const ChunkResult& r) {
          best->write_gbs = std::max(best->write_gbs, r.write_gbs);
          best->read_gbs = std::max(best->read_gbs, r.read_gbs);
        };
        for (int rep = 0; rep < 2; ++rep) {
          keep_best(&plain,
                    MeasurePlain(dir, blob, static_cast<unsigned>(depth), bytes, bufs[0].get()));
          keep_best(&uring, MeasureStore(dir, IoBackendKind::kIoUring, blob,
                                         static_cast<unsigned>(depth), bytes, bufs));
          keep_best(&posix, MeasureStore(dir, IoBackendKind::kPosix, blob,
                                         static_cast<unsigned>(depth), bytes, bufs));
        }
        std::string tag = std::to_string(mib) + "MiB_qd" + std::to_string(depth);
        std::fprintf(stderr,
                     "%-12s io_uring write %.2f read %.2f | posix write %.2f read %.2f | plain "
                     "write %.2f read %.2f GB/s\n",
                     tag.c_str(), uring.write_gbs, uring.read_gbs, posix.write_gbs, posix.read_gbs,
                     plain.write_gbs, plain.read_gbs);
        measured.push_back({tag, uring, posix, plain});
      }
    }
    DeviceLimit again = MeasureDeviceLimit(dir, bytes);
    std::fprintf(stderr, "device limit again: write %.2f GB/s, read %.2f GB/s\n", again.write_gbs,
                 again.read_gbs);
    limit.write_gbs = std::max(limit.write_gbs, again.write_gbs);
    limit.read_gbs = std::max(limit.read_gbs, again.read_gbs);
    const std::string lim_w = "device_limit_seq_odirect_write",
                      lim_r = "device_limit_seq_odirect_read";
    for (const Measured& m : measured) {
      const std::string& tag = m.tag;
      report.Add({"io_uring_write_" + tag, m.uring.write_gbs, "GB/s", lim_w, limit.write_gbs});
      report.Add({"io_uring_read_" + tag, m.uring.read_gbs, "GB/s", lim_r, limit.read_gbs});
      report.Add({"posix_write_" + tag, m.posix.write_gbs, "GB/s", lim_w, limit.write_gbs});
      report.Add({"posix_read_" + tag, m.posix.read_gbs, "GB/s", lim_r, limit.read_gbs});
      report.Add({"io_uring_vs_posix_write_" + tag, m.uring.write_gbs, "GB/s", "posix_write_" + tag,
                  m.posix.write_gbs, true, "POSIX with threads = queue depth"});
      report.Add({"io_uring_vs_posix_read_" + tag, m.uring.read_gbs, "GB/s", "posix_read_" + tag,
                  m.posix.read_gbs, true, "POSIX with threads = queue depth"});
      const char* plain_note =
          "the same requests on a plain file with plain io_uring (no header, checksum or index)";
      report.Add({"io_uring_vs_plain_write_" + tag, m.uring.write_gbs, "GB/s",
                  "plain_io_uring_write_" + tag, m.plain.write_gbs, true, plain_note});
      report.Add({"io_uring_vs_plain_read_" + tag, m.uring.read_gbs, "GB/s",
                  "plain_io_uring_read_" + tag, m.plain.read_gbs, true, plain_note});
    }
    // What the checksums cost per byte, against the instruction-free software CRC (context for
    // the read path, which verifies every payload on the completion thread).
    Buffer b = Aligned(8 * MiB);
    volatile uint32_t sink = 0;
    auto t0 = Clock::now();
    for (int i = 0; i < 64; ++i) sink = sink + kvtier::Crc32c(0, b.get(), 8 * MiB);
    double hw = 64.0 * 8 * MiB / Seconds(t0) / 1e9;
    t0 = Clock::now();
    for (int i = 0; i < 8; ++i) sink = sink + kvtier::Crc32cSoftware(0, b.get(), 8 * MiB);
    double sw = 8.0 * 8 * MiB / Seconds(t0) / 1e9;
    report.Add({"crc32c_8MiB", hw, "GB/s", "crc32c_software_slicing_by_8", sw, true,
                kvtier::Crc32cHardwareAvailable() ? "SSE4.2, 3 interleaved streams"
                                                  : "no SSE4.2: software both"});
  }
  if (Wants(workloads, "reopen_100k")) Reopen100k(dir, &report);

  std::cout << report.ToJson();
  if (!out_dir.empty())
    std::fprintf(stderr, "wrote %s\n", report.WriteToDir(out_dir, "cpu").c_str());
  return 0;
}
