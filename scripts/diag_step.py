"""Two questions about the reference engine's prefill steps on a GPU (a diagnostic, not a benchmark).

1. Does a prompt of a new length pay a cuDNN plan build once its attention is padded to a bucket
   (paged_llama.PLAN_BUCKET)? Recomputes of 4096 tokens (warm), then twice each of 3584 and 3328
   tokens (padded to 4096): the first and second TTFT of each length, and ``attend`` alone.
2. Where a GPU hit's step goes at 4k / 16k / 32k cached tokens: its TTFT, the host's span of
   queued work, and per CUDA stream the GPU's busy time and its top kernels (the simulator prices
   that step as the longer of a fixed launch cost and its FLOPs: docs/sim.md, section 3).

    python scripts/diag_step.py
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from bench_e2e import CHUNK, LLAMA3_8B, PAGE, timed_hit
from diag_hit import gpu_time_line
from kvtier.examples import paged_llama
from kvtier.examples.paged_llama import Engine, Llama, LlamaConfig
from kvtier.pool import PagedKVPool


def main() -> None:
    model = Llama(LlamaConfig(**LLAMA3_8B), seed=0, dtype=torch.bfloat16, device="cuda", init_on_device=True)
    c = model.config
    n_max = 32768
    pool_tokens = 2 * (n_max + CHUNK)
    pool = PagedKVPool(
        **model.kv_geometry(),
        kv_layout="vllm",
        num_pages=pool_tokens // PAGE,
        page_tokens=PAGE,
        chunk_tokens=CHUNK,
        cpu_bytes=0,
        model_id="diag_step",
    )
    engine = Engine(model, pool, prefill_tokens=None)
    gen = torch.Generator().manual_seed(1)

    def fresh(k):
        return torch.randint(0, c.vocab, (k,), generator=gen).tolist()

    def ttft(p):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.generate([p], 1)
        torch.cuda.synchronize()
        return round(time.perf_counter() - t0, 4)

    out = {"warm_4096": [ttft(fresh(4096)), ttft(fresh(4096))]}
    for n in (3584, 3328):
        out[f"recompute_{n}"] = [ttft(fresh(n)), ttft(fresh(n))]
    g = torch.Generator(device="cuda").manual_seed(0)
    for n in (3072, 2816):  # attend alone, new lengths padded to 4096
        q = torch.randn(n, c.heads, c.head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(n, c.kv_heads, c.head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
        ms = []
        for _ in range(3):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            paged_llama.attend(q, k, k, 0)
            b.record()
            b.synchronize()
            ms.append(round(a.elapsed_time(b), 2))
        out[f"attend_alone_{n}_ms"] = ms
    print(json.dumps({"new_lengths": out}), flush=True)

    from torch.profiler import ProfilerActivity, profile

    for n in (4096, 16384, 32768):
        prompt = fresh(n)
        engine.generate([prompt], 1)
        times = [round(timed_hit(engine, prompt, "cuda")[0], 4) for _ in range(3)]
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            _t, _, lines = timed_hit(engine, prompt, "cuda")
        ops = [e for e in prof.events() if e.device_type.name == "CPU" and e.name.startswith("cuda")]
        span = (max(e.time_range.end for e in ops) - min(e.time_range.start for e in ops)) / 1e3 if ops else None
        print(
            json.dumps({"gpu_hit": n, "ttft_s": times, "profiled": lines, "host_cuda_calls_span_ms": span}), flush=True
        )
        gpu_time_line(prof, f"gpu_hit_{n}")
    pool.close()


if __name__ == "__main__":
    main()
