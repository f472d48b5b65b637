"""kvtier.sim's deployment model: routing, peers, prefetch, the tier ablation, policy objects in the
Simulator, timing, and clear errors for bad configurations."""

from __future__ import annotations

from dataclasses import replace

import pytest
from kvtier.policies import PrefetchAll, SeenAtLeast
from kvtier.sim import SimConfig, Simulator, synthetic_trace, tier_ablation
from kvtier.sim.cost import CalibratedPlanner, HardwareCost, ModelShape

TINY = ModelShape("tiny", 1e6, 1, 64, 1, 2, 2)  # 8 bytes a token: one 4 KiB block a 512-token chunk
HW = HardwareCost(
    weights_rate=2e10, attention_rate=1e13, h2d_bw=40e6, d2h_bw=40e6, disk_read_bw=4e6, disk_write_bw=8e6, link_bw=10e6
)  # scaled so that the tiny chunks cost like real ones


@pytest.fixture(scope="module")
def reqs():
    return synthetic_trace(
        1500, seed=5, prefixes=80, prefix_chunks=(2, 20), suffix_chunks=(1, 6), chunk_tokens=512, rate_per_s=50.0
    )


def cfg(**kw) -> SimConfig:
    base = {
        "model": TINY,
        "chunk_tokens": 512,
        "page_tokens": 512,
        "gpu_bytes": 100 * 4096,
        "cpu_bytes": 300 * 4096,
        "disk_bytes": 0,
        "hardware": HW,
    }
    base.update(kw)
    return SimConfig(**base)


def test_cache_aware_routing_finds_more_hits_than_round_robin(reqs):
    rr = Simulator(cfg(instances=4, routing="round_robin")).run(reqs)
    ca = Simulator(cfg(instances=4, routing="cache_aware")).run(reqs)
    ll = Simulator(cfg(instances=4, routing="least_loaded")).run(reqs)
    assert ca.hit_ratio() > rr.hit_ratio() + 0.05
    assert ll.requests == rr.requests == ca.requests == len(reqs)


@pytest.mark.parametrize("routing", ["least_loaded", "cache_aware"])
def test_idle_instances_share_new_requests(routing):
    """Requests that find every instance idle and no cached prefix go to the instance picked least
    recently, not to the lowest-numbered one: an unsaturated cluster must still use all of its
    instances (and their caches)."""
    from kvtier.sim.trace import Request

    reqs = [
        Request(arrival_s=10.0 * i, input_length=1024, output_length=1, chunks=(2 * i, 2 * i + 1)) for i in range(12)
    ]  # far apart: each ends before the next arrives; nothing shared
    sim = Simulator(cfg(instances=4, routing=routing))
    routed = [sim._route(r, r.arrival_s).idx for r in reqs]
    assert routed == [0, 1, 2, 3] * 3


def test_peers_recover_prefixes_held_by_other_instances(reqs):
    alone = Simulator(cfg(instances=4)).run(reqs)
    shared = Simulator(cfg(instances=4, peers=True)).run(reqs)
    assert alone.peer_hits == 0 and shared.peer_hits > 0
    assert shared.hit_ratio() > alone.hit_ratio()
    assert shared.bytes["peer_to_cpu"] == shared.peer_hits * 4096


def test_tier_ablation_orders_hits_and_ttft(reqs):
    out = tier_ablation(reqs, cfg(disk_bytes=3000 * 8192, disk_admit_min_seen=1))
    assert list(out) == ["all tiers", "no disk", "GPU only", "no cache"]
    hits = [r.hit_ratio() for r in out.values()]
    assert hits[0] > hits[1] > hits[2] > hits[3] == 0
    assert out["all tiers"].disk_hits > 0 and out["all tiers"].ssd_write_bytes > 0
    assert out["all tiers"].bytes["cpu_to_disk"] > 0
    p50 = [r.ttft_percentiles()["p50"] for r in out.values()]
    assert p50[-1] > p50[0]  # caching beats recomputing


def test_prefetch_policy_reads_disk_chunks_at_lookup(reqs):
    base = cfg(disk_bytes=3000 * 8192, disk_admit_min_seen=1, cpu_bytes=120 * 4096)
    plain = Simulator(base).run(reqs)
    pre = Simulator(replace(base, prefetch_policy=PrefetchAll())).run(reqs)
    assert sum(t["chunks_prefetched"] for t in pre.tiers.values()) > 0
    assert plain.hit_ratio("disk") > 0 and pre.hit_ratio("disk") > 0


def test_admission_policy_object_gates_ssd_writes(reqs):
    class AdmitNothing:
        def admit(self, keys, seen):
            return [False] * len(keys)

    base = cfg(disk_bytes=3000 * 8192, cpu_bytes=120 * 4096)
    none = Simulator(replace(base, admission_policy=AdmitNothing())).run(reqs)
    some = Simulator(replace(base, admission_policy=SeenAtLeast(2))).run(reqs)
    assert none.ssd_write_bytes == 0 and none.disk_hits == 0
    assert some.ssd_write_bytes > 0 and some.disk_hits > 0


def test_planner_object_decides_load_or_recompute(reqs):
    class RecomputeAll:
        def plan(self, pool, gpu_hit_chunks, tiers):
            assert pool.chunk_tokens == 512 and pool.layout.chunk_bytes == 4096
            return 0

    r = Simulator(cfg(planner=RecomputeAll())).run(reqs)
    assert r.cpu_hits == 0 and r.planned_recompute > 0


def test_calibrated_planner_recomputes_what_a_slow_tier_cannot_deliver(reqs):
    base = cfg(disk_bytes=3000 * 8192, disk_admit_min_seen=1, cpu_bytes=120 * 4096)
    fast = CalibratedPlanner(replace(HW, disk_read_bw=1e9), TINY)
    slow = CalibratedPlanner(replace(HW, disk_read_bw=1e4), TINY)
    rf = Simulator(replace(base, planner=fast)).run(reqs)
    rs = Simulator(replace(base, planner=slow)).run(reqs)
    assert fast.decisions["recompute"] == 0 and rf.disk_hits > 0
    assert slow.decisions["recompute"] > 0 and rs.planned_recompute > 0
    # Planned at lookup; by the load the GPU's evictions may have pushed some CPU chunks to disk.
    assert rs.disk_hits < rf.disk_hits / 5
    # chunk 0 from disk: 4096 B at 1e4 B/s = 0.41 s; recomputing its 512 tokens: 1e9 FLOP at 2e10/s = 50 ms
    assert (
        slow.plan(type("P", (), {"chunk_tokens": 512, "layout": type("L", (), {"chunk_bytes": 4096})})(), 0, ["disk"])
        == 0
    )


def test_queueing_grows_ttft_under_load(reqs):
    fast = Simulator(cfg(replay="fast")).run(reqs)
    timed = Simulator(cfg()).run(reqs)
    busy = Simulator(cfg(hardware=replace(HW, weights_rate=HW.weights_rate / 20))).run(reqs)
    assert fast.gpu_hits == timed.gpu_hits  # arrivals change time, not cache contents
    assert busy.ttft_percentiles()["p99"] > 5 * timed.ttft_percentiles()["p99"]
    assert sorted(fast.ttft) == sorted(fast.ttft)  # deterministic
    assert timed.ttft_percentiles()["p50"] <= timed.ttft_percentiles()["p90"] <= timed.ttft_percentiles()["p99"]


def test_requests_larger_than_the_pool_are_counted_not_crashed(reqs):
    r = Simulator(cfg(gpu_bytes=10 * 4096)).run(reqs)
    assert 0 < r.rejected < len(reqs)


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"chunk_tokens": 500, "page_tokens": 16}, "multiple of page_tokens"),
        ({"routing": "random"}, "routing"),
        ({"replay": "slow"}, "replay"),
        ({"cpu_eviction": "arc"}, "cpu_eviction"),
        ({"cpu_bytes": 0, "disk_bytes": 1 << 30}, "needs a CPU tier"),
        ({"cpu_bytes": 100}, "smaller than one chunk"),
        ({"gpu_bytes": -1}, "gpu_bytes"),
        ({"instances": 0}, "instances"),
    ],
)
def test_bad_config_names_the_argument(kw, msg):
    with pytest.raises(ValueError, match=msg):
        cfg(**kw)


def test_result_serializes(reqs):
    d = Simulator(cfg(disk_bytes=1000 * 8192)).run(reqs[:200]).to_dict()
    assert set(d["hit_ratio"]) == {"gpu", "cpu", "disk", "peer", "total"}
    assert set(d["ttft_s"]) == {"p50", "p90", "p99", "mean"}
    assert d["config"]["cpu_chunks"] == 300 and d["config"]["disk_chunks"] == 999


def test_split_plan_is_priced_as_head_and_tail_at_once_then_the_rest():
    """A split plan: the head's prefill and the tail's load overlap (the pool loads the tail on
    a background thread while Engine.prefill computes the head), then the rest is computed."""
    from kvtier.sim.engine import request_load_parts_s, request_service_s
    from kvtier.sim.tiers import BeginResult

    model = ModelShape("m", 8e9, 32, 4096, 8, 128, 2)
    hw = HardwareCost(weights_rate=1e14, attention_rate=6e14, h2d_bw=5e10, disk_read_bw=1e9)
    ct, cb, n = 256, 256 * model.kv_bytes_per_token, 4096 + 100  # 16 full chunks
    for tail in (2, 12):  # compute-bound (2 chunks from disk) and load-bound (12)
        head = 14 - tail
        b = BeginResult(
            gpu_hits=2,
            lower_hits=tail,
            disk_hits=tail,
            split_head=head,
            offloaded=3,
            critical_writebacks=5,
            load_writebacks=4,
            planned_recompute=head,
        )
        pages, load = request_load_parts_s(hw, cb, b)
        assert pages == pytest.approx(3 * cb / hw.d2h_bw + 1 * cb / hw.disk_write_bw)
        assert load == pytest.approx(
            4 * cb / hw.disk_write_bw + tail * cb / hw.disk_read_bw + hw.disk_latency_s + tail * cb / hw.h2d_bw
        )
        head_s = hw.prefill_s(model, 2 * ct, (2 + head) * ct)
        rest_s = hw.prefill_s(model, 16 * ct, n)
        got = request_service_s(hw, model, ct, cb, b, n)
        assert got == pytest.approx(pages + max(head_s, load) + rest_s)
        assert (head_s > load) == (tail == 2)  # both regimes are exercised
        serial = pages + load + head_s + rest_s  # what pricing in series would say
        assert got < serial - min(head_s, load) * 0.99
    # without a split the same chunks are priced in series, from the end of the cached prefix
    b = BeginResult(gpu_hits=2, lower_hits=14, disk_hits=14)
    assert request_service_s(hw, model, ct, cb, b, n) == pytest.approx(
        sum(request_load_parts_s(hw, cb, b)) + hw.prefill_s(model, 16 * ct, n)
    )


class FixedSplit:
    """A plan_split planner: recompute the first half of the lower-tier prefix, load the rest."""

    def __init__(self) -> None:
        self.calls = 0

    def plan_split(self, pool, gpu_hit_chunks, tiers):
        self.calls += 1
        return len(tiers) // 2, len(tiers) - len(tiers) // 2


def test_simulator_takes_a_split_planner(reqs):
    planner = FixedSplit()
    base = cfg()
    res = Simulator(replace(base, planner=planner)).run(reqs)
    plain = Simulator(base).run(reqs)
    assert planner.calls > 0 and res.split_plans > 0
    assert res.planned_recompute > 0 and res.cpu_hits > 0
    assert res.cpu_hits < plain.cpu_hits  # the heads were recomputed, not loaded


def test_attention_rate_after_a_prefix_follows_the_measured_points():
    """``attention_after_prefix``: per new-token count, interpolated in log(tokens) between the
    measured points, clamped at both ends; a step without a cached prefix keeps ``attention_rate``."""
    from kvtier.sim.cost import MODEL_PRESETS, HardwareCost

    hw = HardwareCost(attention_rate=6e14, attention_after_prefix=((256, 1e14), (1024, 4e14)))
    assert hw.attention_rate_of(0, 300) == 6e14
    assert hw.attention_rate_of(1000, 1100) == 1e14  # 100 new tokens: below the first point
    assert hw.attention_rate_of(1000, 1512) == pytest.approx(2.5e14)  # 512: halfway in log
    assert hw.attention_rate_of(5000, 9000) == 4e14
    m = MODEL_PRESETS["llama3_8b"]
    slow = hw.prefill_s(m, 4096, 4352) - m.weight_flops(4096, 4352) / hw.weights_rate
    assert slow == pytest.approx(m.attention_flops(4096, 4352) / 1e14)
    assert HardwareCost(attention_rate=6e14).attention_rate_of(4096, 4352) == 6e14
