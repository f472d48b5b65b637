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

With ``--nixl TLS[;TLS...]`` (workload ``llama3_8b_4096tok_nixl``; needs the nixl package) the same
16 chunks move per UCX transport list (``UCX_TLS``, set in both processes), four ways in one run:

- ``p2p_pull_nixl``: ``PeerService.pull`` with ``transport: auto``: lookup, NIXL_LEASE on the
  control channel, one-sided NIXL READs of A's pool blocks into B's, CRC32C of each blob, commit;
- ``raw_nixl_read``: NIXL's own transfer of the same bytes, nothing of kvtier's protocol: two
  agents set up as kvtier's are (UCX backend; progress thread that waits between passes, not
  NIXL's spinning default, which would take a core from every other case), one registered
  contiguous 512 MiB buffer each, one READ request;
- ``p2p_pull_tcp``: ``PeerService.pull`` with ``transport: tcp`` (the framed TCP stream);
- ``memcpy``: the physical limit on one host, a 512 MiB copy between two buffers in B.

``p2p_pull_nixl`` is reported against ``raw_nixl_read`` (target >= 0.9), ``raw_nixl_read``
against ``memcpy``, and ``p2p_pull_tcp`` against ``p2p_pull_nixl``.

    python bench/bench_p2p.py [--reps 5] [--checksum auto,crc32] [--out bench/results/]
    python bench/bench_p2p.py --nixl 'tcp;tcp,shm,self' [--reps 3] [--out bench/results/]
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
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


# -- NIXL ---------------------------------------------------------------------------------------


def _raw_agent(name: str, buf: np.ndarray):
    """A NIXL agent as kvtier's members make them (UCX backend, progress thread waiting
    PROGRESS_DELAY_US between passes) with ``buf`` registered; used through NIXL's own API."""
    from kvtier.p2p.nixl_agent import new_agent

    agent = new_agent(name, progress_thread=True)
    agent.create_backend("UCX", {})
    reg = agent.register_memory([(buf.ctypes.data, buf.nbytes, 0, "")], "DRAM")
    return agent, reg


def nixl_server(q, stop, tls: str, sets: int) -> None:
    os.environ["UCX_TLS"] = tls
    from kvtier.p2p import PeerConfig, PeerService

    tier, _scratch = make_tier(sets * CHUNKS + 1, 1)
    base = np.random.default_rng(0).integers(0, 256, BLOB, dtype=np.uint8)
    for s in range(sets):
        for i, k in enumerate(set_keys(s)):
            view = tier.begin_put(k)
            arr = np.frombuffer(view, dtype=np.uint8)
            arr[:] = base
            arr[:8] = np.frombuffer(struct.pack("<II", s, i), dtype=np.uint8)
            view.release()
            tier.commit_put(k)
    svc = PeerService(tier, FP, PeerConfig(secret=SECRET, request_timeout_s=60.0, transport="nixl")).start()
    svc.note_stored([k for s in range(sets) for k in set_keys(s)])
    raw_src = np.tile(base, CHUNKS)  # the raw READ's source: one contiguous region of the same bytes
    agent, _reg = _raw_agent("bench-raw-holder", raw_src)
    q.put(
        {
            "peer": f"{svc.address[0]}:{svc.address[1]}",
            "raw_meta": bytes(agent.get_agent_metadata()),
            "raw_addr": raw_src.ctypes.data,
            "pool_pinned": bool(tier.pinned),
        }
    )
    stop.wait(1800)
    svc.close()


def run_nixl(tls: str, reps: int) -> tuple[list[dict], dict]:
    os.environ["UCX_TLS"] = tls
    from kvtier.p2p import PeerConfig, PeerService
    from kvtier.p2p.transport import Deadline

    sets = 2 + 2 * reps
    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=nixl_server, args=(q, stop, tls, sets))
    proc.start()
    info = q.get(timeout=600)
    services, tiers = {}, []
    nbytes = CHUNKS * BLOB
    try:
        for path in ("nixl", "tcp"):
            tier, mem = make_tier(CHUNKS + 1, CHUNKS)
            tiers.append((tier, mem))
            cfg = PeerConfig(secret=SECRET, seeds=(info["peer"],), request_timeout_s=60.0, transport=path)
            services[path] = PeerService(tier, FP, cfg).start()
        end = time.monotonic() + 60
        while any(svc.lookup(set_keys(0)) != CHUNKS for svc in services.values()):
            if time.monotonic() > end:
                raise RuntimeError("the peers did not find each other")
            time.sleep(0.1)
        dst = np.zeros(nbytes, dtype=np.uint8)
        agent, _reg = _raw_agent("bench-raw-puller", dst)
        holder = agent.add_remote_agent(info["raw_meta"])
        local = agent.get_xfer_descs([(dst.ctypes.data, nbytes, 0)], "DRAM")
        remote = agent.get_xfer_descs([(info["raw_addr"], nbytes, 0)], "DRAM")
        copy_src = np.ones(nbytes, dtype=np.uint8)

        def raw_once() -> float:
            dst[:] = 0
            t0 = time.perf_counter()
            h = agent.initialize_xfer("READ", local, remote, holder)
            state = agent.transfer(h)
            deadline = time.monotonic() + 120
            while state == "PROC" and time.monotonic() < deadline:
                state = agent.check_xfer_state(h)
            elapsed = time.perf_counter() - t0
            h.release()
            assert state == "DONE", f"raw NIXL read ended {state}"
            assert dst[8:16].any() and dst[-8:].any(), "raw NIXL read left zeros"
            return elapsed

        def pull_once(path: str, s: int) -> float:
            svc, keys = services[path], set_keys(s)
            t0 = time.perf_counter()
            got = svc.pull(keys, svc.plan(keys), Deadline(120))
            elapsed = time.perf_counter() - t0
            assert got == CHUNKS, f"{path}: pulled {got} of {CHUNKS}"
            return elapsed

        def memcpy_once() -> float:
            t0 = time.perf_counter()
            np.copyto(dst, copy_src)
            return time.perf_counter() - t0

        # Warm up every path (connections, NIXL metadata, page faults of the buffers and pools).
        raw_once(), memcpy_once(), pull_once("nixl", 0), pull_once("tcp", 1)
        times = {"nixl": [], "raw": [], "tcp": [], "memcpy": []}
        for r in range(reps):
            times["raw"].append(raw_once())
            times["nixl"].append(pull_once("nixl", 2 + 2 * r))
            times["tcp"].append(pull_once("tcp", 3 + 2 * r))
            times["memcpy"].append(memcpy_once())
        st = services["nixl"].stats()
        pulled_nixl = services["nixl"].counters["chunks_pulled_nixl"]
        assert pulled_nixl == CHUNKS * (reps + 1), f"only {pulled_nixl} chunks moved over NIXL"
        assert services["tcp"].counters["chunks_pulled_nixl"] == 0
        agent.remove_remote_agent(holder)
        gbps = {k: nbytes / statistics.median(v) / 1e9 for k, v in times.items()}

        def case(name, value, baseline, base_value, note):
            return {
                "case": f"{name}[UCX_TLS={tls}]",
                "value": round(value, 3),
                "unit": "GB/s",
                "baseline": f"{baseline}[UCX_TLS={tls}]" if baseline != "memcpy" else "memcpy_same_process",
                "baseline_value": round(base_value, 3),
                "ratio": round(value / base_value, 3),
                "note": note,
            }

        results = [
            case(
                "p2p_pull_nixl",
                gbps["nixl"],
                "raw_nixl_read",
                gbps["raw"],
                f"lookup + lease + NIXL READs of 16 x 32 MiB into the pool + CRC32C + commit; median of {reps}; "
                f"data path {st['data_path']}; pool pinned={info['pool_pinned']}",
            ),
            case(
                "raw_nixl_read",
                gbps["raw"],
                "memcpy",
                gbps["memcpy"],
                "NIXL's API, one 512 MiB READ between registered buffers",
            ),
            case(
                "p2p_pull_tcp",
                gbps["tcp"],
                "p2p_pull_nixl",
                gbps["nixl"],
                "the same pull over kvtier's TCP stream (transport: tcp); ratio < 1: NIXL is faster",
            ),
        ]
        samples = {k: [round(nbytes / t / 1e9, 3) for t in v] for k, v in times.items()}
        return results, samples
    finally:
        for svc in services.values():
            svc.close()
        stop.set()
        proc.join(60)


def _nixl_entry(q, tls: str, reps: int) -> None:
    q.put(run_nixl(tls, reps))


def _variant_entry(q, variant: str, reps: int) -> None:
    q.put(run_variant(variant, reps))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--checksum", default="auto,crc32", help="variants: auto (crc32c if available), crc32")
    ap.add_argument("--out", default=None, help="directory to write the JSON into")
    ap.add_argument("--nixl", default=None, help="UCX_TLS values separated by ';': run the NIXL comparison instead")
    args = ap.parse_args()
    results, detail = [], {}
    if args.nixl:
        for tls in args.nixl.split(";"):
            # Each transport list in its own process pair: UCX reads UCX_TLS once per process.
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            p = ctx.Process(target=_nixl_entry, args=(q, tls, args.reps))
            p.start()
            res, samples = q.get(timeout=1800)
            p.join(60)
            results += res
            detail[tls] = samples
        publish("bench_p2p", "llama3_8b_4096tok_nixl", "cpu", results, args.out, indent=1, samples_gbps=detail)
        return 0
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
