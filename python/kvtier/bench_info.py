"""Facts a benchmark records in its result document (../shared/BENCH.md): the machine and the
commit. bench/bench_report.py and the examples that write bench documents use them."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(gpu_name: str | None = None) -> str:
    """ "NVIDIA H200, 16 cores" or "AMD EPYC, 2 cores"."""
    return f"{gpu_name or cpu_model()}, {os.cpu_count()} cores"


def git_commit() -> str:
    """Short hash of HEAD, with ``-dirty`` when the tree has changes (the measured code is then
    not exactly that commit); "unknown" outside a git checkout."""

    def git(*argv: str) -> str:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", *argv], capture_output=True, text=True, check=True, cwd=here).stdout.strip()

    if os.environ.get("KVTIER_BENCH_COMMIT"):  # a copy without .git (the GPU machine's)
        return os.environ["KVTIER_BENCH_COMMIT"]
    try:
        rev = git("rev-parse", "--short=7", "HEAD")
        return rev + ("-dirty" if git("status", "--porcelain") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
