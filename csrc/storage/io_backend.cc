// What both I/O backends share: names, the clock, progress of vectored transfers, the meaning of
// OS results, and the choice of backend.
#include "storage/io_backend.h"

#include <cerrno>
#include <chrono>
#include <cstring>

#include "storage/posix_backend.h"
#include "storage/uring_backend.h"

namespace kvtier {

const char* IoBackendKindName(IoBackendKind kind) {
  switch (kind) {
    case IoBackendKind::kAuto:
      return "auto";
    case IoBackendKind::kIoUring:
      return "io_uring";
    case IoBackendKind::kPosix:
      return "posix";
  }
  return "unknown";
}

int64_t MonotonicNowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void BeginProgress(IoRequest* r) {
  IoRequest::Progress& p = r->progress;
  p = IoRequest::Progress{};
  p.iovcnt = r->iovcnt;
  p.offset = r->offset;
  for (int i = 0; i < r->iovcnt; ++i) {
    p.iov[i] = r->iov[i];
    p.remaining += r->iov[i].iov_len;
  }
}

namespace {

// Drops the first `n` moved bytes from the front of the remaining iovecs.
void Advance(IoRequest::Progress* p, size_t n) {
  p->offset += n;
  p->remaining -= n;
  int first = 0;
  while (n > 0 && first < p->iovcnt) {
    if (n >= p->iov[first].iov_len) {
      n -= p->iov[first].iov_len;
      ++first;
    } else {
      p->iov[first].iov_base = static_cast<char*>(p->iov[first].iov_base) + n;
      p->iov[first].iov_len -= n;
      n = 0;
    }
  }
  for (int i = first; i < p->iovcnt; ++i) p->iov[i - first] = p->iov[i];
  p->iovcnt -= first;
}

std::string Where(const IoRequest& r) {
  return std::string(r.op == IoOp::kRead ? "read" : "write") + " at offset " +
         std::to_string(r.progress.offset);
}

}  // namespace

IoStep ApplyIoResult(IoRequest* r, long result, Status* error) {
  IoRequest::Progress& p = r->progress;
  if (result < 0) {
    int err = static_cast<int>(-result);
    if (err == EAGAIN || err == EINTR) return IoStep::kResubmit;
    if (err == ENOSPC || err == EDQUOT || err == EFBIG) {
      *error = Status::ResourceExhausted(std::string("no space on the cache device: ") +
                                         std::strerror(err) + " (" + Where(*r) + ")");
    } else {
      *error = Status::IoError(std::string(std::strerror(err)) + " (" + Where(*r) + ")");
    }
    return IoStep::kFailed;
  }
  size_t moved = static_cast<size_t>(result);
  if (moved > p.remaining) {
    *error = Status::Internal("the OS reported more bytes than asked (" + Where(*r) + ")");
    return IoStep::kFailed;
  }
  if (moved == 0 && p.remaining > 0) {
    *error =
        Status::IoError(r->op == IoOp::kRead ? "unexpected end of file (" + Where(*r) + ")"
                                             : "the write made no progress (" + Where(*r) + ")");
    return IoStep::kFailed;
  }
  Advance(&p, moved);
  return p.remaining == 0 ? IoStep::kFinished : IoStep::kResubmit;
}

StatusOr<std::unique_ptr<IoBackend>> CreateIoBackend(IoBackendKind kind, int fd,
                                                     const IoBackendOptions& options,
                                                     std::string* fallback_reason) {
  if (kind == IoBackendKind::kPosix) return CreatePosixBackend(fd, options);
  auto uring = CreateUringBackend(fd, options);
  if (uring.ok() || kind == IoBackendKind::kIoUring) return uring;
  if (fallback_reason) *fallback_reason = uring.status().message();
  return CreatePosixBackend(fd, options);
}

}  // namespace kvtier
