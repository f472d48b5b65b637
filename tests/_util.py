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
