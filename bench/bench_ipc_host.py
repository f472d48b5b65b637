"""bench_ipc_host: the host-side cost of one CUDA IPC page copy call (checks and byte ranges, before
the core's copy), for a PageCopier built once beside ``copy_pages``' build-per-call, same run.

Workload ``llama3_8b_4096tok``: 4096 tokens of Llama-3-8B-shaped KV in vLLM's layout (32 tensors
``[2, pages, 16, 8, 128]`` bf16): 256 pages, 16 chunks of 16 pages scattered over a 300-page pool,
so 1024 byte ranges a call (the bench_p2p_gpu copy). On the H100 pair that copy takes about
1.5 ms on the GPU, and end to end ran at 0.80 of torch's device-to-device copy (docs/p2p.md): the
host work per call is part of that gap. Host-only: it runs on any machine (CPU tensors stand in;
only their addresses are used).

    python bench/bench_ipc_host.py [--calls 2000] [--out bench/results/]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
from bench_report import publish


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch
    from kvtier.p2p.cuda_ipc import PageCopier

    src = [torch.empty(2, 300, 16, 8, 128, dtype=torch.bfloat16) for _ in range(32)]
    dst = [torch.empty(2, 300, 16, 8, 128, dtype=torch.bfloat16) for _ in range(32)]
    rng = np.random.default_rng(0)
    chunk_s, chunk_d = rng.permutation(18)[:16], rng.permutation(18)[:16]
    sp = (chunk_s[:, None] * 16 + np.arange(16)[None, :]).ravel()
    dp = (chunk_d[:, None] * 16 + np.arange(16)[None, :]).ravel()
    cached = PageCopier(src, dst, 1)
    assert len(cached.segments(sp, dp)) == 1024

    def per_call(fn) -> float:
        for _ in range(50):
            fn()
        t0 = time.perf_counter()
        for _ in range(args.calls):
            fn()
        return (time.perf_counter() - t0) / args.calls

    times = {"once": [], "per_call": []}
    for _ in range(args.reps):  # alternate, median of the repetitions
        times["per_call"].append(per_call(lambda: PageCopier(src, dst, 1).segments(sp, dp)))
        times["once"].append(per_call(lambda: cached.segments(sp, dp)))
    us = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    results = [
        {
            "case": "page_copier_built_once",
            "value": round(us["once"], 1),
            "unit": "us/call",
            "baseline": "copy_pages_built_per_call",
            "baseline_value": round(us["per_call"], 1),
            "ratio": round(us["per_call"] / us["once"], 2),
            "note": (
                f"host work before the core copy for 1024 byte ranges (32 layers x K/V x 16 chunk runs); "
                f"median of {args.reps} x {args.calls} calls; ratio = baseline / value (time: lower is better)"
            ),
        }
    ]
    publish(
        "bench_ipc_host",
        "llama3_8b_4096tok",
        "cpu",
        results,
        args.out,
        indent=1,
        samples_us={k: [round(t * 1e6, 1) for t in v] for k, v in times.items()},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
