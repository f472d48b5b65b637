"""bench_p2p_nixl: a peer pull over NIXL beside NIXL's own READ of the same bytes, kvtier's TCP
stream and memcpy, measured in the same run, per UCX transport list.

Workload ``llama3_8b_4096tok`` (bench_p2p's: 16 chunks of 32 MiB, 512 MiB). ``UCX_TLS`` is set in
both processes, one process pair per value given; four ways to move the chunks:

- ``p2p_pull_nixl``: ``PeerService.pull`` with ``transport: auto``: lookup, NIXL_LEASE on the
  control channel, one-sided NIXL READs of A's pool blocks into B's, CRC32C of each blob, commit.
  The chunks are leased for the first time: A computes their checksums while B READs them;
- ``p2p_pull_nixl_warm``: the same pull of chunks another member pulled from A before, so A's
  tier keeps their checksums (a popular prefix: every puller after the first);
- ``raw_nixl_read``: NIXL's own transfer of the same bytes, nothing of kvtier's protocol: two
  agents set up as kvtier's are (UCX backend; progress thread that waits between passes, not
  NIXL's spinning default, which would take a core from every other case), one registered
  contiguous 512 MiB buffer each, one READ request;
- ``p2p_pull_tcp``: ``PeerService.pull`` with ``transport: tcp`` (the framed TCP stream);
- ``memcpy``: the physical limit on one host, a 512 MiB copy between two buffers in B.

``p2p_pull_nixl`` and ``p2p_pull_nixl_warm`` are reported against ``raw_nixl_read`` (target >=
0.9), ``raw_nixl_read``
against ``memcpy``, and ``p2p_pull_tcp`` against ``p2p_pull_nixl``.

On a machine with NVIDIA GPUs NIXL's UCX backend requires ``cuda_copy`` in ``UCX_TLS``.

    python bench/bench_p2p_nixl.py [--tls 'tcp;tcp,shm,self'] [--reps 3] [--tag cpu] [--out bench/results/]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import struct
import sys
import time

import numpy as np
from bench_p2p import BLOB, CHUNKS, FP, SECRET, make_tier, set_keys
from bench_report import publish


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

    sets = 2 + 3 * reps
    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=nixl_server, args=(q, stop, tls, sets))
    proc.start()
    info = q.get(timeout=600)
    services, tiers = {}, []
    nbytes = CHUNKS * BLOB
    try:
        for name, path in (("nixl", "nixl"), ("tcp", "tcp"), ("first", "nixl")):  # first: pulls A's chunks first
            tier, mem = make_tier(CHUNKS + 1, CHUNKS)
            tiers.append((tier, mem))
            cfg = PeerConfig(secret=SECRET, seeds=(info["peer"],), request_timeout_s=60.0, transport=path)
            services[name] = PeerService(tier, FP, cfg).start()
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
        pull_once("first", 1)
        times = {"nixl": [], "nixl_warm": [], "raw": [], "tcp": [], "memcpy": []}
        for r in range(reps):
            times["raw"].append(raw_once())
            times["nixl"].append(pull_once("nixl", 2 + 3 * r))
            times["tcp"].append(pull_once("tcp", 3 + 3 * r))
            pull_once("first", 4 + 3 * r)  # A keeps these chunks' checksums from here on
            times["nixl_warm"].append(pull_once("nixl", 4 + 3 * r))
            times["memcpy"].append(memcpy_once())
        st = services["nixl"].stats()
        pulled_nixl = services["nixl"].counters["chunks_pulled_nixl"]
        assert pulled_nixl == CHUNKS * (2 * reps + 1), f"only {pulled_nixl} chunks moved over NIXL"
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
                "p2p_pull_nixl_warm",
                gbps["nixl_warm"],
                "raw_nixl_read",
                gbps["raw"],
                "the same pull of chunks another member pulled first: the holder keeps their checksums",
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tls", default="tcp;tcp,shm,self", help="UCX_TLS values separated by ';'")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="directory to write the JSON into")
    ap.add_argument("--tag", default="cpu", help="the machine's tag in the file name (cpu, h100host, ...)")
    args = ap.parse_args()
    results, detail = [], {}
    for tls in args.tls.split(";"):
        # Each transport list in its own process pair: UCX reads UCX_TLS once per process.
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=_nixl_entry, args=(q, tls, args.reps))
        p.start()
        res, samples = q.get(timeout=1800)
        p.join(60)
        results += res
        detail[tls] = samples
    publish("bench_p2p_nixl", "llama3_8b_4096tok", args.tag, results, args.out, indent=1, samples_gbps=detail)
    return 0


if __name__ == "__main__":
    sys.exit(main())
