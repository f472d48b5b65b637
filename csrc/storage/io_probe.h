// Which disk I/O backend this build has, and whether io_uring actually works on this kernel.
#pragma once

#include <string>

#include "common/status.h"

namespace kvtier {

// "io_uring" when liburing was linked in, else "posix".
const char* CompiledIoBackend();
// OK when a small io_uring ring can be created and a NOP round-trips; otherwise why not
// (not compiled in, kernel too old, disabled by sysctl or seccomp, ...).
Status ProbeIoUring();
// OK when a file in `dir` can be opened with O_DIRECT (what the disk store needs); otherwise
// InvalidArgument naming the directory and its file system (tmpfs before Linux 6.6, ramfs, some
// FUSE and network file systems refuse it), or IoError when the directory cannot be used at all.
// Leaves nothing behind.
Status ProbeDirectIo(const std::string& dir);

}  // namespace kvtier
