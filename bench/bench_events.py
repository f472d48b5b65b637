"""Benchmark what KV events cost a store: KVCache.store calls that each evict as many chunks as
they store, with events recorded (and taken, as a publisher would) against the same calls with
events off (``events_capacity=0``), in the same run.

Small chunks (16 KiB, CPU copies) make the per-chunk bookkeeping as large a part of a store as it
gets; with real chunks (megabytes) the copies dwarf it.

Usage::

    python bench/bench_events.py [--reps 9] [--stores 2000] [--out bench/results]

prints one JSON document (format: /work/shared/BENCH.md) and, with ``--out``, writes it to
``<out>/bench_events-store_evict_churn-cpu-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from bench_report import cpu_model, git_commit
from kvtier import KVCache, Layout

BENCH = "bench_events"
WORKLOAD = "store_evict_churn"
CHUNK_TOKENS = 16
CHUNKS_PER_STORE = 4
POOL_CHUNKS = 64
BASELINE = "events_off"


def make_cache(events_capacity: int) -> KVCache:
    kv = torch.zeros(64, 2, 2, CHUNK_TOKENS, 4, 32)  # cross-layer pages: 16 KiB a chunk
    layout = Layout.from_cross_layer(kv, chunk_tokens=CHUNK_TOKENS)
    return KVCache(layout, cpu_bytes=POOL_CHUNKS * layout.chunk_bytes, method="cpu", events_capacity=events_capacity)


def run_stores(cache: KVCache, prompts: list[np.ndarray], take_every: int) -> float:
    """Seconds for one store of each prompt (each evicts CHUNKS_PER_STORE chunks once warm),
    taking the events every ``take_every`` stores (0: never)."""
    pages = list(range(CHUNKS_PER_STORE))
    start = time.perf_counter()
    for i, p in enumerate(prompts, start=1):
        cache.store(p, pages).wait()
        if take_every and i % take_every == 0:
            cache.take_events()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=9, help="repetitions per case (best is kept)")
    parser.add_argument("--stores", type=int, default=2000, help="store calls per repetition")
    parser.add_argument("--out", type=Path, help="directory to write the JSON result into")
    args = parser.parse_args()
    torch.set_num_threads(1)

    rng = np.random.default_rng(0)
    cases = {
        "events_taken_every_64_stores": (65536, 64, "events recorded, taken as KVEvents every 64 stores"),
        "events_taken_every_store": (65536, 1, "events recorded, taken as KVEvents after every store"),
        "events_never_taken": (4096, 0, "events recorded into a full log (the oldest dropped)"),
    }
    caches = {name: make_cache(cap) for name, (cap, _, _) in cases.items()}
    baseline_cache = make_cache(0)
    best = {name: float("inf") for name in cases}
    best_baseline = {name: float("inf") for name in cases}
    for _ in range(args.reps):
        for name, (_, take, _) in cases.items():
            # Fresh prompts each time: every store misses and evicts. Case and baseline alternate,
            # so that drift on the machine hits both alike.
            prompts = [rng.integers(0, 50000, CHUNKS_PER_STORE * CHUNK_TOKENS) for _ in range(args.stores)]
            best_baseline[name] = min(best_baseline[name], run_stores(baseline_cache, prompts, 0))
            prompts = [rng.integers(0, 50000, CHUNKS_PER_STORE * CHUNK_TOKENS) for _ in range(args.stores)]
            best[name] = min(best[name], run_stores(caches[name], prompts, take))
    results = []
    for name, (cap, _, note) in cases.items():
        value = best[name] / args.stores * 1e6
        base = best_baseline[name] / args.stores * 1e6
        st = caches[name].stats()
        results.append(
            {
                "case": name,
                "value": round(value, 2),
                "unit": "us/store",
                "baseline": BASELINE,
                "baseline_value": round(base, 2),
                "ratio": round(base / value, 3),
                "note": f"{note}; events_capacity={cap}; {CHUNKS_PER_STORE} chunks stored and "
                f"{CHUNKS_PER_STORE} evicted a store, 16 KiB chunks, CPU copies; best of {args.reps} x "
                f"{args.stores} stores; events recorded {st['events_recorded']}, dropped {st['events_dropped']}",
            }
        )
    for c in (*caches.values(), baseline_cache):
        c.close()

    date = datetime.date.today().isoformat()
    doc = {
        "bench": BENCH,
        "workload": WORKLOAD,
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "date": date,
        "commit": git_commit(),
        "results": results,
    }
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"{BENCH}-{WORKLOAD}-cpu-{date}.json"
        path.write_text(text + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
