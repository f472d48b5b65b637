"""What this kvtier build has and what this machine offers it: CUDA, GPUs, I/O backend, pinned memory."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field

from kvtier import _core


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
    python: str = platform.python_version()

    @property
    def io_backend_active(self) -> str:
        return "io_uring" if self.io_uring_works else "posix"


def system_info() -> SystemInfo:
    """Probe the build and the machine (cheap: a few milliseconds, one tiny ring and 1 MiB pinned)."""
    gpus, gpu_reason = _core.list_gpus()
    uring_ok, uring_reason = _core.probe_io_uring()
    pinned_ok, pinned_reason = _core.probe_pinned_memory()
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
    )


def format_info(info: SystemInfo) -> str:
    """Human-readable report, one fact a line (what `kvtier info` prints)."""

    def cuda_version(v: int) -> str:
        return f"{v // 1000}.{(v % 1000) // 10}" if v else "-"

    lines = [
        f"kvtier {info.version} (Python {info.python})",
        f"CUDA compiled in:   {'yes' if info.cuda_compiled else 'no'}"
        + (f" (runtime {cuda_version(info.cuda_runtime_version)}, static)" if info.cuda_compiled else ""),
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
    return "\n".join(lines)
