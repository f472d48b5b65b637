"""Sizes: parse_size reads every size of kvtier ("8GiB", "512MB", 4096) into bytes."""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Any

from kvtier.config.key_errors import _invalid, _Rejected

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "pb": 10**15,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "pib": 2**50,
}
_SIZE_RE = re.compile(r"^\s*(\d[\d_]*(?:\.\d+)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
SIZE_FORMS = (
    "an integer number of bytes or a string like '8GiB', '512MB', '1.5TB' (B; kB MB GB TB PB = "
    "powers of 1000; KiB MiB GiB TiB PiB = powers of 1024; case-insensitive; a bare K, M, G, T "
    "or P is refused as ambiguous: write '8GiB' or '8GB')"
)


def parse_size(value: float | str, key: str = "size") -> int:
    """Bytes from an int or a string such as ``"8GiB"``, ``"512MB"`` or ``"1.5TB"``.

    Units are case-insensitive: B, kB/MB/GB/TB/PB (powers of 1000) and KiB/MiB/GiB/TiB/PiB
    (powers of 1024). A bare K, M, G, T or P is refused: ``"8G"`` could mean either. A fraction
    of a byte is dropped (``"1.1KiB"`` is 1126). Every size in kvtier is read here: config
    files, ``KVTIER_*`` variables, keyword overrides and command-line options.

    >>> parse_size("8GiB"), parse_size("512MB"), parse_size("1.5tb"), parse_size(4096)
    (8589934592, 512000000, 1500000000000, 4096)
    """
    try:
        return _parse_size(value)
    except _Rejected:
        raise _invalid(key, value, SIZE_FORMS) from None


def _parse_size(value: Any) -> int:
    if isinstance(value, bool):
        raise _Rejected
    if isinstance(value, int):
        if value < 0:
            raise _Rejected
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value >= 0 and value.is_integer():
            return int(value)
        raise _Rejected
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and m.group(2).lower() in _SIZE_UNITS:
            return int(Decimal(m.group(1).replace("_", "")) * _SIZE_UNITS[m.group(2).lower()])
    raise _Rejected
