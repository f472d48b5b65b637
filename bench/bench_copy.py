"""bench_copy (Python front): offload/load of Llama-3-8B-shaped KV through kvtier.KVCache.

4096 tokens (32 layers, 8 KV heads, head dim 128, bf16, 16-token pages) at random page ids, in
vLLM's per-layer layout and kvtier's cross-layer layout; store (gather) and load (scatter) with
each copy method. Measured in the same run: a contiguous pinned copy of the same bytes each way
(the PCIe limit), torch index_select + one copy, one torch copy per page, and the slowdown of a
bf16 8192x8192 matmul on the compute stream while each method runs beside it.

    python bench/bench_copy.py [--methods auto,direct,staged,zero_copy] [--out bench/results]
Without a GPU it measures the CPU path against one memcpy of the same bytes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import threading
import time

import kvtier
import numpy as np
import torch
from bench_report import git_commit as commit
from bench_report import machine as _machine

LAYERS, HEADS, DIM, PAGE, TOKENS, CHUNK = 32, 8, 128, 16, 4096, 256
DTYPE = torch.bfloat16


def timed(fn, device: str, reps: int) -> float:
    """Best seconds per call of fn over reps calls (after one warm-up)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


class Setup:
    def __init__(self, kind: str, device: str, num_pages: int):
        self.kind, self.device = kind, device
        if kind == "vllm":
            self.kv = [torch.randn(2, num_pages, PAGE, HEADS, DIM, device=device).to(DTYPE) for _ in range(LAYERS)]
            self.layout = kvtier.Layout.from_vllm(self.kv, chunk_tokens=CHUNK)
        else:
            self.kv = [torch.randn(num_pages, LAYERS, 2, PAGE, HEADS, DIM, device=device).to(DTYPE)]
            self.layout = kvtier.Layout.from_cross_layer(self.kv[0], chunk_tokens=CHUNK)
        self.nbytes = TOKENS // CHUNK * self.layout.chunk_bytes


def bench_method(setup: Setup, method: str, reps: int, rng) -> tuple[float, float, tuple]:
    """(store GB/s, load GB/s, (cache, store_fn, load_fn)) for one copy method."""
    pages = TOKENS // PAGE
    cache = kvtier.KVCache(setup.layout, cpu_bytes=3 * setup.nbytes, method=method, model_id=method)
    seq = [0]

    def store():  # fresh tokens every call: a store always copies all 16 chunks
        seq[0] += 1
        toks = np.random.default_rng(seq[0]).integers(0, 32000, TOKENS)
        src = rng.choice(setup.layout.num_pages, pages, replace=False)
        fut = cache.store(toks, src, stream=0)
        assert fut.wait() == TOKENS // CHUNK, fut.chunks

    load_toks = np.random.default_rng(10**6).integers(0, 32000, TOKENS)

    def prime():  # (re)store the prefix that load() reads, in case stores evicted it
        cache.store(load_toks, rng.choice(setup.layout.num_pages, pages, replace=False), stream=0).wait()

    prime()

    def load():
        dst = rng.choice(setup.layout.num_pages, pages, replace=False)
        assert cache.load(load_toks, dst, stream=0).wait() == TOKENS

    # Loads first: each load makes its chunks most recent, so the stores that follow (and that
    # alternate with loads in the matmul test) evict older stored chunks, never the loaded ones.
    t_load = timed(load, setup.device, reps)
    t_store = timed(store, setup.device, reps)
    prime()
    return setup.nbytes / t_store / 1e9, setup.nbytes / t_load / 1e9, (cache, store, load)


def baselines(setup: Setup, reps: int, rng) -> dict:
    dev = setup.device
    n = setup.nbytes
    out = {}
    if dev == "cpu":
        a = torch.empty(n, dtype=torch.uint8)
        b = torch.empty(n, dtype=torch.uint8)
        out["contiguous_out"] = out["contiguous_in"] = n / timed(lambda: b.copy_(a), dev, reps) / 1e9
        return out
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    gpu = torch.empty(n, dtype=torch.uint8, device=dev)
    out["contiguous_out"] = n / timed(lambda: host.copy_(gpu, non_blocking=True), dev, reps) / 1e9
    out["contiguous_in"] = n / timed(lambda: gpu.copy_(host, non_blocking=True), dev, reps) / 1e9
    pages = torch.as_tensor(rng.choice(setup.layout.num_pages, TOKENS // PAGE, replace=False), device=dev)
    if setup.kind == "vllm":

        def index_select():
            parts = [t.index_select(1, pages) for t in setup.kv]
            host.copy_(torch.cat([p.reshape(-1) for p in parts]).view(torch.uint8), non_blocking=True)

        page_list = pages.tolist()
        page_bytes = PAGE * HEADS * DIM * 2

        def per_page():
            off = 0
            for t in setup.kv:
                for i in range(2):
                    for p in page_list:
                        host[off : off + page_bytes].copy_(t[i, p].reshape(-1).view(torch.uint8), non_blocking=True)
                        off += page_bytes
    else:

        def index_select():
            host.copy_(setup.kv[0].index_select(0, pages).reshape(-1).view(torch.uint8), non_blocking=True)

        page_list = pages.tolist()
        page_bytes = setup.layout.segments[0].page_bytes

        def per_page():
            for j, p in enumerate(page_list):
                host[j * page_bytes : (j + 1) * page_bytes].copy_(
                    setup.kv[0][p].reshape(-1).view(torch.uint8), non_blocking=True
                )

    out["torch_index_select_copy"] = n / timed(index_select, dev, reps) / 1e9
    out["torch_copy_per_page"] = n / timed(per_page, dev, max(1, reps // 3)) / 1e9
    return out


def matmul_slowdown(load_fn, store_fn, nbytes, device) -> tuple[float, float, float]:
    """ms per bf16 8192^2 matmul alone and while kvtier copies loop beside it, and the GB/s
    the copies reached meanwhile (a method that starves on SMs shows up there, not in the matmul)."""
    a = torch.randn(8192, 8192, device=device, dtype=DTYPE)
    b = torch.randn(8192, 8192, device=device, dtype=DTYPE)
    s = torch.cuda.Stream()

    def run(n=200):  # about 0.3 s of matmuls on an H200
        with torch.cuda.stream(s):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a @ b
            e0.record()
            for _ in range(n):
                a @ b
            e1.record()
        e1.synchronize()
        return e0.elapsed_time(e1) / n

    run(10)
    alone = run()
    stop = threading.Event()
    moved = [0, 0.0]

    def copier():
        while not stop.is_set():
            t0 = time.perf_counter()
            load_fn()
            store_fn()
            moved[0] += 2 * nbytes
            moved[1] += time.perf_counter() - t0

    t = threading.Thread(target=copier)
    t.start()
    time.sleep(0.05)
    beside = run()
    stop.set()
    t.join(60)
    return alone, beside, moved[0] / max(moved[1], 1e-9) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="auto,direct,staged,zero_copy")
    ap.add_argument("--layouts", default="vllm,cross_layer")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-matmul", action="store_true")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    methods = args.methods.split(",") if device != "cpu" else ["cpu"]
    rng = np.random.default_rng(0)
    results = []
    for kind in args.layouts.split(","):
        setup = Setup(kind, device, num_pages=4 * TOKENS // PAGE)
        base = baselines(setup, args.reps, rng)
        for name in ("torch_index_select_copy", "torch_copy_per_page"):
            if name in base:
                results.append(
                    {
                        "case": f"{name}_{kind}",
                        "value": round(base[name], 3),
                        "unit": "GB/s",
                        "baseline": "contiguous_pinned_copy_out",
                        "baseline_value": round(base["contiguous_out"], 3),
                        "ratio": round(base[name] / base["contiguous_out"], 4),
                    }
                )
        for method in methods:
            g, s, (cache, store, load) = bench_method(setup, method, args.reps, rng)
            for op, v, lim in (("gather", g, base["contiguous_out"]), ("scatter", s, base["contiguous_in"])):
                results.append(
                    {
                        "case": f"{op}_{method}_{kind}",
                        "value": round(v, 3),
                        "unit": "GB/s",
                        "baseline": f"contiguous_pinned_copy_{'out' if op == 'gather' else 'in'}",
                        "baseline_value": round(lim, 3),
                        "ratio": round(v / lim, 4),
                        "note": f"method resolved to {cache.stats()['method']}",
                    }
                )
                if "torch_copy_per_page" in base:
                    results.append(
                        {
                            "case": f"{op}_{method}_{kind}_vs_per_page",
                            "value": round(v, 3),
                            "unit": "GB/s",
                            "baseline": "torch_copy_per_page",
                            "baseline_value": round(base["torch_copy_per_page"], 3),
                            "ratio": round(v / base["torch_copy_per_page"], 2),
                        }
                    )
            if device != "cpu" and not args.no_matmul:
                alone, beside, gbps = matmul_slowdown(load, store, setup.nbytes, device)
                results.append(
                    {
                        "case": f"matmul_8192_beside_{method}_{kind}",
                        "value": round(beside, 3),
                        "unit": "ms",
                        "baseline": "matmul_8192_alone",
                        "baseline_value": round(alone, 3),
                        "ratio": round(alone / beside, 4),
                        "note": f"kvtier load+store ran at {gbps:.1f} GB/s beside the matmul",
                    }
                )
            cache.close()
            print(json.dumps(results[-1]), flush=True)
        del setup
        if device != "cpu":
            torch.cuda.empty_cache()
    date = dt.date.today().isoformat()
    doc = {
        "bench": "bench_copy_py",
        "workload": "llama3_8b_4096tok",
        "machine": _machine(torch.cuda.get_device_name(0) if torch.cuda.is_available() else None),
        "date": date,
        "commit": commit(),
        "results": results,
    }
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        tag = "cpu" if device == "cpu" else torch.cuda.get_device_name(0).split()[1].lower()
        path = os.path.join(args.out, f"bench_copy_py-llama3_8b_4096tok-{tag}-{date}.json")
        with open(path, "w") as f:
            f.write(text + "\n")
        print("wrote", path)


if __name__ == "__main__":
    main()
