"""Predicted vs measured TTFT of bench_e2e (Llama-3-8B-shaped, H100): the cost model calibrated from
kvtier's bench JSON files (bandwidths, matmul rate, and the recompute TTFT at 4096 tokens only),
bench_e2e's steps replayed through the simulated tiers. Every other case is a prediction and must
land within 15% of the measurement, except the cases listed in KNOWN_MISSES, documented in
docs/sim.md with their reasons (they are reported, not fitted away).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from kvtier.sim.cost import MODEL_PRESETS, Calibration
from kvtier.sim.validate import compare_e2e, e2e_predictions, format_table

BENCH = Path(__file__).resolve().parents[1] / "bench" / "results"

# The run docs/sim.md discusses (bench_e2e of 2026-11-27 00:xx, recompute at 4096 = 0.6645 s).
# (case, tokens): why the prediction misses it by more than 15%.
DOCUMENTED_RUN_RECOMPUTE_4096 = 0.6645
KNOWN_MISSES = {
    ("disk_hit", 4096): "-15.0%: 23 more write-backs share the disk with the reads; only the 11 it waits for are priced",
    ("disk_hit_planned", 4096): "the disk evicted the prompt's head (reproduced: 0 chunks loaded); the bench "
                                "also waited for all 34 write-backs (1.29 s), the model for 11",
    ("disk_hit_planned", 16384): "measured 18% faster than the identical unplanned disk hit (3.08 s): run-to-run spread",
    ("half_prefix_gpu_hit", 4096): "-16%: half the prompt measured at 60% of a full recompute",
    ("half_prefix_gpu_hit", 16384): "+23%: half the prompt measured at 42% of a full recompute (< 50%)",
}


@pytest.fixture(scope="module")
def comparison():
    if not list(BENCH.glob("bench_e2e-llama3_8b_ttft-h100-*.json")):
        pytest.skip(f"no bench_e2e H100 results in {BENCH}")
    return compare_e2e(str(BENCH), calibrate_tokens=4096)


def documented_run(rows) -> bool:
    return any(r.case == "recompute" and r.tokens == 4096 and r.measured_s == DOCUMENTED_RUN_RECOMPUTE_4096
               for r in rows)


def test_ttft_predictions_within_15_percent(comparison):
    rows, _ = comparison
    print("\n" + format_table(rows))
    assert len(rows) == 18
    calib = [r for r in rows if r.role == "calibration"]
    assert [(r.case, r.tokens) for r in calib] == [("recompute", 4096)]
    assert abs(calib[0].error) < 1e-9  # fitted to itself, by construction: and only that one
    preds = [r for r in rows if r.role == "prediction"]
    within = sum(1 for r in preds if abs(r.error) <= 0.15)
    if not documented_run(rows):
        # bench/results holds a newer H100 run than docs/sim.md discusses: its misses are not
        # reviewed yet, so only the overall level is held (update KNOWN_MISSES and the docs).
        assert within >= len(preds) * 2 // 3, format_table(rows)
        return
    misses = {(r.case, r.tokens): f"{r.error:+.1%}" for r in preds
              if abs(r.error) > 0.15 and (r.case, r.tokens) not in KNOWN_MISSES}
    assert not misses, misses
    assert within >= 12


def test_calibration_names_its_sources(comparison):
    _, hw = comparison
    assert set(hw.sources) >= {"h2d_bw", "d2h_bw", "attention_rate", "disk_read_bw", "disk_write_bw",
                               "weights_rate"}
    assert hw.sources["weights_rate"].endswith("ttft_recompute_4096")
    assert 40e9 < hw.h2d_bw < 60e9 and 0.5e9 < hw.disk_read_bw < 3e9


def test_the_bench_steps_leave_the_tiers_as_the_bench_found_them(comparison):
    rows, _ = comparison
    if not documented_run(rows):
        pytest.skip("the bench_e2e notes checked here are those of the run docs/sim.md discusses")
    found = {(r.case, r.tokens): r.detail for r in rows}
    for n in (4096, 16384, 32768):
        full = (n - 1) // 256
        assert found[("gpu_hit", n)]["gpu_chunks"] == full
        assert found[("cpu_hit", n)]["lower_chunks"] == full and found[("cpu_hit", n)]["disk_chunks"] == 0
        assert found[("disk_hit", n)]["disk_chunks"] == full  # bench notes: 3840 / 16128 / 32512 tokens
        assert found[("half_prefix_gpu_hit", n)]["gpu_chunks"] == n // 2 // 256
    # bench notes for the planner: 4k "0 loaded, 0 recomputed", 16k all loaded, 32k all recomputed
    assert found[("disk_hit_planned", 4096)]["lower_chunks"] == 0
    assert found[("disk_hit_planned", 4096)]["planned_recompute_chunks"] == 0
    assert found[("disk_hit_planned", 16384)]["lower_chunks"] == 63
    assert found[("disk_hit_planned", 32768)]["planned_recompute_chunks"] == 127


def test_prediction_needs_no_measurement_of_the_case():
    hw = Calibration(str(BENCH)).hardware()  # no bench_e2e at all: default GEMM rate
    pred = e2e_predictions(8192, hw, MODEL_PRESETS["llama3_8b"])
    assert pred["gpu_hit"]["ttft_s"] < pred["cpu_hit"]["ttft_s"] < pred["recompute"]["ttft_s"]
    assert pred["disk_hit"]["writebacks_waited"] > 0


@pytest.mark.parametrize("path", sorted(BENCH.glob("bench_e2e-llama3_8b_ttft*-h100-*.json")), ids=lambda p: p.name)
def test_every_h100_run_reproduces_the_bench_notes(path):
    """Whatever run: the simulated steps load from disk what the bench loaded, and the planner
    (bench_e2e's own object with its recorded inputs) loads / recomputes what it did."""
    import json
    import re

    rows, _ = compare_e2e(str(BENCH), e2e_glob=path.name)
    found = {(r.case, r.tokens): r.detail for r in rows}
    notes = 0
    for r in json.loads(path.read_text())["results"]:
        note, case = r.get("note", ""), r["case"]
        if m := re.match(r"(\d+) tokens loaded from disk", note):
            n = int(case.rsplit("_", 1)[1])
            assert found[("disk_hit", n)]["disk_chunks"] * 256 == int(m.group(1)), case
            notes += 1
        if m := re.match(r"planner: (\d+) tokens loaded, (\d+) recomputed", note):
            n = int(case.rsplit("_", 1)[1])
            d = found[("disk_hit_planned", n)]
            assert (d["lower_chunks"] * 256, d["planned_recompute_chunks"] * 256) == \
                (int(m.group(1)), int(m.group(2))), (case, d)
            notes += 1
        if m := re.match(r"split planner: (\d+) tokens recomputed while (\d+) were read from disk \((\d+) landed\)",
                         note):
            # SplitCostModelPlanner, the same object type and inputs: the same head, the same tail
            n = int(case.rsplit("_", 1)[1])
            d = found[("disk_hit_split", n)]
            assert d["split_head_chunks"] * 256 == int(m.group(1)), (case, d)
            assert (d["split_head_chunks"] + d["lower_chunks"]) * 256 == int(m.group(1)) + int(m.group(2))
            assert d["lower_chunks"] * 256 == int(m.group(3)) and d["disk_chunks"] == d["lower_chunks"], (case, d)
            notes += 1
    splits = sum(1 for r in json.loads(path.read_text())["results"] if r["case"].startswith("ttft_disk_hit_split_"))
    assert notes == 6 + splits


# The four H100 runs of 2026-11-27 docs/sim.md compares (hosts differ: the recompute at 4096
# tokens spans 0.43-0.87 s across them). Each is predicted with the GEMM rate from its own
# 4096-token recompute; the medians across runs are compared.
RUNS = ("bench_e2e-llama3_8b_ttft-h100-2026-11-27.json", "bench_e2e-llama3_8b_ttft_aa-h100-2026-11-27.json",
        "bench_e2e-llama3_8b_ttft_decode64-h100-2026-11-27.json",
        "bench_e2e-llama3_8b_ttft_split-h100-2026-11-27.json")
# (case, tokens): why the median prediction misses the median measurement by more than 15%
# (docs/sim.md, "Across runs").
MEDIAN_MISSES = {
    ("disk_hit", 4096): "-20%: write-backs beside the reads are not priced (only those waited for)",
    ("disk_hit_split", 4096): "-40%: the measured split is no faster than head + tail in series",
    ("disk_hit_split", 16384): "-24%: the overlap measured is partial, the model prices it as full",
    ("half_prefix_gpu_hit", 4096): "-15.7%: half a prompt measured 41-81% of a recompute across runs (FLOPs: 50%)",
    ("gpu_hit", 32768): "-19%: a fixed per-request cost the model lacks (0.045 vs 0.056 s)",
    ("disk_hit", 32768): "+16%: 1.15 GB/s (bench_disk) vs 0.76-0.83 GB/s the later runs measured",
}


@pytest.fixture(scope="module")
def runs():
    missing = [r for r in RUNS if not (BENCH / r).exists()]
    if missing:
        pytest.skip(f"missing {missing}")
    from kvtier.sim.validate import compare_e2e

    return {r: compare_e2e(str(BENCH), e2e_glob=r, calibrate_tokens=4096)[0] for r in RUNS}


def test_cross_run_medians_within_15_percent(runs):
    from kvtier.sim.validate import cross_run_table, format_cross_run_table

    table = cross_run_table(runs)
    print("\n" + format_cross_run_table(table, list(RUNS)))
    assert len(table) == 21  # 3 lengths x 7 cases (disk_hit_split in two of the runs)
    claimed = [c for c in table if (c["case"], c["tokens"]) != ("recompute", 4096)]
    bad = {(c["case"], c["tokens"]): f"{c['median_error']:+.1%}" for c in claimed
           if abs(c["median_error"]) > 0.15 and (c["case"], c["tokens"]) not in MEDIAN_MISSES}
    assert not bad, bad
    within = sum(1 for c in claimed if abs(c["median_error"]) <= 0.15)
    assert within >= len(claimed) - len(MEDIAN_MISSES) == 14
    # per run, against its own measurement (docs/sim.md: 12/17, 9/20, 9/17, 10/20)
    per_run = {name: sum(1 for r in rows if r.role == "prediction" and abs(r.error) <= 0.15)
               for name, rows in runs.items()}
    assert sum(per_run.values()) >= 40, per_run


def test_a_runs_own_disk_probe_outranks_the_hosts_disk_bench(tmp_path):
    """bench_e2e now records its disk's rates (disk_probe, measured apart from the cases): a run
    that has them is simulated with its own disk, one without keeps bench_disk's numbers."""
    import json
    import shutil

    for f in BENCH.glob("*.json"):
        if not f.name.startswith("bench_e2e"):
            shutil.copy(f, tmp_path / f.name)
    src = BENCH / "bench_e2e-llama3_8b_ttft_split-h100-2026-11-27.json"
    doc = json.loads(src.read_text())
    run = tmp_path / "bench_e2e-llama3_8b_ttft-h100-2026-11-27.json"
    run.write_text(json.dumps(doc))
    model = MODEL_PRESETS["llama3_8b"]
    without = Calibration(str(tmp_path)).hardware(e2e_file=str(run), model=model)
    assert "bench_disk" in without.sources["disk_read_bw"]
    doc["disk_probe"] = {"read_gbps": 0.8, "write_gbps": 1.5, "bytes": 1 << 30, "block_bytes": 32 << 20}
    run.write_text(json.dumps(doc))
    hw = Calibration(str(tmp_path)).hardware(e2e_file=str(run), model=model)
    assert (hw.disk_read_bw, hw.disk_write_bw) == (0.8e9, 1.5e9)
    assert hw.sources["disk_read_bw"].endswith("disk_probe.read_gbps")
    rows, _ = compare_e2e(str(tmp_path))
    slow = {(r.case, r.tokens): r.predicted_s for r in rows}
    rows0, _ = compare_e2e(str(BENCH), e2e_glob=src.name)
    fast = {(r.case, r.tokens): r.predicted_s for r in rows0}
    assert slow[("disk_hit", 32768)] > fast[("disk_hit", 32768)]  # a slower disk, a slower disk hit
    assert slow[("gpu_hit", 32768)] == fast[("gpu_hit", 32768)]
