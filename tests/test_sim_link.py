"""The peers' links in kvtier.sim: `kvtier sim`'s link flags reach the cost model (bad values
refused, naming the flag), a pull is priced on the link of its path (same host or not), a faster
link never costs more, the calibration prefers a NIXL pull bench, and the link sweep."""

from __future__ import annotations

import itertools
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvtier.cli import main
from kvtier.sim import SimConfig, Simulator, synthetic_trace
from kvtier.sim.cost import CalibratedPlanner, Calibration, HardwareCost, ModelShape
from kvtier.sim.engine import request_load_parts_s, request_service_s
from kvtier.sim.gpu_pool import BeginResult
from kvtier.sim.report import link_crossover, link_sweep, link_sweep_rows
from kvtier.sim.trace import Request

BENCH = Path(__file__).resolve().parents[1] / "bench" / "results"
TINY = ModelShape("tiny", 1e6, 1, 64, 1, 2, 2)  # 8 bytes a token: one 4 KiB block a 512-token chunk
HW = HardwareCost(
    weights_rate=2e10, attention_rate=1e13, h2d_bw=40e6, d2h_bw=40e6, disk_read_bw=4e6, disk_write_bw=8e6, link_bw=10e6
)  # scaled so that the tiny chunks cost like real ones (as tests/test_sim_features.py)


def cfg(**kw) -> SimConfig:
    base = {
        "model": TINY,
        "chunk_tokens": 512,
        "page_tokens": 512,
        "gpu_bytes": 100 * 4096,
        "cpu_bytes": 300 * 4096,
        "hardware": HW,
    }
    return SimConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def reqs():
    return synthetic_trace(
        600, seed=5, prefixes=60, prefix_chunks=(2, 20), suffix_chunks=(1, 6), chunk_tokens=512, rate_per_s=50.0
    )


# -- the command line ----------------------------------------------------------------------------


def test_link_flags_reach_the_cost_model_over_the_calibration(tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["sim", "--trace", "synthetic:60", "--instances", "4", "--peers", "--no-ablation", "--replay", "fast"]
    assert main([*args, "--calibrate", str(BENCH), "--json", str(out)]) == 0
    calibrated = json.loads(out.read_text())
    assert calibrated["cost_model"]["link_gbps"] != 25.0  # so that the override below shows
    flags = ["--link-gbps", "25", "--link-latency-us", "40", "--hosts", "2", "--local-link-gbps", "100"]
    assert main([*args, "--calibrate", str(BENCH), *flags, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    doc = json.loads(out.read_text())
    cm, src = doc["cost_model"], doc["calibration"]
    assert cm["link_gbps"] == 25.0 and cm["local_link_gbps"] == 100.0
    assert src["link_bw"] == "--link-gbps (command line)"
    assert src["link_latency_s"] == "--link-latency-us (command line)"
    assert src["weights_rate"] == calibrated["calibration"]["weights_rate"]  # the rest still calibrated
    assert doc["runs"]["all tiers"]["config"]["hosts"] == 2
    assert "peer link 25.0 GB/s + 40 us; 2 hosts, same-host link 100 GB/s + 40 us" in text


def test_default_output_keeps_one_host_per_instance(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["sim", "--trace", "synthetic:40", "--instances", "3", "--no-ablation", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["runs"]["all tiers"]["config"]["hosts"] == 3 and "local_link_gbps" not in doc["cost_model"]
    assert "same-host link" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--link-gbps", "0"], "--link-gbps must be a positive number, got 0.0"),
        (["--link-gbps", "-4"], "--link-gbps must be a positive number"),
        (["--link-gbps", "nan"], "--link-gbps must be a positive number"),
        (["--link-gbps", "inf"], "--link-gbps must be a positive number"),
        (["--local-link-gbps", "0"], "--local-link-gbps must be a positive number"),
        (["--link-latency-us", "-1"], "--link-latency-us must be a non-negative number, got -1.0"),
        (["--local-link-latency-us", "nan"], "--local-link-latency-us must be a non-negative number"),
        (["--hosts", "0"], "--hosts must be from 1 to --instances (2), got 0"),
        (["--hosts", "3"], "--hosts must be from 1 to --instances (2), got 3"),
        (["--sweep-link", "1,,4"], "--sweep-link takes positive link speeds in GB/s"),
        (["--sweep-link", "1,0"], "got '0'"),
        (["--sweep-link", "fast"], "got 'fast'"),
    ],
)
def test_bad_link_values_are_refused_naming_the_flag(argv, message, capsys):
    assert main(["sim", "--trace", "synthetic:10", "--instances", "2", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--link-gbps", "--link-latency-us", "--local-link-gbps", "--local-link-latency-us"])
def test_a_link_flag_that_is_no_number_is_refused_naming_it(flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sim", "--trace", "synthetic:10", flag, "fast"])
    assert e.value.code == 2
    assert f"argument {flag}: invalid float value: 'fast'" in capsys.readouterr().err


def test_the_sweep_flag_gives_a_row_per_speed(tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = [
        "sim",
        "--trace",
        "synthetic:200",
        "--instances",
        "4",
        "--routing",
        "round_robin",
        "--no-ablation",
        "--replay",
        "fast",
    ]
    assert main([*argv, "--sweep-link", "1,12.5,100", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    sweep = json.loads(out.read_text())["link_sweep"]
    assert [r["link_gbps"] for r in sweep["rows"]] == [1.0, 12.5, 100.0]
    assert all(r["baseline_hit_ratio"] == sweep["rows"][0]["baseline_hit_ratio"] for r in sweep["rows"])
    assert all(r["peer_hit_ratio"] > 0 for r in sweep["rows"])
    assert "peer link sweep (4 instances, llama3_8b)" in text and "peers off: hit" in text
    assert "peers' median TTFT beats no peers" in text


# -- the cost of a pull, per path ----------------------------------------------------------------

sizes = st.integers(min_value=1, max_value=1 << 30)
rates = st.floats(min_value=1e6, max_value=1e12, allow_nan=False)
latencies = st.floats(min_value=0.0, max_value=1e-2, allow_nan=False)
counts = st.integers(min_value=0, max_value=200)


@settings(max_examples=200, deadline=None)
@given(sizes, rates, rates, latencies, counts, counts, st.booleans())
def test_a_faster_link_never_costs_more(chunk_bytes, bw_a, bw_b, latency, cross, near, same_host_link):
    slow, fast = sorted((bw_a, bw_b))
    field = "local_link_bw" if same_host_link else "link_bw"
    hw_slow = replace(HW, link_latency_s=latency, **{field: slow})
    hw_fast = replace(HW, link_latency_s=latency, **{field: fast})
    assert hw_fast.peer_pull_s(chunk_bytes, cross, near) <= hw_slow.peer_pull_s(chunk_bytes, cross, near)
    b = BeginResult(gpu_hits=1, lower_hits=cross + near, peer_hits=cross + near, peer_same_host=near)
    n = (1 + cross + near) * 512 + 7
    assert sum(request_load_parts_s(hw_fast, chunk_bytes, b, cross + near)) <= sum(
        request_load_parts_s(hw_slow, chunk_bytes, b, cross + near)
    )
    for overlap in (False, True):
        slow_o, fast_o = (replace(h, load_compute_overlap=overlap) for h in (hw_slow, hw_fast))
        assert request_service_s(fast_o, TINY, 512, chunk_bytes, b, n, cross + near) <= request_service_s(
            slow_o, TINY, 512, chunk_bytes, b, n, cross + near
        )
    planner_fast, planner_slow = CalibratedPlanner(hw_fast, TINY), CalibratedPlanner(hw_slow, TINY)
    assert planner_fast.load_s("peer", chunk_bytes) <= planner_slow.load_s("peer", chunk_bytes)


def test_each_path_is_priced_on_its_own_link():
    cb = 1 << 20
    hw = replace(HW, link_bw=1e9, link_latency_s=100e-6, local_link_bw=50e9, local_link_latency_s=5e-6)
    assert hw.peer_pull_s(cb, 3) == pytest.approx(3 * cb / 1e9 + 100e-6)
    assert hw.peer_pull_s(cb, 0, 3) == pytest.approx(3 * cb / 50e9 + 5e-6)
    assert hw.peer_pull_s(cb, 2, 1) == pytest.approx(2 * cb / 1e9 + 100e-6 + cb / 50e9 + 5e-6)
    assert hw.peer_pull_s(cb, 0, 0) == 0.0
    for near, link, lat in ((0, 1e9, 100e-6), (4, 50e9, 5e-6)):
        b = BeginResult(lower_hits=4, peer_hits=4, peer_same_host=near)
        assert request_load_parts_s(hw, cb, b, 4)[1] == pytest.approx(4 * cb / link + lat + 4 * cb / hw.h2d_bw)
    # without a same-host link of its own, a same-host pull costs what a pull between hosts does
    plain = replace(HW, link_bw=3e9, link_latency_s=7e-6)
    assert plain.peer_pull_s(cb, 0, 5) == plain.peer_pull_s(cb, 5, 0) == 5 * cb / 3e9 + 7e-6


def _shared_prefix_requests(n: int = 3):
    """``n`` requests of the same 8 chunks, one an instance (round robin), far apart in time."""
    return [
        Request(arrival_s=10.0 * i, input_length=8 * 512 + 5, output_length=1, chunks=tuple(range(8))) for i in range(n)
    ]


@pytest.mark.parametrize(
    "hosts, same_host_chunks",
    [
        (None, 0),  # one host each: every pull crosses hosts (the default)
        (4, 0),
        (3, 8),  # instance 3 shares host 0 with instance 0
        (2, 16),  # hosts {0, 2} and {1, 3}: instance 3 asks instance 1 before instance 0
        (1, 24),  # one host: every pull stays on it
    ],
)
def test_same_host_peers_are_asked_first_and_counted(hosts, same_host_chunks):
    """Instance 0 computes the prefix; instances 1, 2 and 3 pull it in turn, each from the first
    peer that holds it: a peer on its own host before those of other hosts, else by index."""
    res = Simulator(cfg(instances=4, hosts=hosts, peers=True, write_through=True)).run(_shared_prefix_requests(4))
    assert res.peer_hits == 24
    assert res.peer_same_host_hits == same_host_chunks
    assert res.to_dict()["peer_same_host_chunks"] == same_host_chunks
    assert res.to_dict()["config"]["hosts"] == (4 if hosts is None else hosts)


def test_a_same_host_pull_pays_the_same_host_link():
    fast_near = replace(HW, local_link_bw=HW.link_bw * 1000, local_link_latency_s=0.0)
    far = Simulator(cfg(instances=3, peers=True, write_through=True, hardware=fast_near)).run(_shared_prefix_requests())
    near = Simulator(cfg(instances=3, hosts=2, peers=True, write_through=True, hardware=fast_near)).run(
        _shared_prefix_requests()
    )
    assert far.ttft[:2] == near.ttft[:2]  # the first two requests are the same in both
    assert near.ttft[2] < far.ttft[2]  # the third pulls from its own host in one, across hosts in the other
    assert near.ttft[2] == pytest.approx(far.ttft[2] - 8 * 4096 / HW.link_bw - HW.link_latency_s, rel=1e-3, abs=2e-4)


def test_hosts_equal_to_instances_is_the_default(reqs):
    a = Simulator(cfg(instances=4, peers=True)).run(reqs)
    b = Simulator(cfg(instances=4, hosts=4, peers=True)).run(reqs)
    assert a.peer_hits > 0 and a.ttft == b.ttft and a.peer_hits == b.peer_hits and b.peer_same_host_hits == 0


@pytest.mark.parametrize("hosts", [0, 5, True, 2.0])
def test_bad_hosts_are_refused(hosts):
    with pytest.raises(ValueError, match="hosts must be an int from 1 to instances=4"):
        cfg(instances=4, hosts=hosts)


# -- calibration ---------------------------------------------------------------------------------


def _bench_dir(tmp_path: Path) -> Path:
    d = tmp_path / "results"
    d.mkdir()
    for pattern in ("bench_copy_py-*-h200-*.json", "bench_disk-*-h200host-*.json", "bench_p2p-*.json"):
        for f in BENCH.glob(pattern):
            shutil.copy(f, d)
    return d


def test_calibration_takes_the_tcp_pull_without_a_nixl_bench(tmp_path):
    hw = Calibration(str(_bench_dir(tmp_path))).hardware()
    assert hw.sources["link_bw"].endswith(":p2p_pull_crc32c")
    assert "link_latency_s" not in hw.sources and hw.link_latency_s == HardwareCost().link_latency_s


def test_calibration_prefers_a_nixl_pull(tmp_path):
    d = _bench_dir(tmp_path)
    doc = {
        "bench": "bench_p2p_nixl",
        "workload": "llama3_8b_4096tok",
        "machine": "test",
        "date": "2000-01-01",  # older than the TCP bench: the NIXL case still wins
        "results": [
            {"case": "p2p_pull_nixl_latency", "value": 35.0, "unit": "us"},
            {"case": "p2p_pull_nixl_ucx_rdma", "value": 21.5, "unit": "GB/s"},
        ],
    }
    (d / "bench_p2p_nixl-llama3_8b_4096tok-cpu-2000-01-01.json").write_text(json.dumps(doc))
    hw = Calibration(str(d)).hardware()
    assert hw.link_bw == pytest.approx(21.5e9)
    assert hw.link_latency_s == pytest.approx(35e-6)
    assert hw.sources["link_bw"] == "bench_p2p_nixl-llama3_8b_4096tok-cpu-2000-01-01.json:p2p_pull_nixl_ucx_rdma"
    assert hw.sources["link_latency_s"].endswith(":p2p_pull_nixl_latency")


# -- the sweep -----------------------------------------------------------------------------------


def test_link_sweep_gives_a_row_per_speed_beside_one_baseline(reqs):
    speeds = [1e6, 10e6, 100e6, 1e9]
    base, rows = link_sweep(reqs, cfg(instances=4), speeds)
    assert [bw for bw, _ in rows] == speeds
    assert base.peer_hits == 0 and all(r.peer_hits > 0 for _, r in rows)
    assert all(r.config.hardware.link_bw == bw and r.config.peers for bw, r in rows)
    # round robin: which chunks hit does not depend on time, so no request's TTFT grows with the link
    for (_, slow), (_, fast) in itertools.pairwise(rows):
        assert slow.peer_hits == fast.peer_hits
        assert all(f <= s + 1e-12 for s, f in zip(slow.ttft, fast.ttft, strict=True))
    table = link_sweep_rows(base, rows)
    assert [d["link_gbps"] for d in table] == [bw / 1e9 for bw in speeds]
    for d, (_, r) in zip(table, rows, strict=True):
        assert d["ratio_p50"] == pytest.approx(base.ttft_percentiles()["p50"] / r.ttft_percentiles()["p50"])
    cross = link_crossover(base, rows)
    faster = [r for bw, r in rows if cross is not None and bw >= cross]
    assert all(r.ttft_percentiles()["p50"] < base.ttft_percentiles()["p50"] for r in faster)
    slower = [r for bw, r in rows if cross is None or bw < cross]
    assert not slower or slower[-1].ttft_percentiles()["p50"] >= base.ttft_percentiles()["p50"]


def test_link_sweep_rebuilds_the_calibrated_planner_per_speed(reqs):
    _, rows = link_sweep(reqs[:200], cfg(instances=4, planner=CalibratedPlanner(HW, TINY)), [1e6, 1e9])
    for bw, r in rows:
        assert r.config.planner.hw.link_bw == bw
    assert rows[0][1].peer_hits <= rows[1][1].peer_hits  # a slow link: the planner recomputes more


def test_link_sweep_refuses_a_zero_link(reqs):
    with pytest.raises(ValueError, match="link bandwidth must be > 0"):
        link_sweep(reqs[:10], cfg(instances=2), [0.0])
