"""Where a CPU-tier hit's time to first token goes (a GPU diagnostic, not a benchmark).

bench_e2e's Llama-3-8B-shaped reference engine, one prompt (default 32k tokens): a pure load
(``pool.begin`` + ``seq.wait``, nothing computed), a CPU-tier hit with its time line (started,
prefill queued, loads landed, first token), and a GPU hit for the forward alone; then one more
CPU hit under torch.profiler, printing the CUDA runtime calls that held the host longest (a call
that blocks while the load runs is what keeps the forward from overlapping it; see
docs/architecture.md, "Layer-wise loading").

    python scripts/diag_hit.py [tokens] [vllm|cross_layer] [auto|staged|zero_copy|direct] [half]

``half``: after the CPU hit's profile, one more: a half-prefix hit (the prompt's first half
cached in GPU pages, the second half computed over it, bench_e2e's ``half_prefix_gpu_hit``), its
TTFT against a recompute of the whole prompt, with its GPU time line (the simulator prices this
case ~27% fast at 32k: docs/sim.md).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from bench_e2e import CHUNK, LLAMA3_8B, PAGE, TINY, timed_hit
from kvtier.demo import _push_out_of_gpu
from kvtier.examples.paged_llama import Engine, Llama, LlamaConfig
from kvtier.pool import PagedKVPool


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
    layout = sys.argv[2] if len(sys.argv) > 2 else "vllm"
    method = sys.argv[3] if len(sys.argv) > 3 else "auto"
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = Llama(
        LlamaConfig(**(LLAMA3_8B if cuda else TINY)),
        seed=0,
        dtype=torch.bfloat16 if cuda else torch.float32,
        device=device,
        init_on_device=cuda,
    )
    c = model.config
    elem = 2 if cuda else 4
    block = CHUNK * 2 * c.layers * c.kv_heads * c.head_dim * elem
    pool_tokens = 2 * (n + CHUNK)
    pool = PagedKVPool(
        **model.kv_geometry(),
        kv_layout=layout,
        num_pages=pool_tokens // PAGE,
        page_tokens=PAGE,
        chunk_tokens=CHUNK,
        cpu_bytes=(pool_tokens // CHUNK + 4) * block,
        model_id="diag",
        method=method if cuda else "auto",
    )
    engine = Engine(model, pool, prefill_tokens=None)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, c.vocab, (n,), generator=gen).tolist()
    engine.generate([prompt], 1)
    engine.generate([prompt], 1)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def evicted():
        _push_out_of_gpu(pool, gen, c.vocab)
        pool.cache.drain()
        sync()

    for rep in range(3):
        evicted()
        t0 = time.perf_counter()
        seq = pool.begin(prompt[:-1])
        t1 = time.perf_counter()
        seq.wait()
        sync()
        load = {"begin": round(t1 - t0, 4), "wait": round(time.perf_counter() - t1, 4), "tokens": seq.lower_hit_tokens}
        pool.release(seq)
        evicted()
        _, _, cpu_hit = timed_hit(engine, prompt, device)
        _, _, gpu_hit = timed_hit(engine, prompt, device)
        print(
            json.dumps(
                {
                    "rep": rep,
                    "tokens": n,
                    "layout": layout,
                    "method": method,
                    "load_alone": load,
                    "cpu_hit": cpu_hit,
                    "gpu_hit": gpu_hit,
                }
            ),
            flush=True,
        )

    evicted()
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        _, _, lines = timed_hit(engine, prompt, device)
    print(json.dumps({"profiled_cpu_hit": lines}), flush=True)
    rows = [e for e in prof.key_averages() if e.key.startswith("cuda") or e.key.startswith("aten::")]
    rows.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    print("host time by call during the profiled CPU hit (top 15):")
    for e in rows[:15]:
        print(
            f"  {e.key:48s} calls {e.count:6d}  host self {e.self_cpu_time_total / 1e3:9.2f} ms  "
            f"mean {e.cpu_time_total / max(e.count, 1) / 1e3:8.2f} ms/call (inclusive)"
        )
    gpu_time_line(prof)
    if len(sys.argv) > 4 and sys.argv[4] == "half":
        half_prefix(engine, prompt, gen, device, evicted)
    pool.close()


def half_prefix(engine, prompt, gen, device, evicted) -> None:
    """bench_e2e's half-prefix case under the profiler, beside a recompute of the same length."""
    from torch.profiler import ProfilerActivity, profile

    c, n = engine.model.config, len(prompt)

    def fresh(k):
        return torch.randint(0, c.vocab, (k,), generator=gen).tolist()

    half = prompt[: n // 2] + fresh(n - n // 2)
    recompute = fresh(n)
    times = {}
    for name, p in (("recompute", recompute), ("half_prefix", half)):
        evicted()
        engine.generate([prompt], 1)  # the prompt's pages back on the GPU: the half prefix hits
        t, seq, _ = timed_hit(engine, p, device)
        times[name] = {"ttft_s": round(t, 4), "cached_tokens": seq.cached_tokens}
    print(json.dumps({"half_prefix_vs_recompute": times}), flush=True)
    evicted()
    engine.generate([prompt], 1)
    cuda = device == "cuda"
    half = prompt[: n // 2] + fresh(n - n // 2)  # another second half: the first one is cached now
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        _, seq, _ = timed_hit(engine, half, device)
    print(f"the half-prefix hit ({seq.cached_tokens} cached tokens):")
    gpu_time_line(prof, "half")
    evicted()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        timed_hit(engine, fresh(n), device)
    print("a recompute of the whole prompt:")
    gpu_time_line(prof, "recompute")
    if cuda:
        attention_alone(c, n)


def attention_alone(c, n: int) -> None:
    """``attend`` by itself for one layer's shapes: the whole prompt causal, its first half
    causal, and its second half over the whole (lower-right). With attention's work quadratic,
    the second half costs 3x the first half's; the simulator assumes that."""
    from bench_attention import timed
    from kvtier.examples.paged_llama import attend

    h = n // 2
    g = torch.Generator(device="cuda").manual_seed(0)

    def qkv(t, end):
        q = torch.randn(t, c.heads, c.head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(end, c.kv_heads, c.head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
        return q, k, torch.randn_like(k)

    out = {}
    for name, t, end in (("whole", n, n), ("first_half", h, h), ("second_half", n - h, n)):
        q, k, v = qkv(t, end)
        out[name] = round(timed(lambda: attend(q, k, v, end - t), 7)[0], 3)  # noqa: B023 (called here)
    out["second_over_first"] = round(out["second_half"] / out["first_half"], 2)
    out["whole_over_first"] = round(out["whole"] / out["first_half"], 2)
    print(json.dumps({"attention_alone_ms_per_layer": out}), flush=True)


def gpu_time_line(prof, tag: str = "") -> None:
    """Per CUDA stream of the profiled hit: its kernels and copies, when the first started and
    the last ended, and (on the stream running attention) when each layer's attention kernel
    ran, in ms from the first GPU event. Layer l's attention starting only after the whole load
    means the forward did not overlap the load."""
    import tempfile

    path = os.environ.get("DIAG_TRACE") or tempfile.mktemp(suffix=".json")
    if tag:
        path = path.replace(".json", f"_{tag}.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not gpu:
        print("no GPU events in the trace")
        return
    t0 = min(e["ts"] for e in gpu)
    streams: dict = {}
    for e in gpu:
        streams.setdefault(e.get("args", {}).get("stream"), []).append(e)
    print("GPU time line of the profiled CPU hit (ms from the first GPU event):")
    for sid, evs in sorted(streams.items(), key=lambda kv: min(e["ts"] for e in kv[1])):
        evs.sort(key=lambda e: e["ts"])
        busy = sum(e.get("dur", 0) for e in evs) / 1e3
        kinds: dict = {}
        for e in evs:
            kinds[e["cat"]] = kinds.get(e["cat"], 0) + 1
        print(
            f"  stream {sid}: {kinds}, first start {(evs[0]['ts'] - t0) / 1e3:.2f}, "
            f"last end {(max(e['ts'] + e.get('dur', 0) for e in evs) - t0) / 1e3:.2f}, busy {busy:.2f}"
        )
        attn = [e for e in evs if "flash" in e["name"].lower() or "attention" in e["name"].lower()]
        if attn:
            print("    attention kernels start at: " + ", ".join(f"{(e['ts'] - t0) / 1e3:.1f}" for e in attn))
        top: dict = {}
        for e in evs:
            k = e["name"][:60]
            top[k] = top.get(k, 0) + e.get("dur", 0)
        for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:6]:
            print(f"    {v / 1e3:8.2f} ms  {k}")


if __name__ == "__main__":
    main()
