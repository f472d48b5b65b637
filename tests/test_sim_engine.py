"""The simulator against the real engine: the same requests through PagedKVPool + CPU tier (+ disk
tier) and through kvtier.sim's tiers, with the same capacities and the same policy objects, must
find the same hits per tier.

As in tests/test_trace_replay.py, each chunk becomes CT real tokens (KV scaled down to a 4 KiB block
a chunk), on CPU tensors. The engine's write-backs to disk are asynchronous; so that its state does
not depend on the disk's speed between calls, every call into its CPU tier is preceded by a drain
(the simulator's model: write-backs end before the next call). Within one call the engine's
outcome can still depend on how fast write-backs finish when an eviction must wait for them
(backpressure): without a disk tier the comparison is exact; with one, per-tier hits must agree
within 1% of the trace's chunks (the engine's own run-to-run spread reaches 0.3% on this machine,
and a CI disk may be slower).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from kvtier.cache import CacheConfig
from kvtier.policies import SeenAtLeast
from kvtier.pool import PagedKVPool
from kvtier.sim.tiers import SimCpuTier, SimGpuPool
from kvtier.sim.trace import load_trace, synthetic_trace

TRACE = Path(os.environ.get("KVTIER_TEST_TRACE")
             or Path(__file__).resolve().parents[2] / "shared" / "data" / "mooncake_synthetic_trace.jsonl")
CT = 8  # engine tokens standing for one 512-token chunk
TAIL_BASE = 1 << 30  # token ids of partial tails: never part of a full chunk


def requests(source: str):
    if source == "synthetic":
        return synthetic_trace(1200, seed=11, prefixes=50, prefix_chunks=(2, 20), suffix_chunks=(1, 6),
                               chunk_tokens=512)
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


def run_engine(reqs, tmp_path, *, gpu, cpu, disk=0, order="lru", min_seen=2, gpu_policy=None, planner=None,
               admission=None, write_through=False):
    ck = {"cpu_bytes": cpu * 4096, "eviction_policy": order}
    if disk:
        ck.update(disk_dir=str(tmp_path), disk_bytes=(disk + 2) * 8192, disk_admit_min_seen=min_seen)
    pool = PagedKVPool(num_layers=1, kv_heads=1, head_dim=8, num_pages=gpu, page_tokens=CT, chunk_tokens=CT,
                       dtype=torch.float32, cache_config=CacheConfig(**ck), eviction_policy=gpu_policy,
                       planner=planner, write_through=write_through)
    if admission is not None:
        pool.cache._tier.set_admission_hook(admission.admit)
    pool.cache._tier = _DrainFirst(pool.cache._tier)
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
    promoted = st["lower"]["disk"]["chunks_promoted"] if disk else 0
    return {"gpu": st["gpu_hit_chunks"], "cpu": st["lower_hit_chunks"] - promoted, "disk": promoted,
            "planned_recompute": st["planned_recompute_chunks"]}


def writebacks_per_wait() -> int:
    """Write-backs of 8 KiB slots this machine's disk ends in the engine's 200 us poll, from its
    bench_disk device limit (4.2 GB/s here: ~100, so the whole in-flight bound of 64)."""
    import json

    bench = Path(__file__).resolve().parents[1] / "bench" / "results"
    for f in sorted(bench.glob("bench_disk-*-cpu-*.json")):
        for r in json.loads(f.read_text())["results"]:
            if r.get("baseline") == "device_limit_seq_odirect_write":
                return max(1, min(64, int(200e-6 * r["baseline_value"] * 1e9 // 8192)))
    return 64


def run_sim(reqs, *, gpu, cpu, disk=0, order="lru", min_seen=2, gpu_policy=None, planner=None, admission=None,
            write_through=False):
    """The simulator with the engine's scaled geometry (CT tokens a chunk and a page, 512-byte
    chunks in 4 KiB blocks), so that a planner sees the same chunk size in both."""
    tier = SimCpuTier(cpu, eviction_policy=order, disk_slots=disk + 1 if disk else 0, disk_admit_min_seen=min_seen,
                      admission_policy=admission, writebacks_per_wait=writebacks_per_wait())
    pool = SimGpuPool(gpu, page_tokens=CT, chunk_tokens=CT, cpu=tier, eviction_policy=gpu_policy,
                      planner=planner, chunk_bytes=CT * 64, write_through=write_through)
    out = {"gpu": 0, "cpu": 0, "disk": 0, "planned_recompute": 0, "split_plans": 0}
    for i, r in enumerate(reqs):
        b = pool.begin(r.chunks, len(tokens_of(i, r)))
        pool.finish(b, r.chunks)
        out["split_plans"] += bool(b.split_head)
        out["gpu"] += b.gpu_hits
        out["cpu"] += b.lower_hits - b.disk_hits
        out["disk"] += b.disk_hits
        out["planned_recompute"] += b.planned_recompute
    tier.drain()
    out["evictions"] = tier.counters.evictions
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
def test_disk_tier_matches_the_engine(tmp_path, source, order):
    reqs = requests(source)
    kw = dict(SIZES[source], disk=8 * SIZES[source]["cpu"], order=order)
    sim = run_sim(reqs, **kw)
    eng = run_engine(reqs, tmp_path, **kw)
    chunks = sum(len(r.chunks) for r in reqs)
    assert sim["gpu"] == eng["gpu"]
    assert sim["disk"] > 0 and eng["disk"] > 0
    for tier in ("cpu", "disk"):
        assert abs(sim[tier] - eng[tier]) <= 0.01 * chunks, (tier, sim, eng)


def test_calibrated_planner_runs_in_both(tmp_path):
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
    chunks = sum(len(r.chunks) for r in reqs)
    assert sim["gpu"] == eng["gpu"]
    for k in ("cpu", "disk", "planned_recompute"):
        assert abs(sim[k] - eng[k]) <= 0.01 * chunks, (k, sim, eng)
    assert sim["planned_recompute"] > 0 and sim["cpu"] > 0 and sim["disk"] > 0
    assert sum(planner.decisions.values()) > 0


def test_planner_and_admission_objects_run_in_both(tmp_path):
    reqs = requests("synthetic")
    kw = dict(SIZES["synthetic"], disk=2400, planner=LoadCpuOnly(), admission=SeenAtLeast(3))
    sim = run_sim(reqs, **kw)
    eng = run_engine(reqs, tmp_path, **kw)
    chunks = sum(len(r.chunks) for r in reqs)
    assert sim["planned_recompute"] > 0 and eng["planned_recompute"] > 0
    assert sim["gpu"] == eng["gpu"]
    for k in ("cpu", "disk", "planned_recompute"):
        assert abs(sim[k] - eng[k]) <= 0.01 * chunks, (k, sim, eng)


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


def test_split_planner_with_a_disk_tier_matches_the_engine(tmp_path):
    reqs = requests("synthetic")
    kw = dict(SIZES["synthetic"], disk=2400, min_seen=1, planner=split_planner())
    sim = run_sim(reqs, **kw)
    eng = run_engine(reqs, tmp_path, **kw)
    chunks = sum(len(r.chunks) for r in reqs)
    assert sim["gpu"] == eng["gpu"]
    assert sim["split_plans"] > 0 and sim["disk"] > 0
    for k in ("cpu", "disk", "planned_recompute"):
        assert abs(sim[k] - eng[k]) <= 0.01 * chunks, (k, sim, eng)
