"""`kvtier sim`: runs on a trace, prints the tables, writes JSON (and a plot where matplotlib is),
and reports a bad trace line with its number and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kvtier.cli import main
from kvtier.sim.trace import synthetic_trace

BENCH = Path(__file__).resolve().parents[1] / "bench" / "results"


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("trace") / "mc.jsonl"
    reqs = synthetic_trace(400, seed=2, prefixes=30, prefix_chunks=(2, 12), suffix_chunks=(1, 4))
    ids: dict[int, int] = {}
    with open(p, "w") as f:  # back to the Mooncake format: one hash id a 512-token block
        f.writelines(
            json.dumps(
                {
                    "timestamp": int(r.arrival_s * 1000),
                    "input_length": r.input_length,
                    "output_length": r.output_length,
                    "hash_ids": [ids.setdefault(c, len(ids)) for c in r.chunks] + [10**9],
                }
            )
            + "\n"
            for r in reqs
        )
    return p


def test_sim_prints_tables_and_writes_json(trace_file, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(
        [
            "sim",
            "--trace",
            str(trace_file),
            "--gpu-gib",
            "2",
            "--cpu-gib",
            "4",
            "--disk-gib",
            "64",
            "--admit-min-seen",
            "1",
            "--instances",
            "2",
            "--routing",
            "cache_aware",
            "--calibrate",
            str(BENCH),
            "--json",
            str(out),
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0
    assert "400 requests" in text and "all tiers" in text and "no cache" in text and "SSD writes" in text
    assert "weights_rate <- bench_e2e" in text
    doc = json.loads(out.read_text())
    # the calibrated numbers themselves, beside their sources, as the Calibration object has them
    from kvtier.sim.cli import _latest_e2e
    from kvtier.sim.cost import MODEL_PRESETS, Calibration

    hw = Calibration(str(BENCH)).hardware(model=MODEL_PRESETS["llama3_8b"], e2e_file=_latest_e2e(str(BENCH)))
    cm = doc["cost_model"]
    assert cm["weights_tflops"] == round(hw.weights_rate / 1e12, 1) and cm["hit_forward_ms"] > 0
    assert cm["disk_read_gbps"] == round(hw.disk_read_bw / 1e9, 3)
    assert f"cost model: weights {cm['weights_tflops']} TFLOP/s" in text and "a hit's step" in text
    runs = doc["runs"]
    assert set(runs) == {"all tiers", "no disk", "GPU only", "no cache"}
    assert runs["all tiers"]["hit_ratio"]["total"] >= runs["GPU only"]["hit_ratio"]["total"] > 0
    assert runs["all tiers"]["config"]["instances"] == 2


def test_sim_every_policy(trace_file, capsys):
    assert (
        main(
            [
                "sim",
                "--trace",
                str(trace_file),
                "--gpu-gib",
                "1",
                "--cpu-gib",
                "2",
                "--cpu-eviction",
                "all",
                "--no-ablation",
                "--replay",
                "fast",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "lru: all tiers" in text and "s3fifo: all tiers" in text and "lfu: all tiers" in text


def test_sim_sweep_plot(trace_file, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "s.png"
    assert (
        main(
            [
                "sim",
                "--trace",
                str(trace_file),
                "--gpu-gib",
                "1",
                "--cpu-gib",
                "2",
                "--no-ablation",
                "--sweep",
                "cpu",
                "--sweep-gib",
                "1,4",
                "--plot",
                str(png),
            ]
        )
        == 0
    )
    assert png.stat().st_size > 1000


def small_disk_args(trace_file, out) -> list[str]:
    """A small deployment with a disk that every admitted chunk reaches, its JSON into ``out``."""
    deployment = ["--gpu-gib", "1", "--cpu-gib", "2", "--disk-gib", "8", "--admit-min-seen", "1"]
    return ["sim", "--trace", str(trace_file), *deployment, "--no-ablation", "--json", str(out)]


def test_sim_deterministic_writeback(trace_file, tmp_path, capsys):
    out = tmp_path / "r.json"
    args = [*small_disk_args(trace_file, out), "--replay", "fast"]
    assert main([*args, "--deterministic-writeback"]) == 0
    assert json.loads(out.read_text())["runs"]["all tiers"]["config"]["deterministic_writeback"] is True
    assert main(args) == 0
    assert json.loads(out.read_text())["runs"]["all tiers"]["config"]["deterministic_writeback"] is False
    capsys.readouterr()


def test_sim_disk_write_through_is_the_default(trace_file, tmp_path, capsys):
    """Write-through by default, as the engine's disk.write_through; --disk-writeback-at-eviction
    turns it off; --disk-write-through (the earlier opt-in) is accepted and changes nothing."""
    out = tmp_path / "r.json"
    args = small_disk_args(trace_file, out)

    def run(*extra):
        assert main([*args, *extra]) == 0
        back = {"--disk-writeback-at-eviction", "--deterministic-writeback"} & set(extra)
        mode = "write-back at eviction" if back else "write-through"
        assert f"disk 255 ({mode})" in capsys.readouterr().out
        return json.loads(out.read_text())["runs"]["all tiers"]

    default, alias, off = run(), run("--disk-write-through"), run("--disk-writeback-at-eviction")
    assert default["config"]["disk_write_through"] is True and off["config"]["disk_write_through"] is False
    # The config says the mode the run had: deterministic_writeback turns write-through off.
    assert run("--deterministic-writeback")["config"]["disk_write_through"] is False

    def written_through(r):
        return sum(t["write_through_written"] for t in r["tiers"].values())

    assert written_through(default) > 0 and written_through(off) == 0
    assert alias["hit_chunks"] == default["hit_chunks"] and alias["ttft_s"] == default["ttft_s"]
    with pytest.raises(SystemExit):  # one or the other
        main([*args, "--disk-write-through", "--disk-writeback-at-eviction"])
    capsys.readouterr()


def test_sim_bad_trace_line(tmp_path, capsys):
    p = tmp_path / "bad.jsonl"
    p.write_text(
        '{"timestamp": 0, "input_length": 600, "hash_ids": [1, 2]}\n'
        '{"timestamp": 1, "input_length": 600, "hash_ids": [1, "two"]}\n'
    )
    assert main(["sim", "--trace", str(p)]) == 2
    err = capsys.readouterr().err
    assert f"{p}:2:" in err and "'hash_ids'" in err


def test_sim_bad_capacity(trace_file, capsys):
    assert main(["sim", "--trace", str(trace_file), "--cpu-gib", "0", "--disk-gib", "10"]) == 2
    assert "needs a CPU tier" in capsys.readouterr().err


def test_sim_on_the_built_in_trace(tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["sim", "--trace", "synthetic:300", "--gpu-gib", "8", "--cpu-gib", "64", "--no-ablation", "--replay", "fast"]
    assert main([*args, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("trace: 300 requests,")
    doc = json.loads(out.read_text())
    assert doc["trace"] == "synthetic:300" and doc["seed"] == 0 and doc["summary"]["requests"] == 300
    assert doc["runs"]["all tiers"]["hit_ratio"]["total"] > 0.2
    assert main([*args, "--seed", "9"]) == 0  # another seed, another trace
    assert capsys.readouterr().out.splitlines()[0] != text.splitlines()[0]
    assert main([*args, "--limit", "50"]) == 0
    assert capsys.readouterr().out.startswith("trace: 50 requests,")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--trace", "synthetic:many"], "--trace synthetic:N needs N, a positive number of requests, got 'many'"),
        (["--trace", "synthetic:0"], "got '0'"),
        (["--trace", "synthetic", "--format", "tokens"], "not --format tokens"),
        (["--trace", "synthetic", "--block-tokens", "384"], "divide block_tokens=384"),
    ],
)
def test_sim_bad_synthetic_trace(argv, message, capsys):
    assert main(["sim", *argv]) == 2
    assert message in capsys.readouterr().err


def test_sim_seed_is_for_the_built_in_trace_only(trace_file, capsys):
    assert main(["sim", "--trace", str(trace_file), "--seed", "1"]) == 2
    assert "--seed applies to --trace synthetic only" in capsys.readouterr().err


def test_sim_calibrate_from_a_missing_directory(tmp_path, capsys):
    assert main(["sim", "--trace", "synthetic:10", "--calibrate", str(tmp_path / "bench" / "results")]) == 2
    err = capsys.readouterr().err
    assert f"--calibrate {tmp_path / 'bench' / 'results'}: no such directory" in err
