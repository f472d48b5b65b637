// io_uring availability probe: set up a tiny ring and round-trip one NOP.
#include "storage/io_probe.h"

#include <cstring>

#if KVTIER_HAVE_LIBURING
#include <liburing.h>
#endif

namespace kvtier {

const char* CompiledIoBackend() { return KVTIER_HAVE_LIBURING ? "io_uring" : "posix"; }

Status ProbeIoUring() {
#if KVTIER_HAVE_LIBURING
  io_uring ring;
  int rc = io_uring_queue_init(4, &ring, 0);
  if (rc < 0) return Status::Unavailable(std::string("io_uring_queue_init: ") + std::strerror(-rc));
  Status result;
  io_uring_sqe* sqe = io_uring_get_sqe(&ring);
  io_uring_prep_nop(sqe);
  rc = io_uring_submit(&ring);
  if (rc < 0) {
    result = Status::Unavailable(std::string("io_uring_submit: ") + std::strerror(-rc));
  } else {
    io_uring_cqe* cqe = nullptr;
    __kernel_timespec ts{.tv_sec = 2, .tv_nsec = 0};  // a probe must not hang
    rc = io_uring_wait_cqe_timeout(&ring, &cqe, &ts);
    if (rc < 0) {
      result = Status::Unavailable(std::string("io_uring NOP did not complete: ") + std::strerror(-rc));
    } else {
      if (cqe->res < 0) result = Status::Unavailable(std::string("io_uring NOP failed: ") + std::strerror(-cqe->res));
      io_uring_cqe_seen(&ring, cqe);
    }
  }
  io_uring_queue_exit(&ring);
  return result;
#else
  return Status::Unavailable("kvtier was built without liburing (POSIX backend only)");
#endif
}

}  // namespace kvtier
