"""Tests for `kvtier info`: the text and JSON reports, and their agreement with the probes."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict

import pytest
from kvtier import _core
from kvtier.info import explain_cuda_reason, nvidia_driver_version, system_info


def run_info(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "kvtier.cli", "info", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"kvtier info {' '.join(args)} failed:\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def info_text() -> str:
    return run_info()


@pytest.fixture(scope="module")
def info_json() -> dict:
    return json.loads(run_info("--json"))


def test_text_report_has_one_line_per_fact(info_text):
    lines = info_text.splitlines()
    assert lines[0].startswith(f"kvtier {_core.__version__} (Python ")
    for prefix in (
        "CUDA compiled in:",
        "GPUs at run time:",
        "I/O backend built:",
        "io_uring on kernel:",
        "Pinned memory:",
    ):
        count = sum(line.startswith(prefix) for line in lines)
        assert count == 1, f"{prefix!r} appears {count} times"


def test_text_report_agrees_with_json(info_text, info_json):
    pairs = (ln.split(":", 1) for ln in info_text.splitlines() if ":" in ln)
    line = {name: value.strip() for name, value in pairs}
    assert line["CUDA compiled in"].startswith("yes" if info_json["cuda_compiled"] else "no")
    assert line["GPUs at run time"].startswith(str(len(info_json["gpus"])))
    if not info_json["gpus"]:
        assert "CPU paths" in line["GPUs at run time"]
    assert line["I/O backend built"] == info_json["io_backend_compiled"]
    assert line["io_uring on kernel"].endswith(f"active backend: {info_json['io_backend_active']}")
    if info_json["pinned_memory"]:
        assert line["Pinned memory"].startswith("yes")
    else:
        assert line["Pinned memory"].startswith("no")
        assert info_json["pinned_reason"] in info_text


def test_peer_data_path_says_whether_nixl_is_installed(info_json, info_text):
    line = dict(x.split(":", 1) for x in info_text.splitlines() if ":" in x)["Peer data path"].strip()
    if info_json["nixl_installed"]:
        assert line.startswith("NIXL READs") and line.endswith("nixl installed") and info_json["nixl_reason"] == ""
    else:
        assert line.startswith("TCP stream; nixl not installed")
        assert "pip install --no-deps nixl" in info_json["nixl_reason"]
        assert line.endswith(f"not installed ({info_json['nixl_reason']})")


def test_json_matches_system_info(info_json):
    # Through a JSON round trip so tuples (compute capability) compare as the lists JSON gives.
    expected = json.loads(json.dumps(asdict(system_info())))
    fields = set(expected) | {"io_backend_active"}
    assert set(info_json) == fields
    for key, value in expected.items():
        assert info_json[key] == value, key
    assert info_json["version"] == _core.__version__
    assert info_json["cuda_compiled"] == bool(_core.CUDA_COMPILED)
    assert info_json["io_backend_compiled"] in ("io_uring", "posix")
    assert info_json["io_backend_compiled"] == _core.IO_BACKEND_COMPILED


def explained(reason: str) -> str:
    return explain_cuda_reason(reason, nvidia_driver_version(), int(_core.CUDA_RUNTIME_VERSION))


def test_gpu_fields_are_consistent(info_json):
    gpus, reason = _core.list_gpus()
    assert len(info_json["gpus"]) == len(gpus)
    if gpus:
        assert info_json["cuda_compiled"]
        for g in info_json["gpus"]:
            assert {"index", "name", "total_memory", "compute_capability", "pci_bus_id"} <= set(g)
            assert g["total_memory"] > 0
    else:
        assert info_json["gpu_reason"] == explained(reason) != ""


def test_pinned_memory_matches_probe(info_json):
    ok, reason = _core.probe_pinned_memory()
    assert info_json["pinned_memory"] == ok
    assert info_json["pinned_reason"] == explained(reason)
    if not info_json["cuda_compiled"]:
        assert not ok, "pinned memory needs CUDA compiled in"
    if not ok:
        assert reason


def test_active_io_backend_is_what_the_probe_says(info_json):
    works, reason = _core.probe_io_uring()
    assert info_json["io_uring_works"] == works
    assert info_json["io_uring_reason"] == reason
    assert info_json["io_backend_active"] == ("io_uring" if works else "posix")
    if info_json["io_backend_compiled"] == "posix":
        assert not works and reason, "a build without liburing cannot have a working io_uring"


def test_io_uring_works_here(info_json):
    if info_json["io_backend_compiled"] != "io_uring":
        pytest.skip("SKIPPED: built without liburing (apt-get install liburing-dev, rebuild)")
    if not info_json["io_uring_works"]:
        pytest.skip(f"SKIPPED: the kernel refuses io_uring here: {info_json['io_uring_reason']}")
    assert info_json["io_backend_active"] == "io_uring"
    assert info_json["io_uring_reason"] == ""
    assert _core.probe_io_uring() == (True, "")


INSUFFICIENT = "CUDA driver version is insufficient for CUDA runtime version"


def test_a_machine_without_a_driver_is_told_so(info_text):
    if not _core.CUDA_COMPILED:
        pytest.skip("SKIPPED: built without CUDA, no driver is looked for")
    if nvidia_driver_version() is not None:
        pytest.skip("SKIPPED: this machine has an NVIDIA driver (libcuda.so.1 loads)")
    assert "GPUs at run time:   0 (no usable CUDA device: no NVIDIA driver found)" in info_text
    assert "insufficient" not in info_text


def test_cuda_reasons_name_a_missing_or_old_driver():
    assert explain_cuda_reason(f"no usable CUDA device: {INSUFFICIENT}", None, 13000) == (
        "no usable CUDA device: no NVIDIA driver found"
    )
    assert explain_cuda_reason(f"cudaHostRegister: {INSUFFICIENT}", 12040, 13000) == (
        "cudaHostRegister: the NVIDIA driver supports CUDA 12.4, older than this build's CUDA runtime 13.0"
    )
    assert explain_cuda_reason(f"x: {INSUFFICIENT}", 0, 13000) == f"x: {INSUFFICIENT}"
    assert explain_cuda_reason("no CUDA-capable device is detected", None, 13000) == (
        "no CUDA-capable device is detected"
    )


def test_driver_version_is_none_without_libcuda_and_read_with_it():
    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    class FakeLibcuda:
        @staticmethod
        def cuDriverGetVersion(ptr):
            ptr._obj.value = 12040
            return 0

    assert nvidia_driver_version(missing) is None
    assert nvidia_driver_version(lambda name: FakeLibcuda()) == 12040
