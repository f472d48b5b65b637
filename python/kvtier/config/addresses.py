"""Addresses: parse_address reads every "host:port" of a config and of the peer service."""

from __future__ import annotations

import re
from typing import Any

from kvtier.config.key_errors import _invalid, _Rejected

_ADDRESS_FORMS = "'host:port' with a port in [0, 65535] (IPv6 as '[::1]:7400')"
_PORT_RE = re.compile(r"[0-9]{1,5}")


def parse_address(addr: Any, what: str) -> tuple[str, int]:
    """``"host:port"`` (IPv6 as ``"[::1]:port"``) -> (host, port); InvalidArgumentError naming
    ``what`` otherwise. Every address of a config and of the peer service is read here."""
    try:
        return _split_address(addr)
    except _Rejected:
        raise _invalid(what, addr, _ADDRESS_FORMS) from None


def _split_address(value: Any) -> tuple[str, int]:
    if not isinstance(value, str):
        raise _Rejected
    host, sep, port = value.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not _PORT_RE.fullmatch(port) or int(port) > 65535:
        raise _Rejected
    return host, int(port)
