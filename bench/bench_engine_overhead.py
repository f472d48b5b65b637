"""bench_engine_overhead: what kvtier's tiers cost a request they do not serve, in kvtier's own engine.

Every prompt is new (a miss): the engine computes it, then commits its chunks. A tiered pool
stores them into its CPU tier (when their pages are needed again, or right after the commit with
the pool's ``write_through``), and its CPU tier, kept full, evicts to its disk tier. The same
requests run against a GPU-only pool (no tiers: nothing stored), the baseline, measured in the
same run, and a second GPU-only pool, an A/A control (the noise floor). Each round, every pool in
turn (order rotating) serves two new prompts back to back and the second is measured: it
computes beside the stores the first started. The pool is drained before the next pool's turn,
so no pool's background work lands on another's requests, and a round's pairs share the GPU's
drift in speed (which over seconds moves TTFT by more than the effect measured). Each tiered pool (VARIANTS)
holds two prompts in its CPU tier and four on disk, so stores evict and write back from the
second request on.

Cases, per prompt length n and tiered pool v: ``miss_ttft_<n>_<v>`` (median TTFT against the
GPU-only pool; ratio = GPU-only / tiered, 1 means free; ``paired_ratio``: the median over rounds
of the same ratio within a round), ``miss_request_<n>_<v>`` (a request's
whole time, its commit included) and the A/A control. Decode beside the tiers is bench_e2e's
``decode_tokens_per_s_<n>``.

    python bench/bench_engine_overhead.py [--lengths 4096,16384] [--rounds 16] [--variants cpu,...]
        [--tiny] [--out bench/results]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch
from bench_e2e import CHUNK, LLAMA3_8B, PAGE, TINY, sync
from bench_report import machine, publish
from kvtier.examples.paged_llama import Engine, Llama, LlamaConfig
from kvtier.pool import PagedKVPool


def ttft(engine: Engine, prompt: list[int], device: str) -> tuple[float, float]:
    """(TTFT, the request's whole time: TTFT plus its commit, which may start stores)."""
    sync(device)
    t0 = time.perf_counter()
    (g,) = engine.generate([prompt], 1)
    sync(device)
    wall = time.perf_counter() - t0
    assert g.cached_tokens == 0, "a miss was served from the cache"  # every prompt is new
    return g.ttft_s, wall


# The tiered pools, by name: keyword arguments of PagedKVPool beside the tiers' sizes. Each keeps
# its tiers full, so every store evicts (and, with a disk, writes back) from the second request on.
VARIANTS = {
    "cpu": dict(disk=False),  # a CPU tier alone: the device-to-host copies and the tier's evictions
    # and a disk tier below it, chunks written back when the CPU tier evicts them
    # (disk.write_through off): a store into the full CPU tier waits for those writes
    "cpu_disk_writeback": dict(disk=True, disk_write_through=False),
    # the default, disk.write_through: chunks reach the disk as they arrive, so the CPU tier's
    # evictions free their blocks at once
    "cpu_disk": dict(disk=True),
    # and the pool's write_through: a request's chunks are copied to the CPU tier right after its
    # commit, beside the next request's compute, not when their pages are needed again
    "cpu_disk_pool_wt": dict(disk=True, write_through=True),
}


def paired(base: list[float], other: list[float]) -> float:
    """The median over rounds of base / other, each round's pair taken together."""
    return statistics.median(b / o for b, o in zip(base, other))


def versus(case: str, baseline: str, samples: dict, pool: str, note: str, trials: bool = False) -> dict:
    """One case: ``pool``'s median of ``samples`` against the GPU-only pool's, with both ratios
    (of the medians; the median of the paired rounds) and, with ``trials``, every sample."""
    value, base = statistics.median(samples[pool]), statistics.median(samples["gpu_only"])
    doc = {
        "case": case,
        "value": round(value, 5),
        "unit": "s",
        "baseline": baseline,
        "baseline_value": round(base, 5),
        "ratio": round(base / value, 4),
        "paired_ratio": round(paired(samples["gpu_only"], samples[pool]), 4),
    }
    if trials:
        doc["trials"] = {k: [round(t, 5) for t in samples[k]] for k in ("gpu_only", pool)}
    doc["note"] = note
    return doc


def run_length(model, n: int, device: str, disk_dir: str, gen, rounds: int, variants) -> list[dict]:
    elem = torch.tensor([], dtype=model.dtype).element_size()
    kv_per_token = 2 * model.config.layers * model.config.kv_heads * model.config.head_dim * elem
    chunk_bytes = CHUNK * kv_per_token
    prompt_chunks = n // CHUNK
    pages = 2 * (n + CHUNK) // PAGE  # room for a prompt and the next; older ones are evicted

    def pool(name: str, **tiers) -> PagedKVPool:
        return PagedKVPool(
            **model.kv_geometry(),
            kv_layout="vllm",
            num_pages=pages,
            page_tokens=PAGE,
            chunk_tokens=CHUNK,
            model_id=f"overhead-{n}-{name}",
            **tiers,
        )

    def tiered(name: str, disk: bool, **kw) -> PagedKVPool:
        tiers = dict(cpu_bytes=2 * prompt_chunks * chunk_bytes)
        if disk:
            sub = os.path.join(disk_dir, name)
            os.makedirs(sub)
            tiers.update(
                disk_dir=sub, disk_bytes=4 * prompt_chunks * (chunk_bytes + 4096) + (1 << 20), disk_admit_min_seen=1
            )
        return pool(name, **tiers, **kw)

    pools = {"gpu_only": pool("gpu_only", cpu_bytes=0), "gpu_only_b": pool("gpu_only_b", cpu_bytes=0)}
    for v in variants:
        pools[v] = tiered(v, **VARIANTS[v])
    engines = {k: Engine(model, p) for k, p in pools.items()}
    vocab = model.config.vocab
    for e in engines.values():  # first calls of each kernel at this length
        ttft(e, torch.randint(0, vocab, (n,), generator=gen).tolist(), device)
    times: dict[str, list[float]] = {k: [] for k in engines}
    walls: dict[str, list[float]] = {k: [] for k in engines}
    names = list(engines)
    for r in range(rounds):
        # Each round, every pool in turn (order rotating) serves two new prompts back to back:
        # the second computes beside the stores the first started, as in an engine's stream of
        # requests, and is the one measured. The pool is drained before the next pool's turn, so
        # its background work (copies, disk writes) lands on its own requests, not a neighbor's.
        # The GPU's speed drifts over seconds; a round's pairs share its drift.
        first, second = (torch.randint(0, vocab, (n,), generator=gen).tolist() for _ in range(2))
        for k in names[r % len(names) :] + names[: r % len(names)]:
            ttft(engines[k], first, device)
            t, w = ttft(engines[k], second, device)
            times[k].append(t)
            walls[k].append(w)
            if pools[k].cache is not None:
                pools[k].cache.drain()
    stats = {v: pools[v].cache.stats() for v in variants}
    for p in pools.values():
        p.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    med_wall = {k: statistics.median(v) for k, v in walls.items()}
    print(
        f"{n} tokens: median TTFT "
        + ", ".join(
            f"{k} {med[k]:.4f} s (paired {paired(times['gpu_only'], times[k]):.3f}, request {med_wall[k]:.4f} s)"
            for k in names
        ),
        flush=True,
    )
    out = []
    for v in variants:
        st = stats[v]
        note = (
            f"{rounds} rounds in which every pool in rotating order serves two new {n}-token prompts "
            f"back to back, the second measured (beside the first's stores), the pool drained before "
            f"the next pool's turn; paired_ratio: the median over rounds of GPU-only / tiered in the "
            f"same round; pool {v} ({VARIANTS[v]}): CPU tier of 2 prompts"
            + (", disk tier of 4" if VARIANTS[v]["disk"] else "")
            + f"; it stored {st['chunks_stored']} chunks, evicted {st['index']['evictions']} from the CPU "
            f"tier and wrote {st.get('disk', {}).get('writes', 0)} to disk"
        )
        out.append(versus(f"miss_ttft_{n}_{v}", "miss_ttft_gpu_only_pool", times, v, note, trials=True))
        out.append(
            versus(
                f"miss_request_{n}_{v}",
                "miss_request_gpu_only_pool",
                walls,
                v,
                "a request's whole time, TTFT and its commit (the stores it starts)",
            )
        )
    out.append(
        versus(
            f"miss_ttft_{n}_aa_control",
            "miss_ttft_gpu_only_pool",
            times,
            "gpu_only_b",
            "a second GPU-only pool against the first: the noise floor of the ratios above",
        )
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="4096,16384")
    ap.add_argument("--rounds", type=int, default=12, help="rounds of two new prompts on every pool")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (smoke test on a CPU)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"tiered pools to run: {', '.join(VARIANTS)}")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.rounds < 2:
        ap.error("--rounds must be >= 2 (the tiers fill over the first)")
    variants = [v for v in args.variants.split(",") if v]
    if not variants or any(v not in VARIANTS for v in variants):
        ap.error(f"--variants takes names among {', '.join(VARIANTS)}, got {args.variants!r}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = Llama(
        LlamaConfig(**(TINY if args.tiny else LLAMA3_8B)), seed=0, dtype=dtype, device=device, init_on_device=True
    )
    gen = torch.Generator().manual_seed(1)
    results = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("KVTIER_BENCH_DISK_DIR", "/tmp")) as d:
        for n in (int(x) for x in args.lengths.split(",")):
            sub = os.path.join(d, str(n))
            os.makedirs(sub)
            results += run_length(model, n, device, sub, gen, args.rounds, variants)
            shutil.rmtree(sub)  # the disk tiers of this length: room for the next
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    publish(
        "bench_engine_overhead",
        "tiny_miss_ttft" if args.tiny else "llama3_8b_miss_ttft",
        "cpu" if gpu is None else gpu.split()[1].lower(),
        results,
        args.out,
        machine_name=machine(gpu),
        kv_layout="vllm",
    )


if __name__ == "__main__":
    main()
