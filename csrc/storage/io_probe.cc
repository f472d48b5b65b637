// I/O capability probes: io_uring (set up a tiny ring and round-trip one NOP) and O_DIRECT.
#include "storage/io_probe.h"

#include <fcntl.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <cerrno>
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
      result =
          Status::Unavailable(std::string("io_uring NOP did not complete: ") + std::strerror(-rc));
    } else {
      if (cqe->res < 0)
        result =
            Status::Unavailable(std::string("io_uring NOP failed: ") + std::strerror(-cqe->res));
      io_uring_cqe_seen(&ring, cqe);
    }
  }
  io_uring_queue_exit(&ring);
  return result;
#else
  return Status::Unavailable("kvtier was built without liburing (POSIX backend only)");
#endif
}

Status ProbeDirectIo(const std::string& dir) {
  std::string path = dir + "/.kvtier-odirect-probe-" + std::to_string(getpid());
  int fd = open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_DIRECT, 0600);
  int err = errno;
  unlink(path.c_str());  // O_CREAT runs before the O_DIRECT check: remove it either way
  if (fd >= 0) {
    close(fd);
    return Status::OK();
  }
  if (err != EINVAL)
    return Status::IoError("cannot create a file in '" + dir + "': " + std::strerror(err));
  struct statfs sfs {};
  char fs[32] = "unknown fs";
  if (statfs(dir.c_str(), &sfs) == 0)
    std::snprintf(fs, sizeof(fs), "f_type 0x%lx", static_cast<unsigned long>(sfs.f_type));
  return Status::InvalidArgument("'" + dir + "' is on a file system that refuses O_DIRECT (" + fs +
                                 ")");
}

}  // namespace kvtier
