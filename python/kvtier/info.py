"""What this kvtier build has and what this machine offers it: CUDA, GPUs, I/O backend, pinned memory,
the peers' data path."""

from __future__ import annotations

import ctypes
import platform
from dataclasses import dataclass, field

from kvtier import _core
from kvtier.p2p.nixl_agent import nixl_unavailable_reason


@dataclass
class SystemInfo:
    version: str
    cuda_compiled: bool
    cuda_runtime_version: int
    gpus: list[dict] = field(default_factory=list)
    gpu_reason: str = ""
    io_backend_compiled: str = "posix"
    io_uring_works: bool = False
    io_uring_reason: str = ""
    pinned_memory: bool = False
    pinned_reason: str = ""
    nixl_installed: bool = False
    nixl_reason: str = ""
    python: str = platform.python_version()

    @property
    def io_backend_active(self) -> str:
        return "io_uring" if self.io_uring_works else "posix"


# cudaErrorInsufficientDriver's text. The static CUDA runtime reports it both when the driver is
# older than the runtime and when there is no driver at all (no libcuda to load).
_INSUFFICIENT_DRIVER = "CUDA driver version is insufficient for CUDA runtime version"


def nvidia_driver_version(load=ctypes.CDLL) -> int | None:
    """The CUDA version the NVIDIA driver supports (``cuDriverGetVersion``, e.g. 12040; 0 if it
    does not say), or None when no driver library (libcuda.so.1) can be loaded. ``load`` opens a
    shared library by name."""
    try:
        libcuda = load("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    try:
        if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return 0
    except AttributeError:
        return 0
    return version.value


def explain_cuda_reason(reason: str, driver_version: int | None, runtime_version: int) -> str:
    """A CUDA failure as the user should read it: with no driver, "no NVIDIA driver found" in place
    of the runtime's "driver version is insufficient"; with an old driver, both versions."""
    if _INSUFFICIENT_DRIVER not in reason:
        return reason
    if driver_version is None:
        return reason.replace(_INSUFFICIENT_DRIVER, "no NVIDIA driver found")
    if driver_version:
        return reason.replace(
            _INSUFFICIENT_DRIVER,
            f"the NVIDIA driver supports CUDA {_cuda_version(driver_version)}, older than "
            f"this build's CUDA runtime {_cuda_version(runtime_version)}",
        )
    return reason


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}" if v else "-"


def system_info() -> SystemInfo:
    """Probe the build and the machine (cheap: a few milliseconds, one tiny ring and 1 MiB pinned)."""
    gpus, gpu_reason = _core.list_gpus()
    uring_ok, uring_reason = _core.probe_io_uring()
    pinned_ok, pinned_reason = _core.probe_pinned_memory()
    nixl_reason = nixl_unavailable_reason()
    if _INSUFFICIENT_DRIVER in gpu_reason or _INSUFFICIENT_DRIVER in pinned_reason:
        driver = nvidia_driver_version()
        runtime = int(_core.CUDA_RUNTIME_VERSION)
        gpu_reason = explain_cuda_reason(gpu_reason, driver, runtime)
        pinned_reason = explain_cuda_reason(pinned_reason, driver, runtime)
    return SystemInfo(
        version=_core.__version__,
        cuda_compiled=bool(_core.CUDA_COMPILED),
        cuda_runtime_version=int(_core.CUDA_RUNTIME_VERSION),
        gpus=list(gpus),
        gpu_reason=gpu_reason,
        io_backend_compiled=_core.IO_BACKEND_COMPILED,
        io_uring_works=bool(uring_ok),
        io_uring_reason=uring_reason,
        pinned_memory=bool(pinned_ok),
        pinned_reason=pinned_reason,
        nixl_installed=nixl_reason is None,
        nixl_reason=nixl_reason or "",
    )


def format_info(info: SystemInfo) -> str:
    """Human-readable report, one fact a line (what `kvtier info` prints)."""

    lines = [
        f"kvtier {info.version} (Python {info.python})",
        f"CUDA compiled in:   {'yes' if info.cuda_compiled else 'no'}"
        + (f" (runtime {_cuda_version(info.cuda_runtime_version)}, static)" if info.cuda_compiled else ""),
    ]
    if info.gpus:
        lines.append(f"GPUs at run time:   {len(info.gpus)}")
        for g in info.gpus:
            cc = ".".join(str(x) for x in g["compute_capability"])
            lines.append(
                f"  [{g['index']}] {g['name']}, {g['total_memory'] / 2**30:.1f} GiB, sm_{cc.replace('.', '')}, "
                f"PCI {g['pci_bus_id']}"
            )
    else:
        lines.append(f"GPUs at run time:   0 ({info.gpu_reason or 'none found'}) -> CPU paths")
    lines.append(f"I/O backend built:  {info.io_backend_compiled}")
    if info.io_uring_works:
        lines.append("io_uring on kernel: works -> active backend: io_uring")
    else:
        lines.append(f"io_uring on kernel: unavailable ({info.io_uring_reason}) -> active backend: posix")
    if info.pinned_memory:
        lines.append("Pinned memory:      yes (cudaHostRegister)")
    else:
        lines.append(f"Pinned memory:      no ({info.pinned_reason})")
    # With peers.transport auto (the default), a member with nixl READs from peers that offer it
    # too and streams from the others (chosen per peer at the handshake); without nixl it streams.
    if info.nixl_installed:
        lines.append("Peer data path:     NIXL READs from peers that offer them, else the TCP stream; nixl installed")
    else:
        lines.append(f"Peer data path:     TCP stream; nixl not installed ({info.nixl_reason})")
    return "\n".join(lines)
