"""A time line of one fp8 store and one CPU hit of the GPU codec tier (a diagnostic; needs a CUDA
GPU): 64 chunks of bench_codec_tier's KV, traced with torch.profiler. The tier's own steps (reserve,
queue, commit, load, check, decode) are marked as host ranges by wrapping its methods here; the
GPU's kernels and copies come from CUPTI. Prints, per traced call, every host range and GPU
operation in start order (ms from the call's start, duration, stream), then each stream's busy
time and the time no GPU work ran.

    python scripts/trace_codec_tier.py [--out DIR]   # DIR: also the Chrome traces
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import bench_codec_tier as b
import kvtier.codec_tier as ct
from kvtier import KVCache
from prof_codec_tier import CHUNKS, store_and_hit_times

MARKED = (
    "_queue_stack",
    "_commit_stack",
    "_load_round",
    "_decode_round",
    "_wait_event",
    "_scatter_gpu",
    "_gather_gpu",
)
GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def _mark(cls) -> None:
    """Wrap the tier's steps in record_function ranges named after them."""
    for name in MARKED:
        fn = getattr(cls, name)

        @functools.wraps(fn)
        def wrapped(*a, __fn=fn, __name=name, **kw):
            with record_function(f"tier.{__name}"):
                return __fn(*a, **kw)

        setattr(cls, name, wrapped)


def _union(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, -1.0
    for s, e in sorted(spans):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def summarize(trace_path: str, what: str) -> None:
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    call = [e for e in events if e.get("name") == f"call.{what}" and e.get("ph") == "X"]
    if not call:
        print(f"{what}: no call range in the trace")
        return
    t0, t_end = call[0]["ts"], call[0]["ts"] + call[0]["dur"]
    rows, gpu = [], {}
    for e in events:
        if e.get("ph") != "X" or "dur" not in e or e["ts"] + e["dur"] < t0 or e["ts"] > t_end + 20e3:
            continue
        name, cat = e.get("name", ""), e.get("cat", "")
        if cat in GPU_CATS:
            stream = e.get("args", {}).get("stream", "?")
            gpu.setdefault(stream, []).append((e["ts"], e["ts"] + e["dur"]))
            size = e.get("args", {}).get("bytes")
            label = f"{cat} {name[:48]}" + (f" {size / 2**20:.1f} MiB" if size else "")
            rows.append((e["ts"], e["dur"], f"gpu s{stream}", label))
        elif cat == "user_annotation" and (name.startswith("tier.") or name.startswith("call.")):
            # (the GPU's copies of these ranges, "gpu_user_annotation", are left out)
            rows.append((e["ts"], e["dur"], "host", name))
    print(f"--- {what}: {call[0]['dur'] / 1e3:.2f} ms on the host")
    for ts, dur, where, label in sorted(rows):
        print(f"{(ts - t0) / 1e3:8.3f} {dur / 1e3:7.3f}  {where:10s} {label}")
    spans = [s for v in gpu.values() for s in v]
    end = max([e for _, e in spans] + [t_end])
    for stream, v in sorted(gpu.items(), key=lambda kv: str(kv[0])):
        print(f"stream {stream}: busy {_union(v) / 1e3:.3f} ms ({len(v)} operations)")
    print(f"GPU busy (any stream) {_union(spans) / 1e3:.3f} ms of {(end - t0) / 1e3:.3f} ms from the call's start")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="", help="a directory for the Chrome traces")
    args = ap.parse_args()
    out = args.out or tempfile.mkdtemp()
    _mark(ct.CodecTier)
    _, layout = b.make_kv(CHUNKS, "cuda")
    ppc = b.CHUNK // b.PAGE
    src, dst = np.arange(CHUNKS * ppc), np.arange(CHUNKS * ppc, 2 * CHUNKS * ppc)
    fp8 = {**b.CODECS["fp8"], "codec_device": "gpu", "method": "auto"}
    with KVCache(layout, cpu_bytes=4 * CHUNKS * layout.chunk_bytes, **fp8) as cache:
        store, t, _, _ = store_and_hit_times(cache, src, dst, 2)
        for what, fn in (("store", store), ("load", lambda: cache.load(t, dst).wait())):
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                with record_function(f"call.{what}"):
                    fn()
                torch.cuda.synchronize()
            path = os.path.join(out, f"trace_codec_tier_{what}.json")
            p.export_chrome_trace(path)
            summarize(path, what)


if __name__ == "__main__":
    main()
