"""The simulator against the real engine: the same requests through PagedKVPool + CPU tier (+ disk
tier) and through kvtier.sim's tiers, with the same capacities and the same policy objects, must
find the same hits per tier.

As in tests/test_trace_replay.py, each chunk becomes CT real tokens (KV scaled down to a 4 KiB block
a chunk), on CPU tensors. The engine's write-backs to disk are asynchronous. With a disk tier the
engine runs with ``deterministic_writeback`` (every call waits for the write-backs in flight, an
eviction that waits for write-backs waits for all of them, the disk runs at queue depth 1) and
the simulator in its mirror mode: per-tier hits must then agree exactly. Two tests keep the
default asynchronous mode, every call into the engine's CPU tier preceded by a drain (a test-side
wrapper), the simulator's model between calls. With disk write-through (the engine's default) no
eviction waits for the disk and hits must agree exactly. With write-back at eviction the outcome
depends on how many write-backs the disk ends during an eviction's 200 us poll, and per-tier hits
must agree within 1% of the trace's chunks (the engine's own run-to-run spread reaches 0.3% on
this machine, and a CI disk may be slower).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from _util import io_uring_works, wrap_cpu_tiers
from kvtier.cache import CacheConfig
from kvtier.policies import SeenAtLeast
from kvtier.pool import PagedKVPool
from kvtier.sim.tiers import SimCpuTier, SimGpuPool
from kvtier.sim.trace import load_trace, synthetic_trace

TRACE = Path(
    os.environ.get("KVTIER_TEST_TRACE")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "mooncake_synthetic_trace.jsonl"
)
CT = 8  # engine tokens standing for one 512-token chunk
TAIL_BASE = 1 << 30  # token ids of partial tails: never part of a full chunk


def requests(source: str):
    if source == "synthetic":
        return synthetic_trace(
            1200, seed=11, prefixes=50, prefix_chunks=(2, 20), suffix_chunks=(1, 6), chunk_tokens=512
        )
    if not TRACE.exists():
        pytest.skip(f"shared trace not found at {TRACE} (set KVTIER_TEST_TRACE)")
    return load_trace(TRACE, chunk_tokens=512)


def tokens_of(i: int, req) -> list[int]:
    toks = [c * CT + j for c in req.chunks for j in range(CT)]
    rem = req.input_length % 512
    if rem:
        n = max(1, min(CT - 1, math.ceil(rem / 512 * CT)))
        toks.extend((TAIL_BASE + i * CT + j) % (1 << 31) for j in range(n))
    return toks


class _DrainFirst:
    """Wraps the engine's CpuTier: every call waits for the write-backs in flight first."""

    def __init__(self, tier) -> None:
        self._tier = tier

    def __getattr__(self, name):
        attr = getattr(self._tier, name)
        if name not in ("store", "load", "lookup", "lookup_tiers", "prefetch"):
            return attr

        def call(*args, **kwargs):
            self._tier.drain(30.0)
            return attr(*args, **kwargs)

        return call


def run_engine(
    reqs,
    tmp_path,
    *,
    gpu,
    cpu,
    disk=0,
    order="lru",
    min_seen=2,
    gpu_policy=None,
    planner=None,
    admission=None,
    write_through=False,
    deterministic=True,
    backend="auto",
    max_writebacks=64,
    disk_write_through=True,
):
    """``deterministic``: with a disk tier, the engine's deterministic_writeback mode; False:
    the asynchronous default, every call into the CPU tier preceded by a drain.
    ``max_writebacks``: the disk's write-back bound (disk_max_writebacks_in_flight).
    ``disk_write_through``: disk.write_through (the engine's default; off in deterministic mode)."""
    ck = {"cpu_bytes": cpu * 4096, "eviction_policy": order}
    if disk:
        ck.update(
            disk_dir=str(tmp_path),
            disk_bytes=(disk + 2) * 8192,
            disk_admit_min_seen=min_seen,
            disk_backend=backend,
            deterministic_writeback=deterministic,
            disk_max_writebacks_in_flight=max_writebacks,
            disk_write_through=disk_write_through,
        )
    with pytest.MonkeyPatch.context() as mp:
        if not (disk and deterministic):
            wrap_cpu_tiers(mp, _DrainFirst)
        pool = PagedKVPool(
            num_layers=1,
            kv_heads=1,
            head_dim=8,
            num_pages=gpu,
            page_tokens=CT,
            chunk_tokens=CT,
            dtype=torch.float32,
            cache_config=CacheConfig(**ck),
            eviction_policy=gpu_policy,
            planner=planner,
            write_through=write_through,
        )
    if admission is not None:
        pool.cache.tier.set_admission_hook(admission.admit)
    try:
        for i, r in enumerate(reqs):
            toks = tokens_of(i, r)
            seq = pool.begin(toks)
            seq.wait()
            pool.commit(seq, toks)
            pool.release(seq)
        pool.cache.drain()
        st = pool.stats()
    finally:
        pool.close()
    out = {
        "gpu": st["gpu_hit_chunks"],
        "cpu": st["lower_hit_chunks"],
        "disk": 0,
        "planned_recompute": st["planned_recompute_chunks"],
    }
    if disk:
        d = st["lower"]["disk"]
        out.update(
            disk=d["chunks_promoted"],
            cpu=out["cpu"] - d["chunks_promoted"],
            disk_evictions=d["evictions"],
            promotion_failures=d["promotion_failures"],
        )
    return out


def writebacks_per_wait() -> int:
    """Write-backs of 8 KiB slots this project's CPU machine's disk ends in the engine's 200 us poll,
    from its bench_disk device limit (frozen in tests/data/sim_validation)."""
    import json

    bench = Path(__file__).resolve().parent / "data" / "sim_validation"
    for f in sorted(bench.glob("bench_disk-*-cpu-*.json")):
        for r in json.loads(f.read_text())["results"]:
            if r.get("baseline") == "device_limit_seq_odirect_write":
                return max(1, min(64, int(200e-6 * r["baseline_value"] * 1e9 // 8192)))
    return 64


def run_sim(
    reqs,
    *,
    gpu,
    cpu,
    disk=0,
    order="lru",
    min_seen=2,
    gpu_policy=None,
    planner=None,
    admission=None,
    write_through=False,
    deterministic=True,
    max_writebacks=64,
    disk_write_through=True,
):
    """The simulator with the engine's scaled geometry (CT tokens a chunk and a page, 512-byte
    chunks in 4 KiB blocks), so that a planner sees the same chunk size in both.
    ``deterministic``: the mirror of the engine's deterministic_writeback mode.
    ``disk_write_through``: as run_engine's (off in deterministic mode, as in the engine)."""
    tier = SimCpuTier(
        cpu,
        eviction_policy=order,
        disk_slots=disk + 1 if disk else 0,
        disk_admit_min_seen=min_seen,
        admission_policy=admission,
        writebacks_per_wait=writebacks_per_wait(),
        deterministic_writeback=deterministic,
        max_demotions_in_flight=max_writebacks,
        disk_write_through=disk_write_through,
    )
    pool = SimGpuPool(
        gpu,
        page_tokens=CT,
        chunk_tokens=CT,
        cpu=tier,
        eviction_policy=gpu_policy,
        planner=planner,
        chunk_bytes=CT * 64,
        write_through=write_through,
    )
    out = {"gpu": 0, "cpu": 0, "disk": 0, "planned_recompute": 0, "split_plans": 0}
    for i, r in enumerate(reqs):
        b = pool.begin(r.chunks, len(tokens_of(i, r)))
        pool.finish(b, r.chunks)
        out["split_plans"] += bool(b.split_head)
        out["gpu"] += b.gpu_hits
        out["cpu"] += b.lower_hits
        out["planned_recompute"] += b.planned_recompute
    tier.drain()
    # Counted as run_engine counts them: promotions (a chunk promoted after one whose read failed
    # counts too, though the load stops before it), the rest of the lower-tier hits from the pool.
    out["disk"] = tier.counters.chunks_promoted
    out["cpu"] -= out["disk"]
    if disk:
        out["disk_evictions"] = tier.disk.evictions
        out["promotion_failures"] = tier.counters.promotion_failures
    out["evictions"] = tier.counters.evictions
    out["critical_writebacks"] = tier.counters.critical_writebacks
    return out


SIZES = {"synthetic": {"gpu": 120, "cpu": 300}, "shared": {"gpu": 512, "cpu": 1024}}


@pytest.mark.parametrize("source", ["synthetic", "shared"])
@pytest.mark.parametrize("order", ["lru", "s3fifo", "lfu"])
def test_gpu_and_cpu_tiers_match_the_engine_exactly(tmp_path, source, order):
    reqs = requests(source)
    kw = dict(SIZES[source], order=order)
    sim = run_sim(reqs, **kw)
    eng = run_engine(reqs, tmp_path, **kw)
    assert sim["evictions"] > 1000  # the CPU tier's order is exercised
    assert {k: sim[k] for k in eng} == eng


@pytest.mark.parametrize("order", ["lru", "s3fifo"])
def test_write_through_matches_the_engine_exactly(tmp_path, order):
    reqs = requests("synthetic")
    kw = dict(SIZES["synthetic"], order=order, write_through=True)
    sim = run_sim(reqs, **kw)
    eng = run_engine(reqs, tmp_path, **kw)
    assert {k: sim[k] for k in eng} == eng
    assert sim["cpu"] != run_sim(reqs, **SIZES["synthetic"], order=order)["cpu"]  # it changes the CPU tier


class MostRecentFirst:
    """A Python GPU eviction policy (the engine's protocol): evict the most recently used."""

    def choose_victims(self, candidates, pages_needed):
        return [c.key for c in sorted(candidates, key=lambda c: -c.last_use)]


class LoadCpuOnly:
    """A Python load planner (the engine's protocol): load CPU chunks, recompute from the first
    disk chunk on."""

    def plan(self, pool, gpu_hit_chunks, tiers):
        n = 0
        while n < len(tiers) and tiers[n] == "cpu":
            n += 1
        return n


def test_same_python_gpu_policy_object_runs_in_both(tmp_path):
    reqs = requests("synthetic")
    pol = MostRecentFirst()
    sim = run_sim(reqs, **SIZES["synthetic"], gpu_policy=pol)
    eng = run_engine(reqs, tmp_path, **SIZES["synthetic"], gpu_policy=pol)
    assert {k: sim[k] for k in eng} == eng
    assert sim["gpu"] != run_sim(reqs, **SIZES["synthetic"])["gpu"]  # the policy changed the outcome


@pytest.mark.parametrize("source", ["synthetic", "shared"])
@pytest.mark.parametrize("order", ["lru", "s3fifo", "lfu"])
def test_disk_tier_matches_the_engine_exactly(tmp_path, source, order):
    reqs = requests(source)
    kw = dict(SIZES[source], disk=8 * SIZES[source]["cpu"], order=order)
    sim = run_sim(reqs, **kw)
    eng = run_engine(reqs, tmp_path, **kw)
    print(f"{source} {order}: sim {sim} engine {eng}")
    assert sim["disk"] > 0 and sim["critical_writebacks"] > 0  # disk hits, and evictions that waited
    assert {k: sim[k] for k in eng} == eng


@pytest.mark.parametrize("backend", ["posix", "io_uring"])
def test_small_disk_tier_matches_the_engine_exactly(tmp_path, backend):
    """A disk of 600 slots, every evicted chunk admitted: the disk evicts thousands of chunks in
    its LRU order, which a write sets when it ends, and some promotions find their chunk evicted
    by the write-backs just made. Deterministic mode runs the disk at queue depth 1 so that
    write-backs end in the order they were made (before, POSIX runs differed from each other)."""
    if backend == "io_uring" and not io_uring_works():
        pytest.skip("io_uring not compiled in or refused by this kernel")
    reqs = requests("synthetic")
    kw = dict(SIZES["synthetic"], disk=600, min_seen=1)
    sim = run_sim(reqs, **kw)
    eng = run_engine(reqs, tmp_path, **kw, backend=backend)
    print(f"small disk ({backend}): sim {sim} engine {eng}")
    assert sim["disk_evictions"] > 5000 and sim["promotion_failures"] > 0
    assert {k: sim[k] for k in eng} == eng


def test_write_back_bound_matches_the_engine_exactly(tmp_path):
    """A bound of 4 write-backs in flight instead of 64 (disk_max_writebacks_in_flight), every
    evicted chunk admitted: fewer write-backs are started ahead of the promotions' reads; the
    simulator follows the engine chunk for chunk, and the bound changes what it finds."""
    reqs = requests("synthetic")
    kw = dict(SIZES["synthetic"], disk=600, min_seen=1)
    sim = run_sim(reqs, **kw, max_writebacks=4)
    eng = run_engine(reqs, tmp_path, **kw, max_writebacks=4)
    print(f"bound 4: sim {sim} engine {eng}")
    assert {k: sim[k] for k in eng} == eng
    assert sim != run_sim(reqs, **kw)  # the bound of 64 leads elsewhere


def test_asynchronous_disk_tier_with_write_through_matches_the_engine_exactly(tmp_path):
    """The engine's default mode, write-through included: admitted chunks are on disk before
    they are evicted, so no eviction waits for the disk and the outcome does not depend on its
    speed."""
    reqs = requests("shared")
    kw = dict(SIZES["shared"], disk=8 * SIZES["shared"]["cpu"], deterministic=False)
    sim = run_sim(reqs, **kw)
    eng = run_engine(reqs, tmp_path, **kw)
    print(f"asynchronous, write-through: sim {sim} engine {eng}")
    assert sim["disk"] > 0 and sim["critical_writebacks"] == 0
    assert {k: sim[k] for k in eng} == eng


def test_asynchronous_disk_tier_with_writeback_at_eviction_matches_the_engine_within_1_percent(tmp_path):
    """The asynchronous mode with write-back at eviction (disk.write_through off): how many
    write-backs end while an eviction waits depends on the disk; the simulator ends
    ``writebacks_per_wait`` of them a poll."""
    reqs = requests("shared")
    kw = dict(SIZES["shared"], disk=8 * SIZES["shared"]["cpu"], deterministic=False, disk_write_through=False)
    sim = run_sim(reqs, **kw)
    eng = run_engine(reqs, tmp_path, **kw)
    print(f"asynchronous, write-back at eviction: sim {sim} engine {eng}")
    chunks = sum(len(r.chunks) for r in reqs)
    assert sim["gpu"] == eng["gpu"]
    assert sim["disk"] > 0 and eng["disk"] > 0 and sim["critical_writebacks"] > 0
    for tier in ("cpu", "disk", "planned_recompute"):
        assert abs(sim[tier] - eng[tier]) <= 0.01 * chunks, (tier, sim, eng)


def test_calibrated_planner_runs_in_both_exactly(tmp_path):
    from kvtier.sim.cost import CalibratedPlanner, HardwareCost, ModelShape

    # CPU chunks load in microseconds; a disk chunk (512 B at 2 MB/s + 0.1 ms) beats recomputing
    # its 8 tokens (weights 0.16 ms, attention growing with the position) only from about token 90
    # on. One planner object, two pools.
    hw = HardwareCost(weights_rate=1e9, attention_rate=1e9, h2d_bw=1e9, disk_read_bw=2e6)
    planner = CalibratedPlanner(hw, ModelShape("tiny", 1e4, 1, 64, 1, 2, 2))
    reqs = requests("synthetic")
    kw = dict(SIZES["synthetic"], disk=2400, min_seen=1, planner=planner)
    sim = run_sim(reqs, **kw)
    eng = run_engine(reqs, tmp_path, **kw)
    print(f"calibrated planner: sim {sim} engine {eng}")
    assert {k: sim[k] for k in eng} == eng
    assert sim["planned_recompute"] > 0 and sim["cpu"] > 0 and sim["disk"] > 0
    assert sum(planner.decisions.values()) > 0


def test_planner_and_admission_objects_run_in_both_exactly(tmp_path):
    reqs = requests("synthetic")
    kw = dict(SIZES["synthetic"], disk=2400, planner=LoadCpuOnly(), admission=SeenAtLeast(3))
    sim = run_sim(reqs, **kw)
    eng = run_engine(reqs, tmp_path, **kw)
    print(f"planner and admission: sim {sim} engine {eng}")
    assert sim["planned_recompute"] > 0 and sim["disk"] > 0
    assert {k: sim[k] for k in eng} == eng


def split_planner():
    """The engine's SplitCostModelPlanner, priced so that a chunk's load (512 B at 2 MB/s, from
    either tier) and its prefill (8 tokens, 0.16 ms plus attention) are of the same order: the
    split recomputes a head of about half of the lower-tier prefix while the tail loads."""
    from kvtier.planner import ModelCost, SplitCostModelPlanner

    return SplitCostModelPlanner(ModelCost(1e4, 1, 64, 1e9), bandwidth={"cpu": 2e6, "disk": 2e6})


def test_split_planner_object_matches_the_engine_exactly(tmp_path):
    """One SplitCostModelPlanner object in both pools, no disk (deterministic): which chunks
    load, which are recomputed, and what commit registers (the head too) agree exactly."""
    reqs = requests("synthetic")
    planner = split_planner()
    kw = dict(SIZES["synthetic"], planner=planner)
    sim = run_sim(reqs, **kw)
    sim_decisions = dict(planner.decisions)
    eng = run_engine(reqs, tmp_path, **kw)
    assert {k: sim[k] for k in eng} == eng
    assert planner.decisions == {k: 2 * v for k, v in sim_decisions.items()}  # the same plans, twice
    assert sim["split_plans"] > 100 and sim["planned_recompute"] > 0 and sim["cpu"] > 0
    plain = run_sim(reqs, **SIZES["synthetic"])  # without the planner: other hits
    assert (plain["gpu"], plain["cpu"]) != (sim["gpu"], sim["cpu"])


def test_split_planner_with_a_disk_tier_matches_the_engine_exactly(tmp_path):
    reqs = requests("synthetic")
    kw = dict(SIZES["synthetic"], disk=2400, min_seen=1, planner=split_planner())
    sim = run_sim(reqs, **kw)
    eng = run_engine(reqs, tmp_path, **kw)
    print(f"split planner with disk: sim {sim} engine {eng}")
    assert sim["split_plans"] > 0 and sim["disk"] > 0
    assert {k: sim[k] for k in eng} == eng
