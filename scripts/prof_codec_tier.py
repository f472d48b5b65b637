"""Where the GPU codec tier's time goes (a diagnostic; needs a CUDA GPU): fp8 stores into the CPU
tier and CPU hits of 64 chunks of bench_codec_tier's KV, with the tier's page <-> chunk range copies
by the copy engines ("dma") and by the copy kernel ("kernel"), raw chunks beside them, then a
torch.profiler table of each fp8 variant's store and load (by self CPU time for the kernel one).

    python scripts/prof_codec_tier.py
"""

from __future__ import annotations

import itertools
import os
import sys
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import bench_codec_tier as b
import kvtier.codec_tier as ct
from kvtier import KVCache

CHUNKS = 64
_SEEDS = itertools.count(1)  # every store of every call stores tokens not stored before


def store_and_hit_times(cache, src, dst, reps: int):
    """A warm-up, then ``reps`` rounds of a store of CHUNKS fresh chunks from pages ``src`` and a
    CPU hit of them into pages ``dst``, each timed to the GPU's end (``reps`` 0: the warm-up's store
    and hit only). Returns (the store function,
    the last tokens stored, store seconds, hit seconds)."""

    def store():
        seed = next(_SEEDS)
        toks = list(range(seed * 10**6, seed * 10**6 + CHUNKS * b.CHUNK))
        cache.store(toks, src).wait()
        return toks

    t = store()
    cache.load(t, dst).wait()
    torch.cuda.synchronize()
    stores, loads = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        t = store()
        torch.cuda.synchronize()
        stores.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        cache.load(t, dst).wait()
        torch.cuda.synchronize()
        loads.append(time.perf_counter() - t0)
    return store, t, stores, loads


def main() -> None:
    _, layout = b.make_kv(CHUNKS, "cuda")
    ppc = b.CHUNK // b.PAGE
    src, dst = np.arange(CHUNKS * ppc), np.arange(CHUNKS * ppc, 2 * CHUNKS * ppc)
    fp8 = {**b.CODECS["fp8"], "codec_device": "gpu", "method": "auto"}
    for name, opts, method in (
        ("none", {"method": "auto"}, "kernel"),
        ("fp8 dma", fp8, "dma"),
        ("fp8 kernel", fp8, "kernel"),
    ):
        ct._SEGMENT_METHOD = method
        with KVCache(layout, cpu_bytes=4 * CHUNKS * layout.chunk_bytes, **opts) as cache:
            store, t, stores, loads = store_and_hit_times(cache, src, dst, 3)
            raw = CHUNKS * layout.chunk_bytes
            st, ld = min(stores), min(loads)
            print(
                f"{name}: store {raw / st / 1e9:.2f} GB/s ({st * 1e3:.1f} ms), "
                f"load {raw / ld / 1e9:.2f} GB/s ({ld * 1e3:.1f} ms)"
            )
            if name == "none":
                continue
            for what, fn in (("store", store), ("load", lambda cache=cache, t=t: cache.load(t, dst).wait())):
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                    fn()
                    torch.cuda.synchronize()
                tables = [("self_cuda_time_total", "CUDA time", 10)]
                if method == "kernel":
                    tables.insert(0, ("self_cpu_time_total", "self CPU time", 15))
                for key, label, rows in tables:
                    print(f"--- {name} {what}: by {label}")
                    print(p.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
