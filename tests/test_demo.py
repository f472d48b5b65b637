"""`kvtier demo` with a tiny model: each case's prefix comes from the tier it names, and the
generated tokens are the same in all four."""

from __future__ import annotations

import argparse
import json

import pytest

pytest.importorskip("torch")

from kvtier.demo import add_demo_parser, format_report, main, run_demo

TINY = {
    "vocab": 256,
    "hidden": 64,
    "layers": 2,
    "heads": 4,
    "kv_heads": 2,
    "intermediate": 128,
    "prefix_tokens": 256,
    "question_tokens": 16,
    "new_tokens": 5,
    "page_tokens": 16,
    "chunk_tokens": 64,
}


def test_each_case_hits_its_tier_with_identical_tokens(tmp_path):
    r = run_demo(device="cpu", disk_dir=str(tmp_path), **TINY)
    hits = {
        c["case"]: (c["gpu_hit_tokens"], c["cpu_hit_tokens"], c["disk_hit_tokens"], c["computed_tokens"])
        for c in r["cases"]
    }
    assert hits == {"miss": (0, 0, 0, 272), "gpu": (256, 0, 0, 16), "cpu": (0, 256, 0, 16), "disk": (0, 0, 256, 16)}
    assert r["identical_tokens"] and all(c["identical"] for c in r["cases"])
    assert all(len(c["tokens"]) == 5 and c["ttft_s"] > 0 for c in r["cases"])
    assert r["disk_dir"] == str(tmp_path) and r["device"] == "cpu"
    text = format_report(r)
    assert "hit: disk tier" in text and "identical in all four cases" in text


def test_cli_json_output(tmp_path, capsys):
    argv = ["--json", "--device", "cpu", "--disk-dir", str(tmp_path)]
    for k, v in TINY.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    assert [c["case"] for c in r["cases"]] == ["miss", "gpu", "cpu", "disk"]
    assert r["identical_tokens"] is True


def test_demo_subcommand_registers():
    parser = argparse.ArgumentParser(prog="kvtier")
    add_demo_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["demo", "--prefix-tokens", "512", "--json"])
    assert args.prefix_tokens == 512 and args.json and callable(args.func)


def test_bad_sizes_raise_naming_them(tmp_path):
    with pytest.raises(ValueError, match="prefix_tokens"):
        run_demo(device="cpu", disk_dir=str(tmp_path), **{**TINY, "prefix_tokens": 32})
