"""bench_engine_overhead: what kvtier's tiers cost a request they do not serve, in kvtier's own engine.

Every prompt is new (a miss): the engine computes it, then commits its chunks, which the pool
stores into the CPU tier (and, as the CPU tier fills, writes back to disk), while the next
request computes. The same requests run against a GPU-only pool (no tiers: nothing stored), the
baseline, measured in the same run. Requests run in blocks of ``--per-block`` back to back (so
each tiered request computes while the stores of the one before it copy), the two pools' blocks
alternating, ``--blocks`` blocks each; a second GPU-only pool is an A/A control (the noise
floor). The tiered pool is kept full: its CPU tier holds two prompts and its disk tier four, so
stores evict and write back from the second request on.

Cases, per prompt length: ``miss_ttft_<n>`` (median TTFT, tiers vs GPU-only; ratio = GPU-only /
tiers, 1 means free) and the A/A control. Decode beside the tiers is bench_e2e's
``decode_tokens_per_s_<n>``.

    python bench/bench_engine_overhead.py [--lengths 4096,16384] [--tiny] [--out bench/results]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import torch
from bench_e2e import CHUNK, LLAMA3_8B, PAGE, TINY, sync
from bench_report import machine, publish
from kvtier.examples.paged_llama import Engine, Llama, LlamaConfig
from kvtier.pool import PagedKVPool


def ttft(engine: Engine, prompt: list[int], device: str) -> float:
    sync(device)
    (g,) = engine.generate([prompt], 1)
    assert g.cached_tokens == 0, "a miss was served from the cache"  # every prompt is new
    return g.ttft_s


def run_length(model, n: int, device: str, disk_dir: str, gen, blocks: int, per_block: int) -> list[dict]:
    elem = torch.tensor([], dtype=model.dtype).element_size()
    kv_per_token = 2 * model.config.layers * model.config.kv_heads * model.config.head_dim * elem
    chunk_bytes = CHUNK * kv_per_token
    prompt_chunks = n // CHUNK
    pages = 2 * (n + CHUNK) // PAGE  # room for a prompt and the next; older ones are evicted

    def pool(**tiers) -> PagedKVPool:
        return PagedKVPool(
            **model.kv_geometry(),
            kv_layout="vllm",
            num_pages=pages,
            page_tokens=PAGE,
            chunk_tokens=CHUNK,
            model_id=f"overhead-{n}",
            **tiers,
        )

    pools = {
        "tiers": pool(
            cpu_bytes=2 * prompt_chunks * chunk_bytes,
            disk_dir=disk_dir,
            disk_bytes=4 * prompt_chunks * (chunk_bytes + 4096) + (1 << 20),
            disk_admit_min_seen=1,
        ),
        "gpu_only": pool(cpu_bytes=0),
        "gpu_only_b": pool(cpu_bytes=0),
    }
    engines = {k: Engine(model, p) for k, p in pools.items()}
    vocab = model.config.vocab
    for e in engines.values():  # first calls of each kernel at this length
        ttft(e, torch.randint(0, vocab, (n,), generator=gen).tolist(), device)
    times: dict[str, list[float]] = {k: [] for k in engines}
    names = list(engines)
    for b in range(blocks):
        for k in names[b % len(names) :] + names[: b % len(names)]:  # rotating order
            for _ in range(per_block):
                times[k].append(ttft(engines[k], torch.randint(0, vocab, (n,), generator=gen).tolist(), device))
            if k == "tiers":
                pools[k].cache.drain()  # the next block starts quiet
    stats = pools["tiers"].cache.stats()
    for p in pools.values():
        p.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{n} tokens: median TTFT tiers {med['tiers']:.4f} s, GPU-only {med['gpu_only']:.4f} s, "
        f"A/A {med['gpu_only_b']:.4f} s",
        flush=True,
    )
    requests = blocks * per_block
    note = (
        f"{requests} new {n}-token prompts per pool in {blocks} blocks of {per_block}, blocks "
        f"alternating; tiered pool: CPU tier of 2 prompts, disk tier of 4, so stores evict and "
        f"write back; the tiered pool stored {stats['chunks_stored']} chunks, evicted "
        f"{stats['index']['evictions']} from the CPU tier and wrote {stats.get('disk', {}).get('writes', 0)} "
        "to disk"
    )
    return [
        {
            "case": f"miss_ttft_{n}",
            "value": round(med["tiers"], 5),
            "unit": "s",
            "baseline": "miss_ttft_gpu_only_pool",
            "baseline_value": round(med["gpu_only"], 5),
            "ratio": round(med["gpu_only"] / med["tiers"], 4),
            "trials": {k: [round(t, 5) for t in v] for k, v in times.items()},
            "note": note,
        },
        {
            "case": f"miss_ttft_{n}_aa_control",
            "value": round(med["gpu_only_b"], 5),
            "unit": "s",
            "baseline": "miss_ttft_gpu_only_pool",
            "baseline_value": round(med["gpu_only"], 5),
            "ratio": round(med["gpu_only"] / med["gpu_only_b"], 4),
            "note": "a second GPU-only pool against the first: the noise floor of the ratio above",
        },
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="4096,16384")
    ap.add_argument("--blocks", type=int, default=4, help="blocks of requests per pool")
    ap.add_argument("--per-block", type=int, default=4, help="requests per block, back to back")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (smoke test on a CPU)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.blocks < 1 or args.per_block < 2:
        ap.error("--blocks must be >= 1 and --per-block >= 2 (a request must follow another's stores)")
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
            results += run_length(model, n, device, sub, gen, args.blocks, args.per_block)
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
