// The POSIX I/O backend: preadv/pwritev on a pool of worker threads plus a deadline watchdog.
// Used where io_uring is unavailable, and as the benchmark baseline. Contract in
// storage/io_backend.h.
#pragma once

#include <memory>

#include "common/status.h"
#include "storage/io_backend.h"

namespace kvtier {

StatusOr<std::unique_ptr<IoBackend>> CreatePosixBackend(int fd, const IoBackendOptions& options);

}  // namespace kvtier
