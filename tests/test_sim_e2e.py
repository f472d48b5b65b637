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

# Frozen bench results (tests/data/README.md): the runs validated here and the files they are
# calibrated from, not whatever bench/results holds now.
BENCH = Path(__file__).resolve().parent / "data" / "sim_validation"

# The first H100 run (bench_e2e-llama3_8b_ttft-h100-*, chunked prefill), compare_e2e's default.
# (case, tokens): why the prediction misses it by more than 15%.
KNOWN_MISSES = {
    (
        "disk_hit",
        4096,
    ): "-15.0%: 23 more write-backs share the disk with the reads; only the 11 it waits for are priced",
    ("disk_hit_planned", 4096): "the disk evicted the prompt's head (reproduced: 0 chunks loaded); the bench "
    "also waited for all 34 write-backs (1.29 s), the model for 11",
    (
        "disk_hit_planned",
        16384,
    ): "measured 18% faster than the identical unplanned disk hit (3.08 s): run-to-run spread",
    ("half_prefix_gpu_hit", 4096): "-16%: half the prompt measured at 60% of a full recompute",
    ("half_prefix_gpu_hit", 16384): "+23%: half the prompt measured at 42% of a full recompute (< 50%)",
}


@pytest.fixture(scope="module")
def comparison():
    if not list(BENCH.glob("bench_e2e-llama3_8b_ttft-h100-*.json")):
        pytest.skip(f"no bench_e2e H100 results in {BENCH}")
    return compare_e2e(str(BENCH), calibrate_tokens=4096)


def test_ttft_predictions_within_15_percent(comparison):
    rows, _ = comparison
    print("\n" + format_table(rows))
    assert len(rows) == 18
    calib = [r for r in rows if r.role == "calibration"]
    assert [(r.case, r.tokens) for r in calib] == [("recompute", 4096)]
    assert abs(calib[0].error) < 1e-9  # fitted to itself, by construction: and only that one
    preds = [r for r in rows if r.role == "prediction"]
    within = sum(1 for r in preds if abs(r.error) <= 0.15)
    misses = {
        (r.case, r.tokens): f"{r.error:+.1%}"
        for r in preds
        if abs(r.error) > 0.15 and (r.case, r.tokens) not in KNOWN_MISSES
    }
    assert not misses, misses
    assert within >= 12


def test_calibration_names_its_sources(comparison):
    _, hw = comparison
    assert set(hw.sources) >= {"h2d_bw", "d2h_bw", "attention_rate", "disk_read_bw", "disk_write_bw", "weights_rate"}
    assert hw.sources["weights_rate"].endswith("ttft_recompute_4096")
    assert 40e9 < hw.h2d_bw < 60e9 and 0.5e9 < hw.disk_read_bw < 3e9


def test_the_bench_steps_leave_the_tiers_as_the_bench_found_them(comparison):
    rows, _ = comparison
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


# The write-back bound 4 run (_writebacks4): its split plans at 4k and 16k put one chunk more in the tail
# than the simulated tiers do, (head, tail) in chunks: the bench's vs the simulator's. The bench's
# planner (same object, same inputs) chooses 10 + 5 at 4k (47 + 16 at 16k) if the prompt's last 3
# chunks are still in the CPU tier; the simulated tiers keep its last 1 there. At bound 4 the
# asynchronous write-backs' timing decides how many (the simulator ends one per 200 us poll).
WRITEBACKS4_SPLITS = {4096: ((10, 5), (11, 4)), 16384: ((47, 16), (48, 15))}


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
            # bench_e2e counts every lower-tier token here (g.lower_hit_tokens), the CPU tier's too
            assert found[("disk_hit", n)]["lower_chunks"] * 256 == int(m.group(1)), case
            notes += 1
        if m := re.match(r"planner: (\d+) tokens loaded, (\d+) recomputed", note):
            n = int(case.rsplit("_", 1)[1])
            d = found[("disk_hit_planned", n)]
            assert (d["lower_chunks"] * 256, d["planned_recompute_chunks"] * 256) == (
                int(m.group(1)),
                int(m.group(2)),
            ), (case, d)
            notes += 1
        if m := re.match(
            r"split planner: (\d+) tokens recomputed while (\d+) were read from disk \((\d+) landed\)", note
        ):
            # SplitCostModelPlanner, the same object type and inputs: the same head, the same tail
            n = int(case.rsplit("_", 1)[1])
            d = found[("disk_hit_split", n)]
            if "_writebacks4-" in path.name and n in WRITEBACKS4_SPLITS:  # the known difference, exactly
                bench, sim = WRITEBACKS4_SPLITS[n]
                assert (int(m.group(1)) // 256, int(m.group(2)) // 256) == bench, case
                assert (d["split_head_chunks"], d["lower_chunks"]) == sim, (case, d)
                notes += 1
                continue
            assert d["split_head_chunks"] * 256 == int(m.group(1)), (case, d)
            assert (d["split_head_chunks"] + d["lower_chunks"]) * 256 == int(m.group(1)) + int(m.group(2))
            assert d["lower_chunks"] * 256 == int(m.group(3)) and d["disk_chunks"] == d["lower_chunks"], (case, d)
            notes += 1
    splits = sum(1 for r in json.loads(path.read_text())["results"] if r["case"].startswith("ttft_disk_hit_split_"))
    assert notes == 6 + splits


# The four chunked-prefill H100 runs docs/sim.md compares (hosts differ: the recompute at 4096
# tokens spans 0.43-0.87 s across them). Each is predicted with the GEMM rate from its own
# 4096-token recompute; the medians across runs are compared.
RUNS = (
    "bench_e2e-llama3_8b_ttft-h100-2026-11-27.json",
    "bench_e2e-llama3_8b_ttft_aa-h100-2026-11-27.json",
    "bench_e2e-llama3_8b_ttft_decode64-h100-2026-11-27.json",
    "bench_e2e-llama3_8b_ttft_split-h100-2026-11-27.json",
)
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
    bad = {
        (c["case"], c["tokens"]): f"{c['median_error']:+.1%}"
        for c in claimed
        if abs(c["median_error"]) > 0.15 and (c["case"], c["tokens"]) not in MEDIAN_MISSES
    }
    assert not bad, bad
    within = sum(1 for c in claimed if abs(c["median_error"]) <= 0.15)
    assert within >= len(claimed) - len(MEDIAN_MISSES) == 14
    # per run, against its own measurement (docs/sim.md: 12/17, 9/20, 9/17, 10/20)
    per_run = {
        name: sum(1 for r in rows if r.role == "prediction" and abs(r.error) <= 0.15) for name, rows in runs.items()
    }
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


# -- the one-step-prefill engine (the JSON has "prefill") --------------------------------------------
# bench_e2e now prefills the uncached part of a prompt in one step. Each run is calibrated on its
# own recompute at 4096 tokens (the GEMM rate) and its own GPU hit at 4096 tokens (the fixed cost
# of a step over a cached prefix, HardwareCost.hit_forward_s); disk rates from its disk_probe, the
# copies from bench_copy_py's case of its KV layout and copy method. docs/sim.md, section 3.
# The main run: the engine whose loads overlap the step layer by layer (load_compute_overlap in
# the JSON), GPU and CPU hits the median of 5 requests (reps_s).
ONE_STEP_MAIN = "bench_e2e-llama3_8b_ttft_one_step_prefill_vllm_layout_r5-h100-2026-11-27.json"
# The earlier engine (a load before the step, serial): the main run before, and two siblings.
ONE_STEP_SERIAL = "bench_e2e-llama3_8b_ttft_one_step_prefill_vllm_layout-h100-2026-11-27.json"
ONE_STEP_RUNS = (
    ONE_STEP_SERIAL,
    "bench_e2e-llama3_8b_ttft_one_step_prefill-h100-2026-11-27.json",
    "bench_e2e-llama3_8b_ttft_one_step_prefill_vllm_layout_zero_copy-h100-2026-11-27.json",
)
# (case, tokens) of the serial run: why the prediction misses by more than 15%.
SERIAL_KNOWN_MISSES = {
    ("cpu_hit", 4096): "-31%: measured 0.098 s, 2.4-3.3x the same case on the other two runs (0.042, 0.029 s) "
    "and 41 ms above its own GPU hit for 0.5 GB moved at 51 GB/s (10 ms): one slow request",
    ("gpu_hit", 16384): "+24%: measured 0.049 s, below the 0.0575 s GPU hit at 4096 that calibrates the step's "
    "fixed cost; the fixed cost moves by ~10 ms from request to request",
    ("cpu_hit", 16384): "+20%: the same fixed cost (0.049 s from the 4096 GPU hit) priced after the load",
    ("half_prefix_gpu_hit", 32768): "-26% (all three runs -26% to -28%): attention over a cached prefix runs "
    "SDPA with a lower-right causal mask (the memory-efficient kernel, K/V heads "
    "expanded) at about half the matmul probe's rate the model prices it at",
}


@pytest.fixture(scope="module")
def one_step():
    if not (BENCH / ONE_STEP_SERIAL).exists():
        pytest.skip(f"no {ONE_STEP_SERIAL}")
    return compare_e2e(str(BENCH), e2e_glob=ONE_STEP_SERIAL, calibrate_tokens=4096)


def test_one_step_run_is_calibrated_on_two_of_its_own_measurements(one_step):
    rows, hw = one_step
    assert len(rows) == 21
    calib = {(r.case, r.tokens): r for r in rows if r.role == "calibration"}
    assert set(calib) == {("recompute", 4096), ("gpu_hit", 4096)}
    assert abs(calib[("recompute", 4096)].error) < 1e-9
    # the GPU hit: its step priced as calibrated, plus the offload of one GPU victim (0.7 ms)
    assert abs(calib[("gpu_hit", 4096)].error) < 0.02
    assert hw.sources["weights_rate"] == f"{ONE_STEP_SERIAL}:ttft_recompute_4096"
    assert hw.sources["hit_forward_s"] == f"{ONE_STEP_SERIAL}:ttft_gpu_hit_4096"
    assert 0.03 < hw.hit_forward_s < 0.06 and hw.writebacks_share_disk
    assert not hw.load_compute_overlap and "load_compute_overlap" not in hw.sources  # no key: serial
    assert hw.sources["h2d_bw"].endswith("scatter_auto_vllm")  # the run's layout and copy method
    assert hw.sources["disk_read_bw"].endswith("disk_probe.read_gbps")
    assert hw.sources["disk_write_bw"].endswith("disk_probe.write_gbps")


def test_one_step_predictions_within_15_percent(one_step):
    rows, _ = one_step
    print("\n" + format_table(rows))
    preds = [r for r in rows if r.role == "prediction"]
    assert len(preds) == 19
    misses = {
        (r.case, r.tokens): f"{r.error:+.1%}"
        for r in preds
        if abs(r.error) > 0.15 and (r.case, r.tokens) not in SERIAL_KNOWN_MISSES
    }
    assert not misses, misses
    within = sum(1 for r in preds if abs(r.error) <= 0.15)
    assert within >= len(preds) - len(SERIAL_KNOWN_MISSES) == 15


def test_one_step_disk_hits_price_every_write_back_their_promotion_starts(one_step):
    """A promotion into the full CPU tier demotes the tier's chunks to disk (up to the write-back
    bound) and reads between those writes: the load is priced with all of them, not only the
    few it waited for. The split's tail then ends when the bench's time line says it did."""
    import json
    import re

    rows, _ = one_step
    found = {(r.case, r.tokens): r.detail for r in rows}
    d = found[("disk_hit", 4096)]
    assert (d["disk_chunks"], d["writebacks_waited"], d["writebacks_started_by_load"]) == (15, 11, 34)
    ready = {}
    for r in json.loads((BENCH / ONE_STEP_SERIAL).read_text())["results"]:
        if m := re.search(r"tail ready at ([0-9.]+) s", r.get("note", "")):
            ready[int(r["case"].rsplit("_", 1)[1])] = float(m.group(1))
    for n in (16384, 32768):  # 9 / 24 chunks read beside 68 / 83 write-backs
        assert found[("disk_hit_split", n)]["load_s"] == pytest.approx(ready[n], rel=0.10), n


def test_chunked_prefill_runs_keep_their_model():
    """Runs of the earlier chunked-prefill engine (no "prefill" in the JSON): no fixed hit cost,
    only the write-backs waited for on the critical path, the cross-layer copy rates."""
    hw = Calibration(str(BENCH)).hardware(
        model=MODEL_PRESETS["llama3_8b"], e2e_file=str(BENCH / "bench_e2e-llama3_8b_ttft-h100-2026-11-27.json")
    )
    assert hw.hit_forward_s == 0.0 and not hw.writebacks_share_disk and "hit_forward_s" not in hw.sources
    assert hw.sources["h2d_bw"].endswith("scatter_auto_cross_layer")


# Across the three serial one-step runs (the same engine on three H100 hosts; cross_layer: KV
# layout cross_layer; zero_copy: copy method zero_copy). (case, tokens): why
# the median prediction misses the median measurement by more than 15% (docs/sim.md).
ONE_STEP_MEDIAN_MISSES = {
    ("cpu_hit", 4096): "+23%: measured 0.029-0.098 s across the runs (spread 235%), a ~40 ms step's noise",
    ("disk_hit_split", 4096): "-23%: one or two chunks loaded; the head's step and the rest's step measured "
    "slower than priced on the two other runs",
    ("disk_hit_split", 16384): "+34%: cross_layer and zero_copy absorbed the tail's write-backs at 1.3-1.9x "
    "the rate their disk probes measured (the main run's tail within 6%)",
    ("gpu_hit", 32768): "-30%: a step over 32k cached tokens costs ~27 ms more than over 4k (gathers and "
    "expansion of the cached K/V, the masked attention); the model adds 5 ms",
    ("half_prefix_gpu_hit", 32768): "-27%: attention after a cached prefix at about half the matmul rate",
}


@pytest.fixture(scope="module")
def one_step_runs():
    missing = [r for r in ONE_STEP_RUNS if not (BENCH / r).exists()]
    if missing:
        pytest.skip(f"missing {missing}")
    return {r: compare_e2e(str(BENCH), e2e_glob=r, calibrate_tokens=4096)[0] for r in ONE_STEP_RUNS}


def test_one_step_cross_run_medians_within_15_percent(one_step_runs):
    from kvtier.sim.validate import claimed_cases, cross_run_table, format_cross_run_table

    table = cross_run_table(one_step_runs)
    print("\n" + format_cross_run_table(table, list(ONE_STEP_RUNS)))
    assert len(table) == 21
    claimed = claimed_cases(table)
    assert len(claimed) == 19  # recompute and GPU hit at 4096 calibrate every run
    bad = {
        (c["case"], c["tokens"]): f"{c['median_error']:+.1%}"
        for c in claimed
        if abs(c["median_error"]) > 0.15 and (c["case"], c["tokens"]) not in ONE_STEP_MEDIAN_MISSES
    }
    assert not bad, bad
    assert sum(1 for c in claimed if abs(c["median_error"]) <= 0.15) >= 14
    # per run, against its own measurement (docs/sim.md: vllm 15/19, cross_layer 9/19, zero_copy 13/19)
    per_run = {
        name: sum(1 for r in rows if r.role == "prediction" and abs(r.error) <= 0.15)
        for name, rows in one_step_runs.items()
    }
    assert per_run[ONE_STEP_SERIAL] >= 15 and sum(per_run.values()) >= 37, per_run


# -- the engine whose loads overlap the step (load_compute_overlap) ------------------------------
# (case, tokens) of each overlapped run: why the prediction misses by more than 15% (docs/sim.md).
OVERLAP_KNOWN_MISSES = {
    ONE_STEP_MAIN: {
        ("cpu_hit", 4096): "+23%: measured 0.020 s, below this run's GPU hit at 4096 (0.025 s, both medians of 5) "
        "that sets the step's fixed cost; the host queued the CPU hit's step in 19 ms, the GPU "
        "hit's in 24 ms (time lines); the model prices a CPU hit at least at that step",
        ("disk_hit_split", 4096): "-23% (serial run: -11%, median -23%): the tail was ready when the head had been "
        "queued (68 ms) and the first token came 91 ms later; head + rest price 0.122 s",
        ("gpu_hit", 16384): "+16% (serial run: +24%): 0.0235 s, no slower than the 0.0248 s at 4096 that calibrates; "
        "the model adds the step's attention over 16k cached tokens (2.4 ms)",
        ("gpu_hit", 32768): "-17% (serial runs' median -30%): a step over 32k cached tokens costs 12 ms more "
        "than over 4k (gathers, masked attention); the model adds 5.5 ms",
        ("half_prefix_gpu_hit", 16384): "-16% (serial run: -9%): attention after a cached prefix at about half "
        "the matmul rate (the masked attention kernel)",
        ("half_prefix_gpu_hit", 32768): "-27% (serial run: -26%): the same kernel",
    },
    # _overlap, one request a case: its GPU hit at 4096 measured 0.085 s (16k: 0.050, 32k: 0.041;
    # the r5 run's median at 4096: 0.025), so every hit step is priced ~40 ms too slow
    "bench_e2e-llama3_8b_ttft_one_step_prefill_vllm_layout_overlap-h100-2026-11-27.json": {
        ("cpu_hit", 4096): "+133%: the 0.085 s calibration point",
        ("half_prefix_gpu_hit", 4096): "+74%: the 0.085 s calibration point",
        ("gpu_hit", 16384): "+75%: the 0.085 s calibration point",
        ("cpu_hit", 16384): "+87%: the 0.085 s calibration point (the copy, 42 ms, is hidden)",
        ("gpu_hit", 32768): "+124%: the 0.085 s calibration point",
        ("disk_hit", 16384): "+20%: measured 2.47 s, the r5 run 2.84 s with a like disk probe",
        ("disk_hit_split", 32768): "-16%: the tail ready at 2.007 s, the model's tail load 1.65 s",
        ("half_prefix_gpu_hit", 32768): "-23%: the masked attention kernel",
    },
    # _r5's bench with the disk's write-back bound 4 (a variant: bench_e2e --max-writebacks 4)
    "bench_e2e-llama3_8b_ttft_one_step_prefill_vllm_layout_writebacks4-h100-2026-11-27.json": {
        ("cpu_hit", 4096): "+22%: below the run's GPU hit at 4096, as on the main run",
        ("disk_hit_split", 4096): "-45%: the bench split 10 + 5 chunks, the simulated tiers 11 + 4 (see "
        "WRITEBACKS4_SPLITS); its tail was ready at 0.167 s, the model's 4 chunks at 0.087 s",
        ("half_prefix_gpu_hit", 16384): "-16%: the masked attention kernel",
        ("gpu_hit", 32768): "-20%: per-cached-token costs of the step, as on the main run",
        ("half_prefix_gpu_hit", 32768): "-28%: the masked attention kernel",
    },
}
# Within 15% per overlapped run (docs/sim.md), and before the overlap was modelled (the serial
# form, one request a case): r5 11, _overlap 11, writebacks4 11.
OVERLAP_WITHIN = {
    ONE_STEP_MAIN: 13,
    "bench_e2e-llama3_8b_ttft_one_step_prefill_vllm_layout_overlap-h100-2026-11-27.json": 11,
    "bench_e2e-llama3_8b_ttft_one_step_prefill_vllm_layout_writebacks4-h100-2026-11-27.json": 14,
}


@pytest.fixture(scope="module")
def main_run():
    if not (BENCH / ONE_STEP_MAIN).exists():
        pytest.skip(f"no {ONE_STEP_MAIN}")
    return compare_e2e(str(BENCH), e2e_glob=ONE_STEP_MAIN, calibrate_tokens=4096)


def test_main_run_is_calibrated_on_two_of_its_own_measurements_and_overlaps(main_run):
    rows, hw = main_run
    assert len(rows) == 21
    calib = {(r.case, r.tokens): r for r in rows if r.role == "calibration"}
    assert set(calib) == {("recompute", 4096), ("gpu_hit", 4096)}
    assert abs(calib[("recompute", 4096)].error) < 1e-9
    # the median of 5 GPU hits: the simulated median request offloads no GPU victim (the first does)
    assert abs(calib[("gpu_hit", 4096)].error) < 1e-9
    assert hw.sources["hit_forward_s"] == f"{ONE_STEP_MAIN}:ttft_gpu_hit_4096"
    assert hw.load_compute_overlap and hw.sources["load_compute_overlap"] == f"{ONE_STEP_MAIN}:load_compute_overlap"
    assert 0.01 < hw.hit_forward_s < 0.03 and hw.writebacks_share_disk
    assert hw.sources["disk_read_bw"].endswith("disk_probe.read_gbps")
    found = {(r.case, r.tokens): r.detail for r in rows}
    for n in (4096, 16384, 32768):  # five requests each, as the bench served them
        assert len(found[("gpu_hit", n)]["reps_s"]) == len(found[("cpu_hit", n)]["reps_s"]) == 5


@pytest.mark.parametrize("name", sorted(OVERLAP_KNOWN_MISSES), ids=lambda n: n.split("vllm_layout")[1][:-21] or "-")
def test_overlapped_runs_predictions_within_15_percent(name):
    if not (BENCH / name).exists():
        pytest.skip(f"no {name}")
    rows, hw = compare_e2e(str(BENCH), e2e_glob=name, calibrate_tokens=4096)
    print("\n" + format_table(rows))
    assert hw.load_compute_overlap
    preds = [r for r in rows if r.role == "prediction"]
    assert len(preds) == 19
    known = OVERLAP_KNOWN_MISSES[name]
    misses = {
        (r.case, r.tokens): f"{r.error:+.1%}" for r in preds if abs(r.error) > 0.15 and (r.case, r.tokens) not in known
    }
    assert not misses, misses
    within = sum(1 for r in preds if abs(r.error) <= 0.15)
    assert within >= OVERLAP_WITHIN[name] == len(preds) - len(known), within


def test_main_run_time_lines_show_the_overlap_the_model_prices(main_run):
    """The bench's time line of each CPU hit (started, queued: the host has queued the step,
    landed, first_token): where the copy lands after the host queued the step (16k, 32k) the
    model is load-bound, its copy ends within 10% of ``landed`` and the first token follows within
    the last layer's share (< 2 ms); where it landed first (4k), the model is step-bound. The
    serial form (copy, then the step) misses those load-bound hits by more than 30%."""
    import json

    rows, hw = main_run
    model = MODEL_PRESETS["llama3_8b"]
    meas = {(r.case, r.tokens): r for r in rows}
    lines = {
        int(r["case"].rsplit("_", 1)[1]): r["timeline_s"]
        for r in json.loads((BENCH / ONE_STEP_MAIN).read_text())["results"]
        if r["case"].startswith("ttft_cpu_hit_")
    }
    bound = {}
    for n, t in lines.items():
        r = meas[("cpu_hit", n)]
        d = r.detail
        last_layer = (d["step_s"] - hw.hit_forward_s) / model.layers
        load_bound = d["copy_s"] + last_layer > d["step_s"]
        bound[n] = load_bound
        assert load_bound == (t["landed"] - t["queued"] > 0.005), (n, t, d["copy_s"], d["step_s"])
        if load_bound:
            assert d["copy_s"] == pytest.approx(t["landed"], rel=0.10), (n, t)
            assert t["first_token"] - t["landed"] < 0.002 and last_layer < 0.002
            assert d["load_s"] + d["step_s"] > 1.3 * r.measured_s  # the serial form
            assert abs(r.error) < 0.05
    assert bound == {4096: False, 16384: True, 32768: True}


def test_main_run_split_tail_loads_as_the_time_line_says(main_run):
    """The split's tail (read between the write-backs its promotion starts) ends within 15% of
    the bench's "tail ready" at 16k and 32k; at 4k it was ready before it was asked for."""
    import json
    import re

    rows, _ = main_run
    found = {(r.case, r.tokens): r.detail for r in rows}
    ready, asked = {}, {}
    for r in json.loads((BENCH / ONE_STEP_MAIN).read_text())["results"]:
        if m := re.search(r"tail asked for at ([0-9.]+) s, tail ready at ([0-9.]+) s", r.get("note", "")):
            n = int(r["case"].rsplit("_", 1)[1])
            asked[n], ready[n] = float(m.group(1)), float(m.group(2))
    assert ready[4096] == asked[4096] and found[("disk_hit_split", 4096)]["load_s"] < asked[4096]
    for n in (16384, 32768):
        assert found[("disk_hit_split", n)]["load_s"] == pytest.approx(ready[n], rel=0.15), n


def test_kvtier_sim_calibrates_on_the_default_configuration_run_by_default():
    """`kvtier sim --calibrate DIR` without --e2e: the newest date, bench_e2e's default
    configuration (one-step prefill, vllm layout, method auto, write-back bound 64) before variants
    whose file names sort later (the zero_copy run), then the newest engine and bench."""
    from kvtier.sim.cli import _latest_e2e

    if not (BENCH / SPLIT_BUCKETS).exists():
        pytest.skip(f"no {SPLIT_BUCKETS}")
    # the newest engine (attention_split_min_queries), not the run with torch's experimental
    # variable; of its runs the latest file name
    assert Path(_latest_e2e(str(BENCH))).name == SPLIT_BUCKETS


def test_the_default_run_is_chosen_by_what_its_json_records_not_its_name(tmp_path):
    """Among default-configuration runs of one date: overlapped loads (load_compute_overlap)
    first, then repeated hits (reps_s), whatever the file names; a run with another write-back
    bound is a variant even when it is the newest bench."""
    import json

    from kvtier.sim.cli import _latest_e2e

    src = BENCH / "bench_e2e-llama3_8b_ttft_one_step_prefill_vllm_layout_overlap-h100-2026-11-27.json"
    serial = BENCH / "bench_e2e-llama3_8b_ttft_one_step_prefill_vllm_layout-h100-2026-11-27.json"
    if not (src.exists() and serial.exists()):
        pytest.skip("the serial and _overlap runs are needed")
    overlap = json.loads(src.read_text())
    reps = json.loads(src.read_text())
    for r in reps["results"]:
        if r["case"].startswith(("ttft_gpu_hit_", "ttft_cpu_hit_")):
            r["reps_s"] = [r["value"]] * 5
    bound4 = dict(reps, disk_max_writebacks_in_flight=4)
    stem = "bench_e2e-llama3_8b_ttft_one_step_prefill_vllm_layout"
    files = {
        f"{stem}_a-h100-2026-11-27.json": reps,
        f"{stem}_m-h100-2026-11-27.json": overlap,
        f"{stem}_y-h100-2026-11-27.json": json.loads(serial.read_text()),
        f"{stem}_z-h100-2026-11-27.json": bound4,
    }
    for name, doc in files.items():
        (tmp_path / name).write_text(json.dumps(doc))
    assert Path(_latest_e2e(str(tmp_path))).name == f"{stem}_a-h100-2026-11-27.json"
    (tmp_path / f"{stem}_a-h100-2026-11-27.json").unlink()
    assert Path(_latest_e2e(str(tmp_path))).name == f"{stem}_m-h100-2026-11-27.json"
    (tmp_path / f"{stem}_m-h100-2026-11-27.json").unlink()
    assert Path(_latest_e2e(str(tmp_path))).name == f"{stem}_y-h100-2026-11-27.json"


def test_overlap_prices_the_copy_beside_the_step_not_before_it():
    """HardwareCost.load_compute_overlap: a lower-tier hit's copy
    into GPU pages runs beside its step, layer by layer; the disk reads before it stay in series
    (CpuTier::Load reads on the host before it queues the copy). Without it, the serial form."""
    from dataclasses import replace

    from kvtier.sim.cost import HardwareCost
    from kvtier.sim.engine import (
        prefill_step_s,
        request_copy_s,
        request_load_parts_s,
        request_service_s,
    )
    from kvtier.sim.tiers import BeginResult

    model = MODEL_PRESETS["llama3_8b"]
    serial = HardwareCost(
        weights_rate=5.7e14,
        attention_rate=6.9e14,
        h2d_bw=51e9,
        disk_read_bw=1.7e9,
        disk_write_bw=2.4e9,
        hit_forward_s=0.035,
        writebacks_share_disk=True,
    )
    over = replace(serial, load_compute_overlap=True)
    ct, cb = 256, 256 * model.kv_bytes_per_token
    regimes = set()
    for chunks in (15, 63, 127):  # the step outlasts the copy at 4k and 16k; the copy, at 32k
        n = (chunks + 1) * ct
        b = BeginResult(lower_hits=chunks, offloaded=1)
        pages = request_load_parts_s(over, cb, b)[0]
        copy, step = request_copy_s(over, cb, b), prefill_step_s(over, model, chunks * ct, n)
        last_layer = over.prefill_s(model, chunks * ct, n) / model.layers
        assert request_service_s(serial, model, ct, cb, b, n) == pytest.approx(pages + copy + step)
        got = request_service_s(over, model, ct, cb, b, n)
        assert got == pytest.approx(pages + max(step, copy + last_layer))
        regimes.add(copy + last_layer > step)
        # a disk hit: its write-backs and reads first, in series, then the same overlap
        d = BeginResult(lower_hits=chunks, disk_hits=chunks, load_writebacks=chunks // 2, load_disk_writes=chunks)
        pages, load = request_load_parts_s(over, cb, d)
        assert request_service_s(over, model, ct, cb, d, n) == pytest.approx(
            pages + load - copy + max(step, copy + last_layer)
        )
        # nothing below the GPU: both forms are the step alone
        g = BeginResult(gpu_hits=chunks)
        assert request_service_s(over, model, ct, cb, g, n) == request_service_s(serial, model, ct, cb, g, n)
    assert regimes == {False, True}  # both regimes exercised
    # a split plan: the rest's step waits for the head and the tail's disk reads; its last layer
    # also for the tail's copy
    for tail in (2, 40):
        head = 127 - tail
        n = 128 * ct
        b = BeginResult(lower_hits=tail, disk_hits=tail, split_head=head, load_disk_writes=3 * tail)
        pages, load = request_load_parts_s(over, cb, b)
        copy = request_copy_s(over, cb, b)
        head_s, rest_s = prefill_step_s(over, model, 0, head * ct), prefill_step_s(over, model, 127 * ct, n)
        got = request_service_s(over, model, ct, cb, b, n)
        assert got == pytest.approx(
            pages + max(max(head_s, load - copy) + rest_s, load + over.prefill_s(model, 127 * ct, n) / model.layers)
        )
        # head-bound (2 chunks): the copy was hidden behind the head in both forms; tail-bound: not
        assert (got < request_service_s(serial, model, ct, cb, b, n)) == (tail == 40)
        assert got <= request_service_s(serial, model, ct, cb, b, n)


# -- the engine that splits attention after a cached prefix (attention_split_min_queries) ----------
# A step of >= 1024 tokens after a cached prefix runs attention as two cuDNN calls
# (paged_llama._attend_split) instead of SDPA's lower-right mask (the flash kernel at ~half the
# rate: the half-prefix miss of every earlier run). Its runs record attention_split_min_queries;
# the simulator then takes the attention rates per step size from bench_attention (same GPU) and
# replays the bench's warm-up of the half-prefix shapes. The main run: _r7.
SPLIT_MAIN = "bench_e2e-llama3_8b_ttft_one_step_prefill_vllm_layout_r7-h100-2026-11-27.json"
SPLIT_SECOND = "bench_e2e-llama3_8b_ttft_one_step_prefill_vllm_layout_r8-h100-2026-11-27.json"  # a repeat
# cuDNN calls padded to 1024-token buckets (the split's 3584-token head runs as 4096)
SPLIT_BUCKETS = "bench_e2e-llama3_8b_ttft_one_step_prefill_vllm_layout_r9-h100-2026-11-27.json"
# the warm-up also served a 512-tokens-shorter prompt (off the buckets), in the run's pool:
# its recompute then offloads GPU victims, which the calibration takes off (compare_e2e)
SPLIT_WARM = "bench_e2e-llama3_8b_ttft_one_step_prefill_vllm_layout_r10-h100-2026-11-27.json"
SPLIT_RUNS = (SPLIT_MAIN, SPLIT_SECOND, SPLIT_BUCKETS, SPLIT_WARM)
FIRST_CALL = (
    "the split's head (3,584 tokens) is the run's first attention of a new length: its first call "
    "costs ~75 ms more (scripts/diag_step.py: a first 3584-token recompute 0.194 s, the second "
    "0.117, a 3328-token one after it 0.109 twice); the model prices warm kernels"
)
HOST_NOISE = (
    "the hit step is host-bound and moves by 10-15 ms from run to run (GPU hit at 16k: 0.025 / 0.040 / 0.036 s)"
)
SPLIT_KNOWN_MISSES = {
    SPLIT_MAIN: {
        ("disk_hit", 4096): "-32%: 1.27 s measured; 0.88 / 0.85 s on r8 / r9 (within 3% there): the disk, "
        "slower during the case than at the probe",
        ("disk_hit", 32768): "-23%: 7.08 s measured; 5.14 / 6.11 s on r8 / r9 (within 7% there)",
        ("disk_hit_split", 4096): "-27%: " + FIRST_CALL,
        ("gpu_hit", 16384): "+37%: 0.0248 s measured, below this run's GPU hit at 4096; " + HOST_NOISE,
    },
    SPLIT_SECOND: {
        ("cpu_hit", 4096): "-19%: 0.0382 s, 7 ms above this run's GPU hit at 4096 that prices its step",
        ("disk_hit_split", 4096): "-32%: " + FIRST_CALL,
        ("gpu_hit", 32768): "+30%: 0.0344 s measured (r7 0.0403, r9 0.0432); " + HOST_NOISE,
    },
    SPLIT_BUCKETS: {
        ("cpu_hit", 4096): "-41%: 0.0361 s, 15 ms above this run's GPU hit at 4096 (0.0213 s) that prices its step",
        ("disk_hit_split", 4096): "-39%: " + FIRST_CALL,
        ("gpu_hit", 16384): "-24%: this run's GPU hit at 4096 (0.0213 s) is the fastest of the three; " + HOST_NOISE,
        ("gpu_hit", 32768): "-19%: as at 16k",
    },
    SPLIT_WARM: {
        ("cpu_hit", 4096): "-17%: 0.0302 s, 5 ms above this run's GPU hit at 4096 that prices its step",
        ("disk_hit_split", 16384): "+20%: 1.00 s measured (1.24-1.38 s on r7-r9, within 8% there): its tail "
        "loaded faster than the write-backs it started are priced",
        ("disk_hit_split", 32768): "+18%: 1.53 s measured (1.63-1.84 s on r7-r9), as at 16k",
    },
}
# Medians over the three runs, each calibrated on its own two points.
SPLIT_MEDIAN_MISSES = {
    ("cpu_hit", 4096): "-20%: the CPU hit's step at 4k measured 0-15 ms above the GPU hit's that prices it",
    ("disk_hit_split", 4096): "-33%: on r7-r9 " + FIRST_CALL + "; r10, which warms it, +4%",
}


def test_warming_the_padded_attention_removes_the_splits_first_call_cost():
    """r10 warmed a length off the buckets before its cases: its split at 4k queued its head in
    26 ms (85-124 ms on r7-r9) and is predicted within 5% (27-39% off on r7-r9)."""
    if not all((BENCH / n).exists() for n in SPLIT_RUNS):
        pytest.skip("the split engine's runs are needed")
    errors = {
        n: {(r.case, r.tokens): r.error for r in compare_e2e(str(BENCH), e2e_glob=n)[0]}[("disk_hit_split", 4096)]
        for n in SPLIT_RUNS
    }
    assert abs(errors[SPLIT_WARM]) < 0.05
    assert all(errors[n] < -0.25 for n in SPLIT_RUNS if n != SPLIT_WARM)


def test_the_calibration_takes_the_recomputes_priced_moves_off():
    """r10's recompute at 4096 offloaded 12 GPU victims (priced 8 ms): the GEMM rate comes from the
    rest, so the recompute is exactly its calibration and the planner's recompute of the same
    prompt (no offload) within 2%."""
    if not (BENCH / SPLIT_WARM).exists():
        pytest.skip(f"no {SPLIT_WARM}")
    rows, _ = compare_e2e(str(BENCH), e2e_glob=SPLIT_WARM)
    found = {(r.case, r.tokens): r for r in rows}
    rec = found[("recompute", 4096)]
    assert rec.detail["offloaded_chunks"] == 12 and rec.detail["pages_s"] > 0.005
    assert abs(rec.error) < 1e-9
    assert abs(found[("disk_hit_planned", 4096)].error) < 0.02


@pytest.fixture(scope="module")
def split_run():
    if not (BENCH / SPLIT_MAIN).exists():
        pytest.skip(f"no {SPLIT_MAIN}")
    return compare_e2e(str(BENCH), e2e_glob=SPLIT_MAIN, calibrate_tokens=4096)


def test_split_attention_run_takes_its_attention_rates_from_bench_attention(split_run):
    _rows, hw = split_run
    assert hw.sources["attention_rate"].startswith("bench_attention-llama3_8b_after_prefix-h100-")
    assert hw.sources["attention_after_prefix"].startswith("bench_attention-llama3_8b_after_prefix-h100-")
    pts = dict(hw.attention_after_prefix)
    assert set(pts) == {256, 1024, 2048, 8192, 16384}
    # below 1024 new tokens the engine keeps the lower-right call (slower than the split there)
    assert pts[256] < 0.5 * hw.attention_rate and pts[16384] > 0.9 * hw.attention_rate
    assert 500e12 < hw.attention_rate < 700e12  # cuDNN's causal attention on an H100
    assert hw.attention_rate_of(0, 4096) == hw.attention_rate
    assert hw.attention_rate_of(32512, 32768) == pts[256]
    assert pts[1024] < hw.attention_rate_of(31000, 32500) < pts[2048]


@pytest.mark.parametrize("name", SPLIT_RUNS, ids=["r7", "r8", "r9", "r10"])
def test_split_attention_runs_predictions_within_15_percent(name):
    if not (BENCH / name).exists():
        pytest.skip(f"no {name}")
    rows, hw = compare_e2e(str(BENCH), e2e_glob=name, calibrate_tokens=4096)
    print("\n" + format_table(rows))
    assert hw.hit_step_overlaps
    preds = [r for r in rows if r.role == "prediction"]
    assert len(preds) == 19
    known = SPLIT_KNOWN_MISSES[name]
    misses = {
        (r.case, r.tokens): f"{r.error:+.1%}" for r in preds if abs(r.error) > 0.15 and (r.case, r.tokens) not in known
    }
    assert not misses, misses
    assert sum(1 for r in preds if abs(r.error) <= 0.15) >= 19 - len(known)
    found = {(r.case, r.tokens): r for r in rows}
    for n in (4096, 16384, 32768):  # the case every earlier run missed (by 16-28% at 32k)
        assert abs(found[("half_prefix_gpu_hit", n)].error) < 0.10, n


def test_split_attention_runs_cross_run_medians_within_15_percent():
    from kvtier.sim.validate import claimed_cases, cross_run_table, format_cross_run_table

    names = list(SPLIT_RUNS)
    if not all((BENCH / n).exists() for n in names):
        pytest.skip("the r7, r8, r9 and r10 runs are needed")
    table = cross_run_table({n: compare_e2e(str(BENCH), e2e_glob=n, calibrate_tokens=4096)[0] for n in names})
    print("\n" + format_cross_run_table(table, names))
    claimed = claimed_cases(table)
    assert len(claimed) == 19
    bad = {
        (c["case"], c["tokens"]): f"{c['median_error']:+.1%}"
        for c in claimed
        if abs(c["median_error"]) > 0.15 and (c["case"], c["tokens"]) not in SPLIT_MEDIAN_MISSES
    }
    assert not bad, bad
    assert sum(1 for c in claimed if abs(c["median_error"]) <= 0.15) >= 19 - len(SPLIT_MEDIAN_MISSES)


def test_hit_step_is_launches_or_gemms_then_attention():
    """``hit_step_overlaps``: a step after a prefix costs the longer of ``hit_forward_s`` (the
    launches) and its GEMMs, plus its attention; without it, launches + all its FLOPs (the
    earlier runs' form); a step without a prefix, its FLOPs either way."""
    from dataclasses import replace

    from kvtier.sim.engine import prefill_step_s

    model = MODEL_PRESETS["llama3_8b"]
    hw = replace(Calibration(str(BENCH)).hardware(model=model), hit_forward_s=0.02, weights_rate=575e12)

    def parts(s, e):
        gemm = model.weight_flops(s, e) / hw.weights_rate
        return gemm, hw.prefill_s(model, s, e) - gemm

    g_short, a_short = parts(32000, 32256)  # a GPU hit's step: launch-bound, long attention
    g_long, a_long = parts(2048, 4096)  # a half-prefix step: GEMM-bound
    assert g_short < 0.02 < g_long and a_short > 0
    assert prefill_step_s(hw, model, 32000, 32256) == pytest.approx(0.02 + g_short + a_short)
    on = replace(hw, hit_step_overlaps=True)
    assert prefill_step_s(on, model, 32000, 32256) == pytest.approx(0.02 + a_short)
    assert prefill_step_s(on, model, 2048, 4096) == pytest.approx(g_long + a_long)
    assert prefill_step_s(on, model, 0, 4096) == prefill_step_s(hw, model, 0, 4096) == hw.prefill_s(model, 0, 4096)


def test_split_attention_calibration_needs_bench_attention(tmp_path):
    """A run of the split engine without a bench_attention run of its GPU: a clear error, not the
    matmul probe's rate in silence."""
    import json
    import shutil

    if not (BENCH / SPLIT_MAIN).exists():
        pytest.skip(f"no {SPLIT_MAIN}")
    for f in BENCH.glob("*.json"):
        if not f.name.startswith(("bench_attention", "bench_e2e")):
            shutil.copy(f, tmp_path / f.name)
    shutil.copy(BENCH / SPLIT_MAIN, tmp_path / SPLIT_MAIN)
    with pytest.raises(FileNotFoundError, match="bench_attention-llama3_8b_after_prefix-h100"):
        compare_e2e(str(tmp_path), e2e_glob=SPLIT_MAIN)
    doc = json.loads((BENCH / SPLIT_MAIN).read_text())
    del doc["attention_split_min_queries"]  # the earlier engine: the matmul probe, as before
    (tmp_path / SPLIT_MAIN).write_text(json.dumps(doc))
    _, hw = compare_e2e(str(tmp_path), e2e_glob=SPLIT_MAIN)
    assert "bench_copy_py" in hw.sources["attention_rate"] and hw.attention_after_prefix == ()
