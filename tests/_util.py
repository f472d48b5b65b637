"""Helpers shared by test modules (imported as ``from _util import ...``: pytest puts tests/ on
sys.path)."""

from __future__ import annotations

import time


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
