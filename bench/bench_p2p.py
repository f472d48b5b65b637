"""bench_p2p: pull throughput between two peer processes, beside a raw socket stream of the same
bytes measured in the same run.

Workload ``llama3_8b_4096tok``: 4096 tokens of Llama-3-8B-shaped KV (32 layers, 8 KV heads, head
dim 128, bf16, 16-token pages, 256-token chunks: 16 chunks of 32 MiB, 512 MiB). Process A holds the
chunks in its CPU pool and serves them; process B (this one) pulls them over loopback TCP:

- ``p2p_pull``: lookup (digest + confirm round trip) and pull into B's pool (begin_put,
  recv_into the block, checksum, commit_put), chunks from A's pool blocks (acquire_blobs);
- ``p2p_load``: the same through ``PeerService.load``: pull plus the scatter of each chunk into
  B's pages (a CPU layout here) as it lands;
- baseline ``raw_socket``: A ``sendall``s the same 16 blobs from the same pool blocks over a plain
  TCP socket, B ``recv_into``s a preallocated buffer: no framing, no checksum, no pool.

Repetitions alternate raw and p2p; each case reports the median. CUDA IPC GPU-to-GPU needs two
GPUs and TTFT needs a model: both are recorded as not measured, with the reason.

    python bench/bench_p2p.py [--reps 5] [--checksum auto,crc32] [--out bench/results/]
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import socket
import statistics
import struct
import sys
import time
import zlib

import numpy as np
from bench_report import publish

LAYERS, KV_HEADS, HEAD_DIM, ELEM, PAGE_TOKENS, CHUNK_TOKENS, TOKENS = 32, 8, 128, 2, 16, 256, 4096
BLOB = LAYERS * 2 * CHUNK_TOKENS * KV_HEADS * HEAD_DIM * ELEM  # 32 MiB
CHUNKS = TOKENS // CHUNK_TOKENS  # 16
SECRET = b"bench-p2p-secret-0123456789"
FP = hashlib.blake2b(b"bench_p2p llama3-8b layout", digest_size=16).digest()


def set_keys(s: int) -> list[bytes]:
    return [hashlib.blake2b(f"set{s}-chunk{i}".encode(), digest_size=16).digest() for i in range(CHUNKS)]


def make_tier(chunks: int, pages: int):
    from kvtier import _core

    scratch = np.zeros(pages * BLOB, dtype=np.uint8)
    tier = _core.CpuTier([(scratch.ctypes.data, BLOB, BLOB, pages)], -1, 1, [[0]], chunks * BLOB, "cpu", 1 << 20, 2)
    return tier, scratch


def server(q, stop, sets: int, checksum: str) -> None:
    from kvtier.p2p import PeerConfig, PeerService
    from kvtier.p2p import protocol as P

    if checksum != "auto":
        P.restrict_algorithms([checksum])
    tier, _scratch = make_tier(sets * CHUNKS + 1, 1)
    base = np.random.default_rng(0).integers(0, 256, BLOB, dtype=np.uint8)
    crcs = {}
    for s in range(sets):
        for i, k in enumerate(set_keys(s)):
            view = tier.begin_put(k)
            arr = np.frombuffer(view, dtype=np.uint8)
            arr[:] = base
            arr[:8] = np.frombuffer(struct.pack("<II", s, i), dtype=np.uint8)
            crcs[k.hex()] = zlib.crc32(arr[: 1 << 16])
            view.release()
            tier.commit_put(k)
    svc = PeerService(tier, FP, PeerConfig(secret=SECRET, request_timeout_s=60.0)).start()
    svc.note_stored([k for s in range(sets) for k in set_keys(s)])
    raw = socket.socket()
    raw.bind(("127.0.0.1", 0))
    raw.listen(1)
    q.put(
        {
            "peer": f"{svc.address[0]}:{svc.address[1]}",
            "raw_port": raw.getsockname()[1],
            "crcs": crcs,
            "pool_pinned": bool(tier.pinned),
        }
    )
    conn, _ = raw.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        req = conn.recv(4)
        if len(req) < 4:
            break
        (s,) = struct.unpack("<I", req)
        for k in set_keys(s):  # the same pool blocks the peer service sends from
            views = tier.acquire_blobs(k)
            conn.sendall(views[0])
            views[0].release()
            tier.release_blobs(k)
    conn.close()
    raw.close()
    stop.wait(30)
    svc.close()


def run_variant(checksum: str, reps: int) -> tuple[list[dict], dict]:
    from kvtier.p2p import PeerConfig, PeerService
    from kvtier.p2p import protocol as P
    from kvtier.p2p.transport import Deadline

    if checksum != "auto":
        P.restrict_algorithms([checksum])
    sets = 1 + 2 * reps
    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=server, args=(q, stop, sets, checksum))
    proc.start()
    info = q.get(timeout=300)
    tier, _pages_mem = make_tier(CHUNKS + 1, CHUNKS)
    svc = PeerService(tier, FP, PeerConfig(secret=SECRET, seeds=(info["peer"],), request_timeout_s=60.0)).start()
    raw = socket.create_connection(("127.0.0.1", info["raw_port"]))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rawbuf = np.empty(CHUNKS * BLOB, dtype=np.uint8)
    rawview = memoryview(rawbuf)
    try:
        end = time.monotonic() + 60
        while svc.lookup(set_keys(0)) != CHUNKS:
            if time.monotonic() > end:
                raise RuntimeError("the peers did not find each other")
            time.sleep(0.1)

        def raw_once(s: int) -> float:
            t0 = time.perf_counter()
            raw.sendall(struct.pack("<I", s))
            off, n = 0, CHUNKS * BLOB
            while off < n:
                got = raw.recv_into(rawview[off:])
                if not got:
                    raise ConnectionError("raw stream closed")
                off += got
            return time.perf_counter() - t0

        def check(keys) -> None:
            for k in (keys[0], keys[-1]):
                views = tier.acquire_blobs(k)
                assert views, "pulled chunk missing"
                ok = zlib.crc32(np.frombuffer(views[0], dtype=np.uint8)[: 1 << 16]) == info["crcs"][k.hex()]
                views[0].release()
                tier.release_blobs(k)
                assert ok, "pulled bytes differ"

        # Warm up both paths (connections, page faults of the buffers and the pool).
        raw_once(0)
        plan = svc.plan(set_keys(0))
        assert svc.pull(set_keys(0), plan, Deadline(120)) == CHUNKS
        times = {"raw": [], "pull": [], "load": []}
        for r in range(reps):
            times["raw"].append(raw_once(1 + 2 * r))
            keys = set_keys(1 + 2 * r)
            t0 = time.perf_counter()
            plan = svc.plan(keys)
            got = svc.pull(keys, plan, Deadline(120))
            times["pull"].append(time.perf_counter() - t0)
            assert got == CHUNKS, f"pulled {got} of {CHUNKS}"
            check(keys)
            times["raw"].append(raw_once(2 + 2 * r))
            keys = set_keys(2 + 2 * r)
            t0 = time.perf_counter()
            op = svc.load(keys, np.arange(CHUNKS), 0)
            if op.transfer is not None:
                op.transfer.wait(120)
            times["load"].append(time.perf_counter() - t0)
            assert op.chunks == CHUNKS, f"loaded {op.chunks} of {CHUNKS}"
            check(keys)
        algo = P.ALGORITHM_NAMES[P.pick_algorithm(P.LOCAL_ALGORITHMS_MASK, P.LOCAL_ALGORITHMS_MASK)]
        gbps = {k: CHUNKS * BLOB / statistics.median(v) / 1e9 for k, v in times.items()}
        base = gbps["raw"]
        results = [
            {
                "case": f"p2p_pull_{algo}",
                "value": round(gbps["pull"], 3),
                "unit": "GB/s",
                "baseline": "raw_python_socket",
                "baseline_value": round(base, 3),
                "ratio": round(gbps["pull"] / base, 3),
                "note": f"lookup + confirm + pull of 16 x 32 MiB into the pool, {algo} checksums; "
                f"median of {reps}; pool pinned={info['pool_pinned']}",
            },
            {
                "case": f"p2p_load_{algo}",
                "value": round(gbps["load"], 3),
                "unit": "GB/s",
                "baseline": "raw_python_socket",
                "baseline_value": round(base, 3),
                "ratio": round(gbps["load"] / base, 3),
                "note": "as p2p_pull, plus the scatter of each chunk into the pages (CPU layout) as it lands",
            },
        ]
        raw_times = {k: [round(CHUNKS * BLOB / t / 1e9, 3) for t in v] for k, v in times.items()}
        return results, raw_times
    finally:
        raw.close()
        svc.close()
        stop.set()
        proc.join(60)


def _variant_entry(q, variant: str, reps: int) -> None:
    q.put(run_variant(variant, reps))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--checksum", default="auto,crc32", help="variants: auto (crc32c if available), crc32")
    ap.add_argument("--out", default=None, help="directory to write the JSON into")
    args = ap.parse_args()
    results, detail = [], {}
    for variant in args.checksum.split(","):
        # Each variant in its own process pair, so restricting algorithms does not leak.
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=_variant_entry, args=(q, variant, args.reps))
        p.start()
        res, raw_times = q.get(timeout=1800)
        p.join(60)
        results += res
        detail[variant] = raw_times
    # CUDA IPC GPU to GPU and TTFT with a peer's prefix need GPUs: bench/bench_p2p_gpu.py.
    publish("bench_p2p", "llama3_8b_4096tok", "cpu", results, args.out, indent=1, samples_gbps=detail)
    return 0


if __name__ == "__main__":
    sys.exit(main())
