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

}  // namespace kvtier
