"""Load-or-recompute planning: the cost model, the built-in planner, and a custom planner in the pool."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from kvtier.planner import CostModelPlanner, LoadPlanner, ModelCost
from kvtier.pool import PagedKVPool


def fake_pool(chunk_tokens=256, chunk_bytes=32 << 20):
    return SimpleNamespace(chunk_tokens=chunk_tokens, layout=SimpleNamespace(chunk_bytes=chunk_bytes))


def test_prefill_cost_is_additive_and_grows_with_position():
    m = ModelCost.llama3_8b()
    assert m.prefill_seconds(0, 8192) == pytest.approx(m.prefill_seconds(0, 4096) + m.prefill_seconds(4096, 8192))
    assert m.prefill_seconds(30000, 30256) > m.prefill_seconds(0, 256)


def test_slow_tier_chunks_are_recomputed_fast_ones_loaded():
    # Llama-3-8B chunk of 256 tokens = 32 MiB of KV; at 400 TFLOP/s its prefill takes ~10 ms.
    planner = CostModelPlanner(ModelCost.llama3_8b(), bandwidth={"cpu": 50e9, "disk": 1.5e9})
    n = planner.plan(fake_pool(), 0, ["cpu", "cpu", "disk", "cpu"])
    assert n == 2  # 32 MiB / 1.5 GB/s = 22 ms > ~10 ms of prefill: the disk chunk is recomputed
    assert planner.last_plan["load_chunks"] == 2
    rows = planner.last_plan["per_chunk"]
    assert rows[2]["tier"] == "disk" and rows[2]["load_s"] > rows[2]["recompute_s"]
    assert planner.decisions == {"load": 2, "recompute": 2}


def test_disk_wins_deep_in_a_long_prompt():
    planner = CostModelPlanner(ModelCost.llama3_8b(), bandwidth={"cpu": 50e9, "disk": 3e9})
    near = planner.plan(fake_pool(), 0, ["disk"])
    far = planner.plan(fake_pool(), 400, ["disk"])  # 100k tokens in: attention makes prefill dear
    assert near == 0 and far == 1


def test_peer_chunks_are_priced_not_dropped():
    # Chunks peers hold are loaded where pulling beats recomputing, as for any tier; a tier with no
    # bandwidth (here: a planner built before peers were priced) is never loaded from.
    planner = CostModelPlanner(ModelCost.llama3_8b())
    assert planner.bandwidth["peer"] == 2e9
    near = planner.plan(fake_pool(), 0, ["peer"])
    far = planner.plan(fake_pool(), 400, ["peer"])  # 100k tokens in: attention makes prefill dear
    rows = planner.last_plan["per_chunk"]
    assert near == 0 and far == 1 and rows[0]["load_s"] < rows[0]["recompute_s"]
    no_peer = CostModelPlanner(ModelCost.llama3_8b(), bandwidth={"cpu": 50e9, "disk": 3e9})
    assert no_peer.plan(fake_pool(), 400, ["peer"]) == 0


def test_calibration_takes_the_peers_measured_pull_rate():
    source = SimpleNamespace(rate=None, close=lambda: None)
    source.pull_rate = lambda: source.rate
    pool = PagedKVPool(
        num_layers=2,
        kv_heads=2,
        head_dim=64,
        num_pages=64,
        page_tokens=16,
        chunk_tokens=64,
        dtype=torch.float32,
        cpu_bytes=64 << 20,
        peers=lambda cache: source,
    )
    planner = CostModelPlanner(ModelCost.llama3_8b())
    source.rate = None  # peers, nothing pulled yet
    planner.calibrate(pool)
    assert planner.bandwidth["peer"] == 2e9  # the default stands
    source.rate = 1e9
    cpu = planner.calibrate(pool)
    # The pull into the CPU tier, then the copy into pages, one after the other.
    assert planner.bandwidth["peer"] == pytest.approx(1.0 / (1.0 / 1e9 + 1.0 / cpu))
    pool.close()


def test_custom_planner_replaces_the_builtin_in_the_pool():
    class RecomputeEverything:
        def __init__(self):
            self.calls = []

        def plan(self, pool, gpu_hit_chunks, tiers):
            self.calls.append((gpu_hit_chunks, list(tiers)))
            return 0

    planner = RecomputeEverything()
    assert isinstance(planner, LoadPlanner)
    pool = PagedKVPool(
        num_layers=1,
        kv_heads=1,
        head_dim=8,
        num_pages=4,
        page_tokens=4,
        chunk_tokens=8,
        dtype=torch.float32,
        cpu_bytes=64 * 4096,
        planner=planner,
    )
    a = list(range(16))
    s = pool.begin(a)
    pool.commit(s, a)
    pool.release(s)
    b = list(range(100, 116))  # evicts a's two chunks to the CPU tier
    s = pool.begin(b)
    pool.commit(s, b)
    pool.release(s)
    s = pool.begin(a)
    assert planner.calls == [(0, ["cpu", "cpu"])]
    assert s.cached_tokens == 0 and s.planned_recompute_tokens == 16
    assert pool.stats()["planned_recompute_chunks"] == 2


def test_calibration_measures_the_cpu_tier():
    pool = PagedKVPool(
        num_layers=2,
        kv_heads=2,
        head_dim=64,
        num_pages=64,
        page_tokens=16,
        chunk_tokens=64,
        dtype=torch.float32,
        cpu_bytes=64 << 20,
    )
    planner = CostModelPlanner(ModelCost.llama3_8b(), bandwidth={"cpu": 1.0, "disk": 1.0})
    bw = planner.calibrate(pool)
    assert bw > 1e8 and planner.bandwidth["cpu"] == bw  # a memcpy moves far more than 100 MB/s
    assert pool.stats()["pages_free"] == 64


def test_model_cost_calibrates_from_a_timed_prefill():
    import time as _time

    def fake_prefill(tokens):  # a "GPU" doing 2 * 1e6 * tokens FLOPs at 1e9 FLOP/s
        _time.sleep(2 * 1e6 * tokens / 1e9)

    m = ModelCost.measured(params=1e6, layers=1, hidden=1, prefill_fn=fake_prefill, tokens=100, reps=2)
    assert 0.5e9 < m.flops_per_s <= 1.05e9  # sleep overshoots, never undershoots


def test_planner_decision_is_visible_in_pool_stats():
    planner = CostModelPlanner(ModelCost.llama3_8b(), bandwidth={"cpu": 50e9, "disk": 1.5e9})
    pool = PagedKVPool(
        num_layers=1,
        kv_heads=1,
        head_dim=8,
        num_pages=4,
        page_tokens=4,
        chunk_tokens=8,
        dtype=torch.float32,
        cpu_bytes=64 * 4096,
        planner=planner,
    )
    for toks in (list(range(16)), list(range(100, 116))):
        s = pool.begin(toks)
        pool.commit(s, toks)
        pool.release(s)
    s = pool.begin(list(range(16)))
    plan = pool.stats()["planner"]
    assert plan["lower_chunks"] == 2 and plan["load_chunks"] == 2 and plan["per_chunk"][0]["tier"] == "cpu"


def test_split_plan_balances_head_recompute_against_tail_load():
    from kvtier.planner import SplitCostModelPlanner

    cost = ModelCost.llama3_8b()
    slow = SplitCostModelPlanner(cost, bandwidth={"cpu": 50e9, "disk": 1.0e9})
    head, load = slow.plan_split(fake_pool(), 0, ["disk"] * 64)
    assert 0 < head < 64 and head + load == 64
    plan = slow.last_plan["modelled_s"]
    assert plan["split"] < min(plan["recompute"], plan["load"])  # beats both
    # the balance point: moving one chunk either way makes the slower side slower
    t = lambda r: max(cost.prefill_seconds(0, r * 256), (64 - r) * slow.chunk_seconds("disk", 32 << 20))  # noqa: E731
    assert t(head) <= t(head - 1) and t(head) <= t(head + 1)
    fast = SplitCostModelPlanner(cost, bandwidth={"cpu": 50e9, "disk": 1.0e9})
    assert fast.plan_split(fake_pool(), 0, ["cpu"] * 4) == (0, 4)  # a CPU tier: load it all
    dead = SplitCostModelPlanner(cost, bandwidth={"cpu": 50e9})  # no disk bandwidth: recompute
    assert dead.plan_split(fake_pool(), 0, ["disk"] * 8) == (8, 0)
    assert not hasattr(CostModelPlanner(cost), "plan_split")  # the split is opt-in


def test_a_codec_prices_loads_by_stored_bytes_plus_decode():
    from kvtier.planner import CodecCost

    # A Llama-3-8B chunk (32 MiB) on a 1.4 GB/s disk: 24 ms raw, ~12 ms as fp8 (1.97x) plus its
    # decode; ~10 ms of prefill near the start, more deeper in.
    raw = CostModelPlanner(ModelCost.llama3_8b(), bandwidth={"cpu": 50e9, "disk": 1.4e9})
    fast = CodecCost("fp8", ratio=1.97, decode_bytes_per_s=100e9, decode_on_gpu=True)
    slow = CodecCost("fp8", ratio=1.97, decode_bytes_per_s=0.5e9)  # decoded on one CPU core
    fp8 = CostModelPlanner(ModelCost.llama3_8b(), bandwidth={"cpu": 50e9, "disk": 1.4e9}, codec=fast)
    at = 40  # 10k tokens in
    assert raw.plan(fake_pool(), at, ["disk"]) == 0
    assert fp8.plan(fake_pool(), at, ["disk"]) == 1
    assert fp8.last_plan["codec"] == "fp8"
    cb = 32 << 20
    assert fp8.chunk_seconds("disk", cb) == pytest.approx(cb / 1.97 / 1.4e9 + 100e-6 + cb / 100e9)
    # decoded on the host, the CPU tier's copy moves the whole chunk; on the GPU, the stored bytes
    assert raw.chunk_seconds("cpu", cb, slow) == pytest.approx(cb / 50e9 + 20e-6 + cb / 0.5e9)
    assert raw.chunk_seconds("cpu", cb, fast) == pytest.approx(cb / 1.97 / 50e9 + 20e-6 + cb / 100e9)
    assert CostModelPlanner(ModelCost.llama3_8b(), codec=slow).plan(fake_pool(), at, ["disk"]) == 0
    with pytest.raises(ValueError, match="ratio"):
        CodecCost("fp8", ratio=0)


def test_calibration_with_a_codec_measures_its_decode():
    pool = PagedKVPool(
        num_layers=2,
        kv_heads=2,
        head_dim=64,
        num_pages=64,
        page_tokens=16,
        chunk_tokens=64,
        dtype=torch.bfloat16,
        cpu_bytes=16 << 20,
        method="cpu",
        codec_name="fp8",
    )
    planner = CostModelPlanner(ModelCost.llama3_8b(), bandwidth={"cpu": 1.0, "disk": 1.0})
    bw = planner.calibrate(pool)
    codec = planner.codec
    assert codec is not None and codec.name.startswith("fp8/")
    assert codec.ratio == pool.layout.chunk_bytes / pool.cache.tier.blob_bytes
    assert codec.ratio > 1.5  # 64-element rows: a bf16 scale per 64 bytes of e4m3, then the header
    assert codec.decode_bytes_per_s > 1e6 and bw == planner.bandwidth["cpu"] > 1e6
    planner.plan(pool, 0, ["cpu"])
    assert planner.last_plan["codec"] == codec.name
    assert planner.last_plan["per_chunk"][0]["load_s"] > pool.layout.chunk_bytes / codec.decode_bytes_per_s
    assert pool.stats()["pages_free"] == 64
