// IoBackend: the disk store's asynchronous I/O engine. Vectored reads and writes at file
// offsets, each with a deadline, finished by a callback. Two implementations with one contract:
// io_uring (uring_backend.cc, liburing) and a POSIX thread pool (posix_backend.cc, preadv/pwritev).
//
// Contract shared by both backends (tests run the same suite over both):
//  - Short transfers are resubmitted for the remainder; -EAGAIN and -EINTR are resubmitted.
//  - -ENOSPC, -EDQUOT and -EFBIG fail the request with ResourceExhausted; any other error, and a
//    read that hits end of file, fail it with IoError. Nothing is retried after a failure.
//  - A request still unfinished at its deadline fails with DeadlineExceeded at the deadline
//    (the backend watches deadlines itself: io_uring's completion thread sleeps at most until
//    the earliest one, the POSIX backend runs a watchdog thread). The OS may still be working
//    on it: io_uring gets a best-effort IORING_OP_ASYNC_CANCEL, a POSIX worker cannot be
//    interrupted. Such a request is "abandoned": its buffers stay in use until OnIoReleased.
//
// Thread safety: Submit may be called from any thread, including from inside a callback.
#pragma once

#include <sys/uio.h>

#include <atomic>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "common/status.h"

namespace kvtier {

enum class IoBackendKind : int {
  kAuto = 0,     // io_uring when compiled in and the kernel allows it, else POSIX
  kIoUring = 1,  // io_uring or an error (Unavailable) saying why not
  kPosix = 2,    // preadv/pwritev on a thread pool
};

const char* IoBackendKindName(IoBackendKind kind);  // "auto", "io_uring", "posix"

enum class IoOp : uint8_t { kRead, kWrite };

// Test hook, called with each result the OS gave (bytes moved, or -errno) before the backend
// acts on it; returns the result to act on instead (e.g. -ENOSPC, -EIO, -EAGAIN, or a short
// count: the bytes really were moved, so resubmitting the rest is harmless). Returning
// kIoFaultLoseCompletion makes the backend forget the completion, as if the device never
// answered: the request then ends by its deadline. Runs on the completion thread or a worker.
constexpr int kIoFaultLoseCompletion = INT_MIN;
using IoFaultInjector = std::function<int(IoOp op, uint64_t offset, size_t len, int result)>;

// Monotonic clock in nanoseconds: the time base of every deadline in csrc/storage.
int64_t MonotonicNowNs();

// Receives the outcome of one IoRequest.
class IoCompletion {
 public:
  // Called exactly once: OK when every byte was moved, else why not.
  virtual void OnIoDone(const Status& status) = 0;
  // Called exactly once, after OnIoDone has returned, when the OS no longer touches the
  // request's buffers and the IoRequest may be freed. Immediately after OnIoDone unless the
  // request was abandoned at its deadline.
  virtual void OnIoReleased() = 0;

 protected:
  ~IoCompletion() = default;
};

constexpr int kMaxIoVecs = 3;  // slot header + payload + bounce block for a partial last block

struct IoRequest {
  IoOp op = IoOp::kRead;
  uint64_t offset = 0;
  iovec iov[kMaxIoVecs] = {};
  int iovcnt = 0;
  int64_t deadline_ns = 0;  // MonotonicNowNs() scale
  IoCompletion* completion = nullptr;

  // Backend bookkeeping; set up by Submit, not for the submitter.
  struct Progress {
    iovec iov[kMaxIoVecs] = {};  // what is still to move
    int iovcnt = 0;
    uint64_t offset = 0;  // file offset of iov[0]
    size_t remaining = 0;
    bool in_os = false;          // an SQE or a worker holds it
    bool os_done = false;        // the OS will not touch the buffers again
    bool delivered = false;      // OnIoDone claimed
    bool done_returned = false;  // OnIoDone returned
    bool released = false;       // OnIoReleased claimed
  } progress;
};

struct IoBackendOptions {
  unsigned queue_depth = 32;   // io_uring: requests in the kernel at once
  unsigned posix_threads = 4;  // POSIX: worker threads (= requests in the kernel at once)
  IoFaultInjector fault_injector;
};

struct IoBackendStats {
  uint64_t submitted = 0;
  uint64_t resubmits = 0;          // short transfers, -EAGAIN, -EINTR
  uint64_t deadline_exceeded = 0;  // requests failed at their deadline
  uint64_t cancels = 0;            // io_uring: async cancels issued for abandoned requests
};

// REQUIRES (for every submitted request): the IoRequest, its buffers and its completion stay
// valid until OnIoReleased. deadline_ns is set. Buffers and offsets are aligned as the file's
// open mode needs (O_DIRECT: 4 KiB here).
class IoBackend {
 public:
  virtual ~IoBackend() = default;
  IoBackend(const IoBackend&) = delete;
  IoBackend& operator=(const IoBackend&) = delete;

  virtual IoBackendKind kind() const = 0;
  const char* name() const { return IoBackendKindName(kind()); }

  // Queues `n` requests on the backend's one file (io_uring: one submission for all of them).
  // Never waits for the device; requests beyond the queue depth wait in a FIFO.
  // REQUIRES: Shutdown has not been called.
  virtual void Submit(IoRequest* const* requests, size_t n) = 0;

  // Stops the backend: waits until every submitted request was released, or `deadline_ns`.
  // DeadlineExceeded if some were not: those requests are forgotten (never released), so their
  // owner must leak, not free, their memory. Called at most once; the destructor calls it with
  // no wait if it was not called.
  virtual Status Shutdown(int64_t deadline_ns) = 0;

  virtual IoBackendStats stats() const = 0;

 protected:
  IoBackend() = default;
};

// Creates a backend of `kind` for the open file `fd` (which must outlive the backend).
// kAuto tries io_uring first and falls back to POSIX; `fallback_reason` (if given) then says
// why io_uring was not used. kIoUring fails with Unavailable when io_uring cannot be used.
StatusOr<std::unique_ptr<IoBackend>> CreateIoBackend(IoBackendKind kind, int fd,
                                                     const IoBackendOptions& options,
                                                     std::string* fallback_reason = nullptr);

// ---- shared by the backends (io_backend.cc) ----------------------------------------------------

// Resets `r->progress` for a fresh submission.
void BeginProgress(IoRequest* r);

enum class IoStep { kFinished, kResubmit, kFailed };
// Applies one OS result (bytes moved or -errno) to `r`. kFailed sets `*error`.
IoStep ApplyIoResult(IoRequest* r, long result, Status* error);

}  // namespace kvtier
