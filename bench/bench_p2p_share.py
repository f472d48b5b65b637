"""bench_p2p_share: a peer's pool pages copied through same-host sharing, beside the bare copy of
the same pages measured in the same run.

Workload ``llama3_8b_4096tok``: 4096 tokens of Llama-3-8B-shaped KV (32 layers, 8 KV heads, head
dim 128, bf16, 16-token pages, 256-token chunks: 16 chunks of 32 MiB, 512 MiB) in process A's
``PagedKVPool`` and nowhere else (no write-through, nothing evicted). Process B (this one) has a
pool of its own and A as a peer; both share their pools (``share_pool``):

- ``share_begin``: ``B.begin(prompt)`` then ``seq.wait()``: the local miss, the digest and the
  confirm round trip, GPU_PIN, the page copy into B's pages (GPU_UNPIN follows in the
  background): what a request pays;
- baseline ``bare_copy``: the same pages copied by the same mechanism call between the same two
  mappings in B, with no protocol (the physical cost of the bytes on this machine).

``--mechanism shm`` (default): CPU pools in /dev/shm files, run anywhere. ``--mechanism cuda``:
pools on the GPU, CUDA IPC (A on GPU 0, B on the last GPU). Repetitions alternate the two cases,
each on a prompt A computed just before; the median is reported. B's pages are checked against
A's (SHA-256 of all 512 MiB) after every repetition.

    python bench/bench_p2p_share.py [--mechanism shm|cuda] [--reps 5] [--out bench/results/]
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import statistics
import sys
import time

from bench_report import machine, publish

LAYERS, KV_HEADS, HEAD_DIM, PAGE_TOKENS, CHUNK_TOKENS, TOKENS = 32, 8, 128, 16, 256, 4096
PAGES = TOKENS // PAGE_TOKENS  # 256 pages of 2 MiB
SECRET = b"bench-p2p-share-secret-0123456789"
PEERS = {"secret": SECRET, "request_timeout_s": 30.0, "gossip_interval_s": 0.1}


def make_pool(mechanism: str, device: str, **peers):
    import torch
    from kvtier.pool import PagedKVPool

    return PagedKVPool(
        num_layers=LAYERS,
        kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        num_pages=PAGES + 16,
        page_tokens=PAGE_TOKENS,
        chunk_tokens=CHUNK_TOKENS,
        dtype=torch.bfloat16,
        device=device,
        cpu_bytes=2 * 32 << 20,
        method="auto" if device.startswith("cuda") else "cpu",
        peers={**PEERS, "share_pool": mechanism, **peers},
    )


def prompt(rep: int) -> list[int]:
    return [(rep * 7919 + i) % 50000 for i in range(TOKENS)]


def digest(pool, pages) -> str:
    import torch

    return hashlib.sha256(pool.kv[pages].view(-1).view(torch.uint8).cpu().numpy().tobytes()).hexdigest()


def exporter(mechanism: str, device: str, q, cmds) -> None:
    """Process A: computes each prompt it is sent into its pool (its previous one is evicted
    first, outside any timing) and answers with the pages' digest."""
    import torch

    pool = make_pool(mechanism, device, node_id="A")
    q.put(pool.cache.stats()["peers"]["address"])
    while True:
        rep = cmds.get(timeout=600)
        if rep is None:
            break
        with pool._lock:
            pool._evict(pool.num_pages)  # room for the new prompt (offloads what fits, untimed)
        seq = pool.begin(prompt(rep))
        g = torch.Generator(device=pool.kv.device).manual_seed(rep)
        pool.kv[seq.page_table] = torch.randn(pool.kv[seq.page_table].shape, generator=g, device=pool.kv.device).to(
            torch.bfloat16
        )
        pool.commit(seq, prompt(rep))
        pages = list(seq.page_table)
        pool.release(seq)
        if pool.kv.is_cuda:
            torch.cuda.synchronize()
        q.put((rep, pages, digest(pool, pages)))
    pool.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mechanism", default="shm", choices=["shm", "cuda"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None, help="directory to write the JSON into")
    args = ap.parse_args()
    import torch

    gpu_name = None
    if args.mechanism == "cuda":
        a_dev, b_dev = "cuda:0", f"cuda:{torch.cuda.device_count() - 1}"
        gpu_name = torch.cuda.get_device_name(0)
    else:
        a_dev = b_dev = "cpu"
    ctx = mp.get_context("spawn")
    q, cmds = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=exporter, args=(args.mechanism, a_dev, q, cmds))
    proc.start()
    b = None
    try:
        address = q.get(timeout=300)
        b = make_pool(args.mechanism, b_dev, node_id="B", seeds=(address,))
        svc = b.cache.peers
        times = {"share": [], "bare": []}
        for rep in range(args.reps + 1):  # the first one warms both paths up (mapping, page faults)
            cmds.put(rep)
            _, a_pages, a_digest = q.get(timeout=600)
            toks = prompt(rep)
            end = time.monotonic() + 30
            while b.cache.lookup(toks) < TOKENS:  # A's digest delta reached B
                if time.monotonic() > end:
                    raise RuntimeError("B never saw A's prompt in its digest")
                time.sleep(0.05)
            with b._lock:
                b._evict(b.num_pages)  # B's previous copy goes (untimed)
            if b.kv.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            seq = b.begin(toks)
            seq.wait()
            t_share = time.perf_counter() - t0
            assert seq.lower_hit_tokens == TOKENS, seq
            got = digest(b, seq.page_table)
            assert got == a_digest, "B's pages differ from A's"
            # The bare copy: the same pages, the same mechanism call, mappings already open.
            copier, _n = svc._gpu_maps["A"][1]
            t0 = time.perf_counter()
            done = copier.copy(a_pages, seq.page_table, 0)
            assert done.wait(60)
            if b.kv.is_cuda:
                torch.cuda.synchronize()
            t_bare = time.perf_counter() - t0
            b.release(seq)
            if rep:
                times["share"].append(t_share)
                times["bare"].append(t_bare)
        nbytes = PAGES * b.kv[0].numel() * 2
        gbps = {k: nbytes / statistics.median(v) / 1e9 for k, v in times.items()}
        st = svc.stats()
        results = [
            {
                "case": f"share_begin_{args.mechanism}",
                "value": round(gbps["share"], 3),
                "unit": "GB/s",
                "baseline": f"bare_copy_{args.mechanism}",
                "baseline_value": round(gbps["bare"], 3),
                "ratio": round(gbps["share"] / gbps["bare"], 3),
                "note": (
                    f"B.begin + wait of 4096 tokens held only in A's pool: lookup, confirm, GPU_PIN, page copy "
                    f"(GPU_UNPIN in the background); median of {args.reps}; {st['gpu_chunks_copied']} chunks copied, "
                    f"{st.get('chunks_pulled', 0)} pulled over TCP; bit-exact (SHA-256) every repetition; "
                    f"median {statistics.median(times['share']) * 1e3:.1f} ms vs "
                    f"{statistics.median(times['bare']) * 1e3:.1f} ms"
                ),
            }
        ]
        samples = {k: [round(nbytes / t / 1e9, 3) for t in v] for k, v in times.items()}
        publish(
            "bench_p2p_share",
            "llama3_8b_4096tok",
            "cpu" if args.mechanism == "shm" else "gpu",
            results,
            args.out,
            machine_name=machine(gpu_name) if gpu_name else None,
            indent=1,
            samples_gbps=samples,
        )
        return 0
    finally:
        cmds.put(None)
        if b is not None:
            b.close()
        proc.join(60)
        if proc.is_alive():
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
