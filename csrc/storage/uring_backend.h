// The io_uring I/O backend (liburing): one ring, registered file, batched submission, a
// completion thread that also enforces deadlines. Contract in storage/io_backend.h.
#pragma once

#include <memory>

#include "common/status.h"
#include "storage/io_backend.h"

namespace kvtier {

// Unavailable when liburing was not compiled in, or the kernel refuses the ring (too old,
// io_uring disabled by sysctl or seccomp, no IORING_FEAT_EXT_ARG i.e. Linux < 5.11).
StatusOr<std::unique_ptr<IoBackend>> CreateUringBackend(int fd, const IoBackendOptions& options);

}  // namespace kvtier
