"""Facts every Python bench records in its result document (format in BENCH.md): the machine and
the commit. The Python counterpart of bench/bench_json.h; benches import it from their folder."""

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
    """"NVIDIA H200, 16 cores" or "AMD EPYC, 2 cores"."""
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


def publish(bench: str, workload: str, tag: str, results: list[dict], out_dir: str | None, *,
            machine_name: str | None = None, indent: int = 2, **extra) -> dict:
    """Build the result document (BENCH.md), print it, and write it to
    ``out_dir/<bench>-<workload>-<tag>-<date>.json`` when ``out_dir`` is set. ``tag`` is the GPU
    ("h100") or "cpu"; ``extra`` keys are added to the document. Returns the document."""
    import datetime
    import json
    import sys

    doc = {"bench": bench, "workload": workload, "machine": machine_name or machine(),
           "date": datetime.date.today().isoformat(), "commit": git_commit(), "results": results, **extra}
    text = json.dumps(doc, indent=indent)
    print(text)
    if out_dir:
        path = os.path.join(out_dir, f"{bench}-{workload}-{tag}-{doc['date']}.json")
        with open(path, "w") as f:
            f.write(text + "\n")
        print("wrote", path, file=sys.stderr)
    return doc
