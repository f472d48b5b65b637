"""bench_e2e: time to first token of a Llama-3-8B-shaped model with kvtier, per tier, per prompt length.

The paged reference engine (kvtier.examples.paged_llama) with random bf16 weights (32 layers,
hidden 4096, 32 heads, 8 KV heads, intermediate 14336) serves prompts of 4k, 16k and 32k tokens:
a full recompute (the baseline, measured in the same run), then full-prefix hits from GPU pages,
the CPU tier and the disk tier, the disk hit again with the load-or-recompute planner on, again
with the split planner (recompute a head of the prefix while the tail is read from disk), and a
half-prefix hit. Also decode tokens/s with the CPU and disk tiers attached vs a GPU-only pool.
The recompute baseline is the faster of two recomputes; the planner's disk bandwidth is the rate
the disk-hit case just measured (its calibration), its CPU bandwidth a calibration load.
Before the cases, ``disk_probe`` measures the disk apart from them (1 GiB written and read back
with O_DIRECT in 32 MiB requests, one at a time); the JSON records it, and kvtier.sim's
calibration prefers it to the host's bench_disk figures.
Every case's ratio is recompute TTFT / case TTFT (above 1: faster than recomputing).
By default the engine prefills the uncached part of a prompt in one step (``--prefill-step 0``),
the fastest recompute and so the hardest baseline; ``--prefill-step 256`` runs the chunk-aligned
steps whose hits are bit-exact (the workload name then lacks ``_one_step_prefill``).

    python bench/bench_e2e.py [--lengths 4096,16384,32768] [--tiny] [--codec fp8] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import torch
from bench_report import machine, publish
from kvtier.codecs import make_codec
from kvtier.demo import _push_out_of_cpu, _push_out_of_gpu
from kvtier.examples.paged_llama import SPLIT_MIN_QUERIES, Engine, Llama, LlamaConfig
from kvtier.planner import CostModelPlanner, ModelCost, SplitCostModelPlanner
from kvtier.pool import PagedKVPool

LLAMA3_8B = dict(vocab=32000, hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336)
TINY = dict(vocab=1024, hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256)
PAGE, CHUNK = 16, 256
DECODE_STEPS = 96  # decode steps per pool, the pools' steps interleaved one by one


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def ttft(engine, prompt, device) -> float:
    sync(device)
    (g,) = engine.generate([prompt], 1)
    return g.ttft_s, g


def timed_hit(engine, prompt, device) -> tuple[float, object, dict]:
    """A request served as Engine.generate serves it (one token; the same TTFT), with its time
    line: ``started`` (engine.start returned: lookup done, loads queued), ``queued`` (the host
    has queued the whole prefill and checks the loads), ``landed`` (the loads have landed) and
    ``first_token``, in seconds from the start. Returns (TTFT, the sequence, the time line)."""
    sync(device)
    t0 = time.perf_counter()
    seq = engine.start(prompt)
    marks = {"started": time.perf_counter() - t0}
    wait = seq.wait

    def timed_wait(*a, **kw):
        marks["queued"] = time.perf_counter() - t0
        r = wait(*a, **kw)
        marks["landed"] = time.perf_counter() - t0
        return r

    seq.wait = timed_wait
    try:
        int(engine.prefill(seq, prompt).argmax())  # int() waits for the GPU
        marks["first_token"] = time.perf_counter() - t0
        engine.pool.commit(seq, prompt)
    finally:
        engine.pool.release(seq)
    return marks["first_token"], seq, {k: round(v, 4) for k, v in marks.items()}


def decode_steps(model, pools: dict, prompt, device: str, prefill_step) -> tuple[dict, bool]:
    """Serve ``prompt`` once in each pool (a GPU hit where it is cached), then DECODE_STEPS greedy
    decode steps in each, interleaved: step s of every pool runs before step s + 1 of any, the
    pools in a rotating order, each step timed alone between synchronisations. Slow drift of the
    host then shifts every pool alike and cancels in the per-step ratios. Returns the step
    times per pool and whether every pool decoded the same tokens."""
    engines = {k: Engine(model, p, prefill_tokens=prefill_step) for k, p in pools.items()}
    live, times, tokens = {}, {k: [] for k in pools}, {k: [] for k in pools}
    try:
        for k, e in engines.items():
            seq = e.start(prompt)
            live[k] = seq
            tokens[k].append(int(e.prefill(seq, prompt).argmax()))
            e.pool.commit(seq, prompt)
        names = list(pools)
        for step in range(DECODE_STEPS):
            for k in names[step % len(names) :] + names[: step % len(names)]:
                sync(device)
                t0 = time.perf_counter()
                tok = int(engines[k].decode([live[k]], [tokens[k][-1]])[0].argmax())  # int() waits
                times[k].append(time.perf_counter() - t0)
                tokens[k].append(tok)
    finally:
        for k, seq in live.items():
            engines[k].pool.release(seq)
    first = next(iter(tokens.values()))
    return times, all(t == first for t in tokens.values())


HIT_REPS = 5  # requests per GPU-hit and CPU-hit case
# The disk tier's size as (k, extra): k * pool_tokens // CHUNK + extra chunks' slots, + 1 MiB
DISK_TIER_CHUNKS = (4, 8)


def run_length(
    model,
    n: int,
    device: str,
    disk_dir: str,
    gen,
    disk_gbps: float,
    prefill_step: int | None = None,
    kv_layout: str = "vllm",
    method: str = "auto",
    max_writebacks: int = 64,
    codec: str = "none",
) -> list[dict]:
    elem = torch.tensor([], dtype=model.dtype).element_size()
    kv_per_token = 2 * model.config.layers * model.config.kv_heads * model.config.head_dim * elem
    pool_tokens = 2 * (n + CHUNK)
    block = CHUNK * kv_per_token
    # The lower tiers' codec: fp8 encodes on the GPU (codec.device gpu), so only the encoded
    # bytes cross PCIe and sit in the CPU and disk tiers; byte budgets stay, chunks per byte grow.
    tiers_codec = {}
    cpu_block = block  # bytes of one CPU-tier block: the stored chunk, 4 KiB aligned
    if codec != "none":
        tiers_codec = dict(codec_name=codec, codec_device="gpu" if device == "cuda" else "host")
        # The CPU tier holds as many chunks as the raw run's, so that the fillers push the
        # prompt out of it to disk as they do there.
        head_dim = model.config.head_dim
        stored = make_codec(codec, scale_dtype="bfloat16").encoded_nbytes(
            (block // (head_dim * elem), head_dim), model.dtype
        )
        cpu_block = -(-stored // 4096) * 4096
    pool = PagedKVPool(
        **model.kv_geometry(),
        kv_layout=kv_layout,
        num_pages=pool_tokens // PAGE,
        page_tokens=PAGE,
        chunk_tokens=CHUNK,
        cpu_bytes=(pool_tokens // CHUNK + 4) * cpu_block,
        disk_dir=disk_dir,
        # Room for every chunk the run writes back (the prompt and three pool-sized
        # fillers), so the prompt is never overwritten on disk before its cases.
        disk_bytes=(DISK_TIER_CHUNKS[0] * pool_tokens // CHUNK + DISK_TIER_CHUNKS[1]) * (block + 4096) + (1 << 20),
        disk_admit_min_seen=1,
        model_id=f"e2e-{n}",
        method=method,
        disk_max_writebacks_in_flight=max_writebacks,
        **tiers_codec,
    )
    engine = Engine(model, pool, prefill_tokens=prefill_step)
    vocab = model.config.vocab
    prompt = torch.randint(0, vocab, (n,), generator=gen).tolist()
    warm = torch.randint(0, vocab, (n,), generator=gen).tolist()
    engine.generate([warm], 1)  # first calls of each kernel at this length
    # and of a length off the 1024-token buckets, whose attention runs padded to one
    # (paged_llama.PLAN_BUCKET): that variant's first call builds its cuDNN plans
    # (scripts/diag_step.py times it), and a split plan's head is such a length. Served by a scratch
    # GPU-only pool: cuDNN's plans
    # are the process's, and this run's pool keeps the state the simulator replays.
    scratch = PagedKVPool(
        **model.kv_geometry(),
        kv_layout=kv_layout,
        num_pages=n // PAGE,
        page_tokens=PAGE,
        chunk_tokens=CHUNK,
        cpu_bytes=0,
    )
    Engine(model, scratch, prefill_tokens=prefill_step).generate(
        [torch.randint(0, vocab, (n - 2 * CHUNK,), generator=gen).tolist()], 1
    )
    scratch.close()
    out = {}
    out["recompute"], g_ref = ttft(engine, prompt, device)
    # A second recompute of a fresh prompt: the baseline is the faster of the two (conservative).
    again, _ = ttft(engine, torch.randint(0, vocab, (n,), generator=gen).tolist(), device)
    out["recompute"] = min(out["recompute"], again)
    # GPU and CPU hits: HIT_REPS requests each (a host hiccup in one request can move a single
    # request's TTFT several-fold); the median, with every request's TTFT and the median
    # request's time line.
    timeline, reps = {}, {}
    for case in ("gpu_hit", "cpu_hit"):
        runs = []
        for _ in range(HIT_REPS):
            if case == "cpu_hit":
                _push_out_of_gpu(pool, gen, vocab)
            t, g, lines = timed_hit(engine, prompt, device)
            if case == "gpu_hit":
                assert g.gpu_hit_tokens >= n - CHUNK, g
            else:
                assert g.lower_hit_tokens >= n - CHUNK, g
            runs.append((t, lines))
        runs.sort(key=lambda r: r[0])
        out[case], timeline[case] = runs[len(runs) // 2]
        reps[case] = [round(t, 4) for t, _ in runs]
    _push_out_of_gpu(pool, gen, vocab)
    _push_out_of_cpu(pool, gen, vocab)
    out["disk_hit"], g = ttft(engine, prompt, device)
    disk_loaded = g.lower_hit_tokens
    if disk_gbps <= 0:  # calibrated: the disk-hit case's own rate (its bytes over its TTFT)
        disk_gbps = round(disk_loaded * kv_per_token / out["disk_hit"] / 1e9, 3)
    # The planner: CPU bandwidth calibrated here, disk bandwidth as above, prefill throughput
    # from the recompute just measured.
    cost = ModelCost(
        params=8.0e9 if model.config.hidden == 4096 else 1e6,
        layers=model.config.layers,
        hidden=model.config.hidden,
        flops_per_s=1.0,
    )
    cost = ModelCost(cost.params, cost.layers, cost.hidden, cost.prefill_seconds(0, n) / out["recompute"])
    planner = CostModelPlanner(cost, bandwidth={"cpu": 50e9, "disk": disk_gbps * 1e9})
    planner.calibrate(pool)
    pool.planner = planner
    _push_out_of_gpu(pool, gen, vocab)
    _push_out_of_cpu(pool, gen, vocab)
    before = pool.stats()["planned_recompute_chunks"]
    out["disk_hit_planned"], g = ttft(engine, prompt, device)
    planned = dict(loaded=g.lower_hit_tokens, recomputed=(pool.stats()["planned_recompute_chunks"] - before) * CHUNK)
    assert planned["loaded"] + planned["recomputed"] >= n - CHUNK, planned  # the prefix was found
    # The split: recompute a head of the prefix while the tail after it is read from disk.
    split = SplitCostModelPlanner(cost, bandwidth=dict(planner.bandwidth))
    pool.planner = split
    _push_out_of_gpu(pool, gen, vocab)
    _push_out_of_cpu(pool, gen, vocab)
    # Where the split's time goes: when the head's compute was queued and the tail's load was
    # asked for (finish_tail called), and when the tail was ready (it returned).
    marks = {}
    finish_tail = pool.finish_tail

    def timed_finish_tail(seq, *a, **kw):
        marks.setdefault("tail_asked", time.perf_counter())
        r = finish_tail(seq, *a, **kw)
        marks.setdefault("tail_ready", time.perf_counter())
        return r

    pool.finish_tail = timed_finish_tail
    t_split = time.perf_counter()
    out["disk_hit_split"], g = ttft(engine, prompt, device)
    del pool.finish_tail
    split_marks = {k: round(v - t_split, 4) for k, v in marks.items()}
    # Recorded, not asserted: with one-step prefill the split's head and the recompute differ in
    # rounding (bf16), and this run's figures are worth keeping either way (tests check exactness).
    split_same_token = g.tokens[0] == g_ref.tokens[0]
    planned["split"] = dict(split.last_plan, loaded=g.lower_hit_tokens)
    pool.planner = None
    # A half-prefix request of another prompt first: the first call of each attention shape
    # after a cached prefix builds cuDNN's plans for it (~0.1 s, bench_attention's first_call_ms),
    # as the warm-up request above did for the recompute's shapes.
    engine.generate([warm], 1)
    ttft(engine, warm[: n // 2] + torch.randint(0, vocab, (n - n // 2,), generator=gen).tolist(), device)
    half = prompt[: n // 2] + torch.randint(0, vocab, (n - n // 2,), generator=gen).tolist()
    _push_out_of_gpu(pool, gen, vocab)
    engine.generate([prompt], 1)  # the prefix back in GPU pages
    out["half_prefix_gpu_hit"], g = ttft(engine, half, device)

    # Decode: DECODE_STEPS steps after the prompt, with the lower tiers attached (the prompt's pages came
    # from the CPU tier earlier) vs a GPU-only pool (the prompt computed into it first). Both
    # decode after a full GPU hit; the pools' steps interleaved (decode_steps).
    # Also a fresh pool with the tiers attached, the prompt computed into it like the GPU-only one:
    # the same state, tiers or not (the comparison); the first pool has this run's history.
    def gpu_only_pool():
        return PagedKVPool(
            **model.kv_geometry(),
            kv_layout=kv_layout,
            num_pages=pool_tokens // PAGE,
            page_tokens=PAGE,
            chunk_tokens=CHUNK,
            cpu_bytes=0,
        )

    gpu_only = gpu_only_pool()
    fresh_dir = os.path.join(disk_dir, "fresh")
    os.makedirs(fresh_dir, exist_ok=True)
    fresh = PagedKVPool(
        **model.kv_geometry(),
        kv_layout=kv_layout,
        num_pages=pool_tokens // PAGE,
        page_tokens=PAGE,
        chunk_tokens=CHUNK,
        cpu_bytes=(pool_tokens // CHUNK + 4) * block,
        disk_dir=fresh_dir,
        disk_bytes=(pool_tokens // CHUNK + 8) * (block + 4096) + (1 << 20),
        model_id=f"e2e-fresh-{n}",
        method=method,
        **tiers_codec,
    )
    gpu_only_b = gpu_only_pool()  # an A/A control: the noise floor
    for p in (gpu_only, gpu_only_b, fresh):
        Engine(model, p, prefill_tokens=prefill_step).generate([prompt], 1)
    pool.cache.drain()  # no write-back or copy of the cases above still running
    step_s, same_tokens = decode_steps(
        model,
        {"with_tiers": pool, "fresh_with_tiers": fresh, "gpu_only": gpu_only, "gpu_only_b": gpu_only_b},
        prompt,
        device,
        prefill_step,
    )
    # Per step, the GPU-only pool's time over the other pool's (tokens/s ratio; above 1: faster).
    paired = {
        k: _spread([b / a for a, b in zip(step_s[k], step_s["gpu_only"])])
        for k in ("fresh_with_tiers", "with_tiers", "gpu_only_b")
    }
    decode = {k: 1.0 / sorted(v)[len(v) // 2] for k, v in step_s.items()}
    gpu_only.close()
    gpu_only_b.close()
    fresh.close()
    pool.close()
    rows = []
    for case in ("gpu_hit", "cpu_hit", "disk_hit", "disk_hit_planned", "disk_hit_split", "half_prefix_gpu_hit"):
        row = {
            "case": f"ttft_{case}_{n}",
            "value": round(out[case], 4),
            "unit": "s",
            "baseline": f"ttft_recompute_{n}",
            "baseline_value": round(out["recompute"], 4),
            "ratio": round(out["recompute"] / out[case], 3),
        }
        if case in timeline:
            row["timeline_s"] = timeline[case]
            row["reps_s"] = reps[case]
            row["note"] = f"median of {HIT_REPS} requests (reps_s, sorted); timeline_s: the median request's"
        if case == "disk_hit":
            row["note"] = f"{disk_loaded} tokens loaded from disk"
        if case == "disk_hit_planned":
            row["note"] = (
                f"planner: {planned['loaded']} tokens loaded, {planned['recomputed']} recomputed "
                f"(disk {disk_gbps} GB/s, cpu calibrated {planner.bandwidth['cpu'] / 1e9:.1f} GB/s)"
            )
        if case == "disk_hit_split":
            sp = planned["split"]
            if "head_chunks" not in sp:  # the planner was never asked: no lower-tier hit to plan
                row["note"] = f"split planner: no plan (no lower-tier hit; {sp['loaded']} tokens loaded)"
                rows.append(row)
                continue
            row["note"] = (
                f"split planner: {sp['head_chunks'] * CHUNK} tokens recomputed while {sp['load_chunks'] * CHUNK} "
                f"were read from disk ({sp['loaded']} landed); modelled {sp['modelled_s']['split']:.3f} s "
                f"vs recompute {sp['modelled_s']['recompute']:.3f} s, load {sp['modelled_s']['load']:.3f} s; "
                f"first token {'equal to' if split_same_token else 'DIFFERENT from'} the recompute's; "
                f"head queued and tail asked for at {split_marks.get('tail_asked')} s, tail ready at "
                f"{split_marks.get('tail_ready')} s"
            )
        rows.append(row)
    rows.append(
        {
            "case": f"decode_tokens_per_s_{n}",
            "value": round(decode["fresh_with_tiers"], 2),
            "unit": "tokens/s",
            "baseline": "decode_gpu_only_pool",
            "baseline_value": round(decode["gpu_only"], 2),
            "ratio": round(decode["fresh_with_tiers"] / decode["gpu_only"], 4),
            "paired_ratio": paired["fresh_with_tiers"],
            "aa_paired_ratio": paired["gpu_only_b"],
            "note": (
                f"{DECODE_STEPS} decode steps after a {n}-token prompt computed into each pool, the "
                f"pools' steps interleaved one by one (each timed alone, synchronised); tokens/s = 1 / "
                f"median step; A/A control (a second GPU-only pool vs the first): "
                f"{decode['gpu_only_b'] / decode['gpu_only']:.4f}; per-step ratios (median [q1, q3]): "
                f"tiers {_fmt(paired['fresh_with_tiers'])}, A/A {_fmt(paired['gpu_only_b'])}; greedy "
                f"tokens {'identical' if same_tokens else 'not identical'} across the pools"
            ),
        }
    )
    rows.append(
        {
            "case": f"decode_after_tier_loads_tokens_per_s_{n}",
            "value": round(decode["with_tiers"], 2),
            "unit": "tokens/s",
            "baseline": "decode_gpu_only_pool",
            "baseline_value": round(decode["gpu_only"], 2),
            "ratio": round(decode["with_tiers"] / decode["gpu_only"], 4),
            "paired_ratio": paired["with_tiers"],
            "note": "the pool of the cases above: the prompt's pages came from the CPU tier, after eviction churn",
        }
    )
    print(json.dumps(rows), flush=True)
    return rows


def plot(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_case: dict[str, dict[int, float]] = {}
    for r in doc["results"]:
        if not r["case"].startswith("ttft_"):
            continue
        name, n = r["case"][5:].rsplit("_", 1)
        by_case.setdefault(name, {})[int(n)] = r["value"]
        by_case.setdefault("recompute", {})[int(n)] = r["baseline_value"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in sorted(by_case.items()):
        xs = sorted(pts)
        ax.plot(xs, [pts[x] * 1e3 for x in xs], marker="o", label=name.replace("_", " "))
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("time to first token (ms)")
    ax.set_yscale("log")
    ax.set_title(f"kvtier TTFT per tier, Llama-3-8B-shaped, {doc['machine']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _spread(xs: list[float]) -> dict:
    """Median and quartiles of ``xs`` (ratios of one repetition's two decodes)."""
    q = sorted(xs)
    at = lambda f: q[min(len(q) - 1, round(f * (len(q) - 1)))]  # noqa: E731
    return {"median": round(at(0.5), 4), "q1": round(at(0.25), 4), "q3": round(at(0.75), 4), "n": len(q)}


def _fmt(d: dict) -> str:
    return f"{d['median']:.4f} [{d['q1']:.4f}, {d['q3']:.4f}]"


def disk_probe(directory: str, nbytes: int = 1 << 30, block: int = 32 << 20) -> dict:
    """The disk's own rates, apart from every case: ``nbytes`` written then read back with
    O_DIRECT in ``block``-byte requests, one at a time (the disk tier's slot size; what a
    simulated disk is calibrated with). Page cache is bypassed both ways."""
    import mmap

    path = os.path.join(directory, "disk_probe.bin")
    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT wants
    buf.write(os.urandom(1 << 20) * (block >> 20))
    n = nbytes // block
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC | os.O_DIRECT, 0o600)
    try:
        t0 = time.perf_counter()
        for i in range(n):
            os.pwrite(fd, buf, i * block)
        os.fsync(fd)
        write_s = time.perf_counter() - t0
    finally:
        os.close(fd)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        t0 = time.perf_counter()
        for i in range(n):
            if os.preadv(fd, [buf], i * block) != block:
                raise OSError(f"short read from {path}")
        read_s = time.perf_counter() - t0
    finally:
        os.close(fd)
        os.unlink(path)
    return {
        "read_gbps": round(n * block / read_s / 1e9, 3),
        "write_gbps": round(n * block / write_s / 1e9, 3),
        "bytes": n * block,
        "block_bytes": block,
        "queue_depth": 1,
        "dir": directory,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="4096,16384,32768")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (smoke test on a CPU)")
    ap.add_argument(
        "--disk-gbps",
        type=float,
        default=0.0,
        help="disk read bandwidth for the planner; 0: the disk-hit case's measured rate",
    )
    ap.add_argument(
        "--prefill-step",
        type=int,
        default=0,
        help="prefill in steps of this many tokens (a divisor of the chunk, 256); 0: the "
        "uncached part of the prompt in one step, the fastest recompute (the baseline)",
    )
    ap.add_argument(
        "--kv-layout",
        default="vllm",
        choices=("vllm", "cross_layer"),
        help="the pool's KV layout: vllm (a tensor per layer: loads land layer by layer, "
        "so layer 0 computes while later layers copy) or cross_layer (a page holds "
        "every layer: one large copy per page, all layers land together)",
    )
    ap.add_argument(
        "--method",
        default="auto",
        choices=("auto", "direct", "staged", "zero_copy"),
        help="how the CPU tier's copies run (CacheConfig.method); zero_copy leaves the "
        "copy engines free for the compute stream's own small uploads",
    )
    ap.add_argument(
        "--max-writebacks",
        type=int,
        default=64,
        help="the disk tier's write-back bound (CacheConfig.disk_max_writebacks_in_flight)",
    )
    ap.add_argument(
        "--suffix",
        default="",
        help="appended to the workload name: a variant of the same options (e.g. an A/A control); a rerun "
        "replaces the earlier file in bench/results (bench/results/README.md), git keeps the old one",
    )
    ap.add_argument(
        "--codec",
        default="none",
        choices=("none", "fp8"),
        help="the codec of the chunks in the CPU and disk tiers (codec.name; fp8 encodes on the GPU)",
    )
    ap.add_argument("--out", default="")
    ap.add_argument("--plot-from", default="", help="only draw the PNG from this JSON")
    args = ap.parse_args()
    if args.plot_from:
        with open(args.plot_from) as f:
            doc = json.load(f)
        plot(doc, args.plot_from.replace(".json", ".png"))
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = Llama(
        LlamaConfig(**(TINY if args.tiny else LLAMA3_8B)), seed=0, dtype=dtype, device=device, init_on_device=True
    )
    gen = torch.Generator().manual_seed(1)
    results = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("KVTIER_BENCH_DISK_DIR", "/tmp")) as d:
        probe = disk_probe(
            d, nbytes=(64 << 20) if args.tiny else (1 << 30), block=(4 << 20) if args.tiny else (32 << 20)
        )
        print(f"disk probe: {probe}", flush=True)
        for n in (int(x) for x in args.lengths.split(",")):
            sub = os.path.join(d, str(n))
            os.makedirs(sub)
            results += run_length(
                model,
                n,
                device,
                sub,
                gen,
                args.disk_gbps,
                args.prefill_step or None,
                args.kv_layout,
                args.method,
                args.max_writebacks,
                args.codec,
            )
            shutil.rmtree(sub)  # its disk-tier files: the next length needs the space
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    workload = "tiny" if args.tiny else "llama3_8b_ttft"
    if not args.prefill_step:
        workload += "_one_step_prefill"
    if args.kv_layout == "vllm":
        workload += "_vllm_layout"
    if args.method != "auto":
        workload += f"_{args.method}"
    if args.max_writebacks != 64:
        workload += f"_writebacks{args.max_writebacks}"
    if args.codec != "none":
        workload += f"_{args.codec}"
    if args.suffix:
        workload += f"_{args.suffix}"
    publish(
        "bench_e2e",
        workload,
        "cpu" if gpu is None else gpu.split()[1].lower(),
        results,
        args.out,
        machine_name=machine(gpu),
        disk_probe=probe,
        kv_layout=args.kv_layout,
        method=args.method,
        disk_max_writebacks_in_flight=args.max_writebacks,
        codec=args.codec,
        # The engine's small uploads do not wait behind a load (kvtier.upload): layer l
        # computes once its pages land, so a lower-tier hit costs about its load plus the
        # last layer, not load + forward.
        load_compute_overlap=True,
        # A step of at least this many tokens after a cached prefix runs its attention as
        # two cuDNN calls (paged_llama._attend_split; bench_attention measures both paths).
        attention_split_min_queries=SPLIT_MIN_QUERIES,
        # The warm-up also serves a prompt of n - 512 tokens, off the buckets, in a scratch
        # pool (true: in this run's pool)
        warm_off_bucket="scratch_pool",
        # The steps kvtier.sim.validate replays: the disk tier's size (DISK_TIER_CHUNKS) and
        # the second recompute of a fresh prompt.
        disk_tier_chunks=list(DISK_TIER_CHUNKS),
        second_recompute=True,
        # torch's experimental opt-in for cuDNN attention without a plan per sequence length
        torch_cudnn_sdpa_avoid_recompile=os.environ.get("TORCH_CUDNN_SDPA_AVOID_RECOMPILE", "0") == "1",
        prefill=(
            f"{args.prefill_step}-token steps"
            if args.prefill_step
            else "the uncached part of each prompt in one step (as transformers' SDPA path)"
        ),
    )


if __name__ == "__main__":
    main()
