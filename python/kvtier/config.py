"""KVTierConfig: the one validated configuration of a kvtier engine, read from a YAML file,
``KVTIER_*`` environment variables and keyword overrides.

Precedence, lowest first: defaults < YAML file < environment < keyword overrides. Every wrong
value raises :class:`kvtier.errors.InvalidArgumentError` naming the key as a dotted path
(``disk.queue_depth``), the value given, where it came from and what is allowed; an unknown key
is an error that lists the close matches. docs/configuration.md lists every key.

Example::

    cfg = KVTierConfig.load("kvtier.yaml", cpu_bytes="8GiB")   # KVTIER_* variables apply too
    cache = kvtier.KVCache(layout, **cfg.cache_kwargs())
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, ClassVar

from kvtier.errors import InvalidArgumentError, UnavailableError

ENV_PREFIX = "KVTIER_"
# The variable that names a YAML file when load() gets no path.
CONFIG_FILE_ENV = "KVTIER_CONFIG"
# KVTIER_* variables that belong to the build and the test suite, not to the engine's config.
_ENV_NOT_CONFIG = frozenset({CONFIG_FILE_ENV, "KVTIER_CUDA", "KVTIER_LIBURING"})
_ENV_NOT_CONFIG_PREFIXES = ("KVTIER_TEST_", "KVTIER_BUILD_", "KVTIER_BENCH_")

METHODS = ("auto", "direct", "staged", "zero_copy", "cpu")
EVICTION_POLICIES = ("lru", "s3fifo", "lfu")
DISK_BACKENDS = ("auto", "io_uring", "posix")


# -- errors --------------------------------------------------------------------------------------
def _invalid(key: str, value: Any, allowed: str, source: str | None = None) -> InvalidArgumentError:
    """The error for a wrong value, carrying key, value and allowed (a loader adds the source)."""
    where = f" (from {source})" if source else ""
    err = InvalidArgumentError(f"{key}: invalid value {value!r}{where}; allowed: {allowed}")
    err.key, err.value, err.allowed = key, value, allowed
    return err


def _unknown(
    what: str, name: str, known: list[str], source: str | None, prefix: str = "", hint: str = ""
) -> InvalidArgumentError:
    """The error for an unknown key, with close matches (difflib, compared without the prefix)."""
    where = f" (from {source})" if source else ""
    stems = [k[len(prefix) :] for k in known]
    close = [
        prefix + c for c in difflib.get_close_matches(name[len(prefix) :], stems, n=3, cutoff=0.6)
    ]
    if close:
        suggestion = "did you mean " + " or ".join(repr(c) for c in close) + "?"
    else:
        suggestion = hint or "known: " + ", ".join(known)
    err = InvalidArgumentError(f"unknown {what} {name!r}{where}; {suggestion}")
    err.key, err.close_matches = name, close
    return err


# -- sizes ---------------------------------------------------------------------------------------
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


# -- value checkers --------------------------------------------------------------------------------
class _Rejected(Exception):
    """A checker refused a value; the caller turns it into an InvalidArgumentError with the key."""


class _Check:
    """Parses one value or rejects it.

    ``typed=False`` (config files, the environment, keyword overrides of the loader): text forms
    are read too (``"8GiB"``, ``"64"``, ``"yes"``, ``"null"``). ``typed=True`` (the Python
    settings objects, :class:`CacheConfig` and :class:`PeerConfig`): numbers, sizes and booleans
    must be given as Python ints, floats and bools. ``allowed`` and ``typed_allowed`` say what
    each accepts.
    """

    allowed: str = ""
    type_name: str = ""

    @property
    def typed_allowed(self) -> str:
        return self.allowed

    def __call__(self, value: Any, typed: bool = False) -> Any:
        raise NotImplementedError


class _Int(_Check):
    def __init__(self, lo: int, hi: int | None = None) -> None:
        self.lo, self.hi = lo, hi
        self.allowed = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        self.type_name = "int"

    def __call__(self, value: Any, typed: bool = False) -> int:
        if isinstance(value, str) and not typed:
            try:
                value = int(value.strip())
            except ValueError:
                raise _Rejected from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Rejected
        if value < self.lo or (self.hi is not None and value > self.hi):
            raise _Rejected
        return value


class _Float(_Check):
    """A finite number > ``lo`` (``lo`` 0) or >= ``lo``, <= ``hi`` (< ``hi`` with ``hi_open``);
    ``zero_ok``: 0 also, meaning off."""

    def __init__(
        self,
        lo: float = 0.0,
        zero_ok: bool = False,
        hi: float | None = None,
        hi_open: bool = False,
    ) -> None:
        self.lo, self.zero_ok, self.hi, self.hi_open = lo, zero_ok, hi, hi_open
        self.allowed = "a number > 0" if lo == 0 else f"a number >= {lo}"
        if hi is not None:
            self.allowed += f" and {'<' if hi_open else '<='} {hi:g}"
        if zero_ok:
            self.allowed = f"0 (off) or {self.allowed}"
        self.type_name = "float"

    def __call__(self, value: Any, typed: bool = False) -> float:
        if isinstance(value, str) and not typed:
            try:
                value = float(value.strip())
            except ValueError:
                raise _Rejected from None
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise _Rejected
        if self.zero_ok and value == 0:
            return 0.0
        if value <= 0 or value < self.lo:
            raise _Rejected
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            raise _Rejected
        return float(value)


class _Size(_Check):
    def __init__(self, lo: int) -> None:
        self.lo = lo
        at_least = "" if lo == 0 else f" of at least {lo} byte" + ("s" if lo != 1 else "")
        self.allowed = f"a size{at_least}: {SIZE_FORMS}"
        self.type_name = "size"

    @property
    def typed_allowed(self) -> str:
        return f"an int number of bytes >= {self.lo}"

    def __call__(self, value: Any, typed: bool = False) -> int:
        if typed and (isinstance(value, bool) or not isinstance(value, int)):
            raise _Rejected
        n = _parse_size(value)
        if n < self.lo:
            raise _Rejected
        return n


class _Choice(_Check):
    def __init__(self, options: tuple[str, ...]) -> None:
        self.options = options
        self.allowed = "one of " + ", ".join(repr(o) for o in options)
        self.type_name = " | ".join(options)

    def __call__(self, value: Any, typed: bool = False) -> str:
        if isinstance(value, str) and value.strip().lower() in self.options:
            return value.strip().lower()
        raise _Rejected


class _Bool(_Check):
    allowed = "true or false (also 1/0, yes/no, on/off)"
    typed_allowed = "True or False"  # type: ignore[assignment]
    type_name = "bool"
    _WORDS: ClassVar[dict[str, bool]] = {
        "1": True,
        "true": True,
        "yes": True,
        "on": True,
        "0": False,
        "false": False,
        "no": False,
        "off": False,
    }

    def __call__(self, value: Any, typed: bool = False) -> bool:
        if isinstance(value, bool):
            return value
        if typed:
            raise _Rejected
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in self._WORDS:
            return self._WORDS[value.strip().lower()]
        raise _Rejected


class _Text(_Check):
    def __init__(
        self,
        pattern: str | None = None,
        what: str = "a non-empty string",
        max_bytes: int | None = None,
    ) -> None:
        self.pattern = re.compile(pattern) if pattern else None
        self.max_bytes = max_bytes
        self.allowed = what
        self.type_name = "str"

    def __call__(self, value: Any, typed: bool = False) -> str:
        if not isinstance(value, str) or not value:
            raise _Rejected
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise _Rejected
        if self.max_bytes is not None and len(value.encode()) > self.max_bytes:
            raise _Rejected
        return value


class _Dir(_Check):
    allowed = "an existing directory"
    type_name = "path"

    def __call__(self, value: Any, typed: bool = False) -> str:
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            raise _Rejected
        path = os.path.expanduser(os.fspath(value))
        if not os.path.isdir(path):
            raise _Rejected
        return path


class _File(_Check):
    allowed = "a file path"
    type_name = "path"

    def __call__(self, value: Any, typed: bool = False) -> str:
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            raise _Rejected
        return os.path.expanduser(os.fspath(value))


class _Salt(_Check):
    allowed = "a string or bytes"
    type_name = "str | bytes"

    def __call__(self, value: Any, typed: bool = False) -> str | bytes:
        if isinstance(value, str):
            return value
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        raise _Rejected


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


class _Address(_Check):
    allowed = _ADDRESS_FORMS
    type_name = "host:port"

    def __call__(self, value: Any, typed: bool = False) -> str:
        _split_address(value)
        return value.strip()


class _AddressList(_Check):
    """A list of addresses; a comma-separated string is one too (the environment's and
    ``kvtier peer --seeds``' form)."""

    allowed = f"a list of {_ADDRESS_FORMS} (in the environment: comma-separated)"
    type_name = "list of host:port"

    def __call__(self, value: Any, typed: bool = False) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise _Rejected
        return tuple(_Address()(v) for v in value)


class _Optional(_Check):
    """None, or the inner value. ``none_words``: "", "none" and "null" strings also mean None
    where text is read (the environment cannot spell null otherwise)."""

    def __init__(
        self,
        inner: _Check,
        meaning: str = "unset",
        none_words: tuple[str, ...] = ("", "none", "null"),
    ):
        self.inner, self.none_words, self.meaning = inner, none_words, meaning
        self.allowed = f"{inner.allowed}, or null ({meaning})"
        self.type_name = f"{inner.type_name} or null"

    @property
    def typed_allowed(self) -> str:
        return f"{self.inner.typed_allowed}, or None ({self.meaning})"

    def __call__(self, value: Any, typed: bool = False) -> Any:
        if value is None:
            return None
        if not typed and isinstance(value, str) and value.strip().lower() in self.none_words:
            return None
        return self.inner(value, typed)


def _field(
    default: Any, check: _Check, doc: str, *, env: str | None = None, show: bool = True
) -> Any:
    """A config field: its checker, one line of documentation and (rarely) its own env name."""
    return field(default=default, repr=show, metadata={"check": check, "doc": doc, "env": env})


def _checked(key: str, check: _Check, value: Any, typed: bool = False) -> Any:
    """``check(value)``, or the InvalidArgumentError naming ``key``, the value and what is
    allowed."""
    try:
        return check(value, typed)
    except _Rejected:
        raise _invalid(key, value, check.typed_allowed if typed else check.allowed) from None


def _with_attributes_doc(doc: str | None, lines: list[tuple[str, str]]) -> str:
    """``doc`` with an ``Attributes:`` section of (name, doc) lines appended."""
    body = "\n".join(f"    {name}: {text}" for name, text in lines)
    return (doc or "").rstrip() + "\n\n    Attributes:\n" + body + "\n"


# -- rules over several keys -----------------------------------------------------------------------
# Each rule reads some dotted keys and names one of them when they do not fit together. ``name``
# renders a dotted key as its caller knows it (``disk.bytes`` in a config, ``disk_bytes`` in a
# CacheConfig).
def _disk_needs_bytes(v: Mapping[str, Any], name: Any) -> None:
    if v["disk.dir"] is not None and v["disk.bytes"] < 1:
        raise _invalid(
            name("disk.bytes"), v["disk.bytes"], f"a size >= 1 byte when {name('disk.dir')} is set"
        )


def _gpu_one_size(v: Mapping[str, Any], name: Any) -> None:
    if v["gpu.pool_pages"] is not None and v["gpu.bytes"] is not None:
        raise _invalid(
            name("gpu.bytes"),
            v["gpu.bytes"],
            f"null when {name('gpu.pool_pages')} is set (give one of the two)",
        )


def _chunk_of_pages(v: Mapping[str, Any], name: Any) -> None:
    if v["model.chunk_tokens"] % v["gpu.page_tokens"] != 0:
        raise _invalid(
            name("model.chunk_tokens"),
            v["model.chunk_tokens"],
            f"a multiple of {name('gpu.page_tokens')} ({v['gpu.page_tokens']})",
        )


_RULES: tuple[tuple[tuple[str, ...], Any], ...] = (
    (("disk.dir", "disk.bytes"), _disk_needs_bytes),
    (("gpu.pool_pages", "gpu.bytes"), _gpu_one_size),
    (("model.chunk_tokens", "gpu.page_tokens"), _chunk_of_pages),
)


def _check_rules(values: Mapping[str, Any], name: Any = str) -> None:
    """Every rule whose keys are all in ``values`` (dotted key -> checked value)."""
    for keys, rule in _RULES:
        if all(k in values for k in keys):
            rule(values, name)


# -- sections --------------------------------------------------------------------------------------
class _Section:
    """Validates and normalizes every field of a frozen settings dataclass after __init__: each
    field's checker (its ``_field`` metadata), then the rules over several of its keys."""

    SECTION: ClassVar[str] = ""
    # True: Python values only (see _Check); False: text forms as well.
    TYPED: ClassVar[bool] = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = _checked(
                f"{self.SECTION}.{f.name}", f.metadata["check"], getattr(self, f.name), self.TYPED
            )
            object.__setattr__(self, f.name, value)
        _check_rules(
            {f"{self.SECTION}.{f.name}": getattr(self, f.name) for f in dataclasses.fields(self)}
        )
        self._check_together()

    def _check_together(self) -> None:
        """Rules of this section that need more than the values (files, other objects)."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class CpuConfig(_Section):
    """The pinned CPU tier and the copies between it and the GPU."""

    SECTION: ClassVar[str] = "cpu"
    bytes: int = _field(
        1 << 30, _Size(1), "hard capacity of the pinned CPU tier (rounded down to whole chunks)"
    )
    method: str = _field(
        "auto",
        _Choice(METHODS),
        "how bytes cross PCIe: DMA of whole pages (direct), DMA after a gather into a GPU "
        "staging buffer (staged), a kernel writing pinned memory (zero_copy), host copies "
        "(cpu); auto picks",
    )
    staging_bytes: int = _field(256 << 20, _Size(1), "GPU staging buffer of the 'staged' method")
    threads: int = _field(2, _Int(1, 1024), "copy threads of the CPU path")
    eviction_policy: str = _field(
        "lru", _Choice(EVICTION_POLICIES), "which chunk the CPU tier evicts first"
    )
    verify_stores: bool = _field(
        False,
        _Bool(),
        "debug check of store()'s page contract: each stored chunk is copied from its pages a "
        "second time once its copy landed, and differences are counted "
        "(stats()['store_verify_mismatches']); costs a second copy of every stored chunk",
    )


@dataclass(frozen=True)
class DiskConfig(_Section):
    """The NVMe tier below the CPU tier (off unless ``dir`` is set)."""

    SECTION: ClassVar[str] = "disk"
    dir: str | None = _field(
        None,
        _Optional(_Dir(), "no disk tier"),
        "directory of the disk tier's cache file; must take O_DIRECT (a real disk, not tmpfs)",
    )
    bytes: int = _field(
        0, _Size(0), "hard capacity of the disk tier's cache file (required when dir is set)"
    )
    backend: str = _field(
        "auto", _Choice(DISK_BACKENDS), "I/O backend: io_uring where it works (auto), or forced"
    )
    admit_min_seen: int = _field(
        2,
        _Int(1),
        "a chunk evicted from CPU is written to disk only if this many requests carried it",
    )
    queue_depth: int = _field(32, _Int(1, 4096), "disk requests in flight at once")
    io_timeout_s: float = _field(10.0, _Float(0.001), "deadline of every disk request, in seconds")
    max_writebacks_in_flight: int = _field(
        64,
        _Int(1, 1 << 20),
        "write-backs to disk in flight at once; an eviction that needs one more waits. Each "
        "admitted eviction starts one, up to this many, before a block frees: a promotion of a few "
        "chunks into a full CPU tier can start this many writes ahead of its reads",
    )
    deterministic_writeback: bool = _field(
        False,
        _Bool(),
        "every call waits for the disk's write-backs first, an eviction for all of them, and the "
        "disk runs one request at a time: the tiers' state depends on the calls alone "
        "(kvtier sim --deterministic-writeback reproduces it exactly)",
    )
    reset_on_mismatch: bool = _field(
        False,
        _Bool(),
        "a cache file of another geometry (chunk size, layout) in dir is wiped at open; "
        "false: the open fails naming both geometries and the file is left as it is",
    )
    persist_on_close: bool = _field(
        True,
        _Bool(),
        "close() first writes the CPU tier's chunks that the disk lacks to disk, so a restart "
        "finds them (write-back alone saves only evicted chunks)",
    )
    persist_interval_s: float = _field(
        60.0,
        _Float(zero_ok=True, hi=1e9),
        "also persist every this many seconds (0: off; off with deterministic_writeback): a "
        "process killed without close() loses at most the chunks stored since the last run",
    )


@dataclass(frozen=True)
class GpuConfig(_Section):
    """The GPU tier's page pool (give pool_pages or bytes, not both; neither: the engine's own)."""

    SECTION: ClassVar[str] = "gpu"
    pool_pages: int | None = _field(
        None, _Optional(_Int(1), "sized by gpu.bytes or the engine"), "pages in the GPU pool"
    )
    bytes: int | None = _field(
        None, _Optional(_Size(1), "sized by gpu.pool_pages or the engine"), "bytes of the GPU pool"
    )
    page_tokens: int = _field(16, _Int(1), "tokens per page (the inference engine's paging unit)")


@dataclass(frozen=True)
class ModelConfig(_Section):
    """What scopes chunk keys: two models, or two tenants, never share a chunk."""

    SECTION: ClassVar[str] = "model"
    model_id: str = _field(
        "default", _Text(), "the model's name; part of every chunk key", env="KVTIER_MODEL_ID"
    )
    tenant_salt: str | bytes | None = _field(
        None,
        _Optional(_Salt(), "no salt", none_words=()),
        "per-tenant secret in the key namespace; '' is a salt, distinct from null",
        show=False,
    )
    chunk_tokens: int = _field(
        256, _Int(1), "tokens per chunk, the caching unit (a multiple of gpu.page_tokens)"
    )


@dataclass(frozen=True)
class PlannerConfig(_Section):
    """The load-or-recompute planner's cost model; null numbers are measured at start-up."""

    SECTION: ClassVar[str] = "planner"
    enabled: bool = _field(True, _Bool(), "false: always load a hit, never recompute it")
    gpu_prefill_tokens_per_s: float | None = _field(
        None,
        _Optional(_Float(), "calibrate"),
        "GPU prefill throughput of the model, tokens per second",
    )
    cpu_bandwidth_gbps: float | None = _field(
        None, _Optional(_Float(), "calibrate"), "CPU -> GPU load bandwidth, GB/s (10^9 bytes/s)"
    )
    disk_bandwidth_gbps: float | None = _field(
        None, _Optional(_Float(), "calibrate"), "disk -> CPU read bandwidth, GB/s"
    )
    peer_bandwidth_gbps: float | None = _field(
        None, _Optional(_Float(), "calibrate"), "peer -> local pull bandwidth, GB/s"
    )


@dataclass(frozen=True)
class MetricsConfig(_Section):
    """Prometheus export (kvtier.metrics)."""

    SECTION: ClassVar[str] = "metrics"
    prometheus_port: int | None = _field(
        None,
        _Optional(_Int(0, 65535), "no HTTP endpoint"),
        "port of the /metrics HTTP endpoint (0: any free port)",
    )
    prometheus_addr: str = _field(
        "127.0.0.1", _Text(), "address the endpoint binds ('0.0.0.0' exposes it)"
    )
    namespace: str = _field(
        "kvtier",
        _Text(r"[a-zA-Z_][a-zA-Z0-9_]*", "a Prometheus name: [a-zA-Z_][a-zA-Z0-9_]*"),
        "prefix of every metric name",
    )


@dataclass(frozen=True)
class _PeerSchema(_Section):
    """The keys of a peer service: checker, default and doc of each. :class:`kvtier.p2p.PeerConfig`
    (a running service's settings: Python values, a secret required, files opened) is this with
    the rules that need the files; :class:`PeersSection` (the ``peers:`` section of a config file)
    checks the keys it is given with these checkers."""

    SECTION: ClassVar[str] = "peers"
    TYPED: ClassVar[bool] = True
    listen: str = _field(
        "127.0.0.1:0",
        _Address(),
        "address the peer service listens on (port 0: any free port)",
    )
    seeds: tuple[str, ...] = _field(
        (), _AddressList(), "peers to join through (any member can be a seed); none: a new cluster"
    )
    secret: bytes | str | None = _field(
        None,
        _Optional(_Salt(), "use secret_file", none_words=()),
        "the cluster secret (>= 16 bytes); give exactly one of secret and secret_file",
        show=False,
    )
    secret_file: str | None = _field(
        None,
        _Optional(_File(), "no cluster secret"),
        "file holding the cluster secret (HMAC of every connection)",
    )
    advertise: str | None = _field(
        None,
        _Optional(_Address(), "the bound listen address"),
        "the address peers dial",
    )
    node_id: str | None = _field(
        None,
        _Optional(
            _Text(what="a string of 1 to 64 bytes", max_bytes=64), "the advertised host:port"
        ),
        "this member's name",
    )
    request_timeout_s: float = _field(
        5.0, _Float(), "deadline of a peer lookup (confirm round trip) and of a pull, in seconds"
    )
    connect_timeout_s: float = _field(
        1.0, _Float(), "deadline of a TCP connect plus handshake, in seconds"
    )
    gossip_interval_s: float = _field(
        0.2, _Float(), "the protocol period (one probe, one gossip exchange), in seconds"
    )
    ack_timeout_s: float = _field(
        0.15, _Float(), "a direct probe unanswered by then goes indirect, in seconds"
    )
    indirect_probes: int = _field(2, _Int(1), "members asked to probe a silent peer")
    suspicion_mult: float = _field(
        4.0, _Float(), "suspect -> dead after suspicion_mult * log10(n+1) periods"
    )
    dead_retention_s: float = _field(
        30.0, _Float(), "how long a dead member's record is kept (refuses stale gossip)"
    )
    sync_interval_s: float = _field(
        3.0, _Float(), "full-state push-pull with one random member, this often (seconds)"
    )
    digest_capacity: int = _field(1 << 17, _Int(1), "keys the Bloom filter digest is sized for")
    digest_fp_rate: float = _field(
        0.001, _Float(hi=0.5, hi_open=True), "the digest's false-positive rate"
    )
    digest_rebuild_s: float = _field(
        60.0, _Float(), "rebuild this member's digest from the keys still held, this often"
    )
    digest_fetches_per_tick: int = _field(
        4, _Int(1), "peers whose digest we are behind on, caught up per period"
    )
    max_sources: int = _field(4, _Int(1), "peers a lookup asks to confirm (and pulls from) at most")
    max_request_chunks: int = _field(1024, _Int(1, 4096), "chunks one request names at most")
    max_connections: int = _field(
        256,
        _Int(1),
        "authenticated inbound connections served at once. Each peer identity has a fair share: "
        "when they are all taken, a login of an identity holding fewer than the largest holder "
        "closes that holder's least recently active connection. Handshakes in progress have "
        "their own bound (max_connections // 8, at least 4), so unauthenticated connections "
        "never take an authenticated slot",
    )
    idle_timeout_s: float = _field(
        300.0, _Float(), "an idle connection is closed after this many seconds"
    )
    scarce_idle_timeout_s: float = _field(
        10.0,
        _Float(),
        "an idle connection is closed after this many seconds once half the "
        "max_connections slots are taken",
    )
    share_pool: str = _field(
        "off",
        _Choice(("auto", "cuda", "shm", "off")),
        "how a PagedKVPool shares its own pages with peers on this host (docs/p2p.md, "
        "'Same-host sharing'): off, auto (CUDA IPC for a GPU pool, nothing on a CPU), cuda, or "
        "shm (a CPU pool in /dev/shm files); off by default until the CUDA path has run on a GPU "
        "machine",
    )
    tls_cert_file: str | None = _field(
        None,
        _Optional(_File(), "plain TCP"),
        "this member's TLS certificate (PEM); with tls_key_file every peer connection runs in "
        "TLS, the HMAC handshake inside it bound to the server's certificate (all members of a "
        "cluster use TLS or none do)",
    )
    tls_key_file: str | None = _field(
        None, _Optional(_File(), "plain TCP"), "the private key of tls_cert_file (PEM)"
    )
    tls_ca_file: str | None = _field(
        None,
        _Optional(_File(), "no CA: certificates bound by the handshake only"),
        "CA (PEM) signing the members' certificates: mutual TLS, each side refuses a peer "
        "certificate the CA did not sign (needs tls_cert_file and tls_key_file)",
    )


# The keys of the `peers:` section that config_keys() lists and the environment sets. The section
# checks every other PeerConfig key it is given with its PeerConfig checker too, and passes keys
# PeerConfig does not have through.
_PEERS_SECTION_KEYS = (
    "listen",
    "seeds",
    "secret_file",
    "tls_cert_file",
    "tls_key_file",
    "tls_ca_file",
)
_PEER_FIELDS = {f.name: f for f in dataclasses.fields(_PeerSchema)}


def _peers_section_default(name: str) -> Any:
    """A key's value when a config file leaves it out: PeerConfig's, but no ``listen`` (no peer
    service)."""
    return None if name == "listen" else _PEER_FIELDS[name].default


def _peers_section_check(name: str) -> _Check:
    """The checker of one key in the `peers:` section: PeerConfig's, where ``listen`` may also be
    null (no peer service)."""
    check: _Check = _PEER_FIELDS[name].metadata["check"]
    if name == "listen":
        return _Optional(check, "no peer service")
    return check


class PeersSection(Mapping):
    """The ``peers:`` section of a config file: a read-only mapping (also readable as
    attributes), handed to the peer service.

    ``listen`` null means no peer service; no secret is required here. Every key that is a
    :class:`PeerConfig` field is checked by PeerConfig's checker; other keys are kept as given.
    """

    SECTION: ClassVar[str] = "peers"
    KNOWN: ClassVar[dict[str, tuple[Any, _Check, str]]] = {
        name: (
            _peers_section_default(name),
            _peers_section_check(name),
            _PEER_FIELDS[name].metadata["doc"],
        )
        for name in _PEERS_SECTION_KEYS
    }
    __slots__ = ("_data",)

    def __init__(self, /, **values: Any):
        data: dict[str, Any] = {}
        for name, (default, _, _) in self.KNOWN.items():
            data[name] = values.pop(name, default)
        data.update(values)
        for name, raw in data.items():
            if name in self.KNOWN:
                data[name] = _checked(f"peers.{name}", self.KNOWN[name][1], raw)
            elif name in _PEER_FIELDS:
                data[name] = _checked(f"peers.{name}", _PEER_FIELDS[name].metadata["check"], raw)
            else:
                data[name] = copy.deepcopy(raw)
        object.__setattr__(self, "_data", data)

    listen = property(lambda self: self._data["listen"])
    seeds = property(lambda self: self._data["seeds"])
    secret_file = property(lambda self: self._data["secret_file"])

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __hash__(self) -> int:  # equal mappings have equal known values and key sets
        return hash((self.listen, self.seeds, self.secret_file, frozenset(self._data)))

    def __repr__(self) -> str:
        shown = (k for k in self._data if k not in _PEER_FIELDS or _PEER_FIELDS[k].repr)
        return "PeersSection(" + ", ".join(f"{k}={self._data[k]!r}" for k in shown) + ")"

    def to_dict(self) -> dict[str, Any]:
        return {k: _plain(v) for k, v in self._data.items()}

    def __reduce__(self):  # pickle and deepcopy rebuild through __init__ (no setattr on slots)
        return (_rebuild_peers, (dict(self._data),))


def _rebuild_peers(data: dict[str, Any]) -> PeersSection:
    return PeersSection(**data)


_SECTIONS: dict[str, type] = {
    "cpu": CpuConfig,
    "disk": DiskConfig,
    "gpu": GpuConfig,
    "model": ModelConfig,
    "planner": PlannerConfig,
    "metrics": MetricsConfig,
    "peers": PeersSection,
}
_TOP_LEVEL = {"timeout_s": (30.0, _Float(), "default deadline of every wait, in seconds")}


def _plain(value: Any) -> Any:
    """A value as YAML-safe plain data (tuples become lists)."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _section_keys(section: str) -> dict[str, tuple[Any, _Check, str, str]]:
    """key -> (default, checker, doc, env name) of one section, in declaration order."""
    cls = _SECTIONS[section]
    if cls is PeersSection:
        items = [(k, d, c, doc, None) for k, (d, c, doc) in PeersSection.KNOWN.items()]
    else:
        items = [
            (f.name, f.default, f.metadata["check"], f.metadata["doc"], f.metadata["env"])
            for f in dataclasses.fields(cls)
        ]
    return {
        k: (d, c, doc, env or f"{ENV_PREFIX}{section}_{k}".upper()) for k, d, c, doc, env in items
    }


def config_keys() -> dict[str, dict[str, Any]]:
    """Every config key (dotted path): its type, default, env variable, allowed values and doc."""
    out: dict[str, dict[str, Any]] = {}
    for section in _SECTIONS:
        for key, (default, check, doc, env) in _section_keys(section).items():
            out[f"{section}.{key}"] = {
                "type": check.type_name,
                "default": _plain(default),
                "env": env,
                "allowed": check.allowed,
                "doc": doc,
            }
    for key, (default, check, doc) in _TOP_LEVEL.items():
        out[key] = {
            "type": check.type_name,
            "default": default,
            "env": f"{ENV_PREFIX}{key}".upper(),
            "allowed": check.allowed,
            "doc": doc,
        }
    return out


# env variable -> dotted key, and flat keyword override (env name without the prefix) -> dotted key.
ENV_VARS: dict[str, str] = {info["env"]: dotted for dotted, info in config_keys().items()}
_FLAT_OVERRIDES: dict[str, str] = {
    env[len(ENV_PREFIX) :].lower(): dotted for env, dotted in ENV_VARS.items()
}
# CacheConfig's fields, in their order: field name -> the config key whose checker, default and
# doc it has. A cache setting is declared once, as a config key; its line here makes it a keyword
# of CacheConfig and KVCache, of cache_kwargs() and of the loader's overrides.
CACHE_FIELDS: dict[str, str] = {
    "cpu_bytes": "cpu.bytes",
    "model_id": "model.model_id",
    "tenant_salt": "model.tenant_salt",
    "method": "cpu.method",
    "staging_bytes": "cpu.staging_bytes",
    "cpu_threads": "cpu.threads",
    "timeout_s": "timeout_s",
    "disk_dir": "disk.dir",
    "disk_bytes": "disk.bytes",
    "disk_backend": "disk.backend",
    "disk_admit_min_seen": "disk.admit_min_seen",
    "disk_queue_depth": "disk.queue_depth",
    "disk_io_timeout_s": "disk.io_timeout_s",
    "eviction_policy": "cpu.eviction_policy",
    "deterministic_writeback": "disk.deterministic_writeback",
    "disk_max_writebacks_in_flight": "disk.max_writebacks_in_flight",
    "verify_stores": "cpu.verify_stores",
    "disk_reset_on_mismatch": "disk.reset_on_mismatch",
    "disk_persist_on_close": "disk.persist_on_close",
    "disk_persist_interval_s": "disk.persist_interval_s",
}
# CacheConfig fields whose default, None, means the value of the key's KVTIER_* variable (unset
# or empty: the key's default), so that a KVCache built without the loader follows it too.
_CACHE_FROM_ENV = frozenset({"verify_stores"})
_FLAT_OVERRIDES.update(CACHE_FIELDS)


# -- the config ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KVTierConfig:
    """The whole engine's settings, validated; build it with :meth:`load`.

    Sections are frozen dataclasses (``cfg.cpu.bytes``, ``cfg.disk.dir``, ...); ``peers`` is a
    read-only mapping passed through to the peer service. A section may also be given as a dict:
    ``KVTierConfig(cpu={"bytes": "8GiB"})``.
    """

    cpu: CpuConfig = field(default_factory=CpuConfig)
    disk: DiskConfig = field(default_factory=DiskConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    peers: PeersSection = field(default_factory=PeersSection)
    timeout_s: float = _TOP_LEVEL["timeout_s"][0]

    def __post_init__(self) -> None:
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, cls):
                continue
            if not isinstance(value, Mapping):
                raise _invalid(
                    name, value, f"a mapping of {name} keys ({', '.join(_section_keys(name))})"
                )
            known = _section_keys(name)
            if cls is not PeersSection:
                for key in value:
                    if key not in known:
                        known_keys = [f"{name}.{k}" for k in known]
                        raise _unknown("config key", f"{name}.{key}", known_keys, None, f"{name}.")
            object.__setattr__(self, name, cls(**value))
        for key, (_, check, _) in _TOP_LEVEL.items():
            object.__setattr__(self, key, _checked(key, check, getattr(self, key)))
        _check_rules({dotted: self.get(dotted) for dotted in config_keys()})

    def get(self, dotted: str) -> Any:
        """The value of one key, by its dotted path (``cfg.get("disk.queue_depth")``)."""
        section, _, key = dotted.partition(".")
        if not key:
            return getattr(self, section)
        return (
            getattr(self, section)[key]
            if section == "peers"
            else getattr(getattr(self, section), key)
        )

    # -- building ----------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str | os.PathLike | None = None,
        env: Mapping[str, str] | None = os.environ,
        **overrides: Any,
    ) -> KVTierConfig:
        """Defaults, then the YAML file, then ``KVTIER_*`` variables of ``env``, then ``overrides``.

        Args:
            path: a YAML file of sections (``cpu: {bytes: 8GiB}``); None: the file named by
                ``KVTIER_CONFIG`` in ``env``, if any.
            env: environment to read ``KVTIER_*`` variables from (None: none).
            overrides: a section as a dict or section object (``disk={"dir": "/nvme"}``), a flat
                key as its variable name without the prefix (``cpu_bytes="8GiB"``,
                ``model_id="llama"``, ``timeout_s=5``) or as a keyword of ``KVCache``
                (``method="cpu"``), or a dotted key (``**{"cpu.bytes": 1 << 30}``).
        Raises:
            InvalidArgumentError: a wrong value or unknown key, named with where it came from.
        """
        layers: list[dict[str, tuple[Any, str]]] = []
        if path is None and env is not None and env.get(CONFIG_FILE_ENV):
            path = env[CONFIG_FILE_ENV]
        if path is not None:
            layers.append(_read_yaml(path))
        if env is not None:
            layers.append(_read_env(env))
        layers.append(_read_overrides(overrides))
        return cls._from_layers(layers)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "dict") -> KVTierConfig:
        """A config from nested plain data (as ``to_dict()`` returns), unknown keys refused."""
        return cls._from_layers([_flatten(data, source)])

    def replace(self, **overrides: Any) -> KVTierConfig:
        """A copy with ``overrides`` (same forms as :meth:`load`) applied on top."""
        return self._from_layers(
            [_flatten(self.to_dict(), "the config replaced"), _read_overrides(overrides)]
        )

    @classmethod
    def _from_layers(cls, layers: list[dict[str, tuple[Any, str]]]) -> KVTierConfig:
        merged: dict[str, tuple[Any, str]] = {}
        for layer in layers:
            merged.update(layer)
        nested: dict[str, Any] = {name: {} for name in _SECTIONS}
        top: dict[str, Any] = {}
        for dotted, (value, _) in merged.items():
            section, _, key = dotted.partition(".")
            if key:
                nested[section][key] = value
            else:
                top[section] = value
        try:
            return cls(**nested, **top)
        except InvalidArgumentError as e:  # name where the wrong value came from
            key = getattr(e, "key", None)
            if key in merged and hasattr(e, "allowed"):
                raise _invalid(key, e.value, e.allowed, merged[key][1]) from None
            raise

    # -- views -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Nested plain data (sizes in bytes), loadable again by :meth:`from_dict` or YAML."""
        out: dict[str, Any] = {name: getattr(self, name).to_dict() for name in _SECTIONS}
        out["timeout_s"] = self.timeout_s
        return out

    def to_yaml(self) -> str:
        """The config as YAML text; ``load()`` of that text gives an equal config."""
        yaml = _yaml()
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def cache_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`CacheConfig` (and so of ``KVCache``)."""
        return {name: self.get(dotted) for name, dotted in CACHE_FIELDS.items()}

    def cache_config(self) -> CacheConfig:
        """The :class:`CacheConfig` of this config (``KVCache(layout, cfg.cache_config())``)."""
        return CacheConfig(**self.cache_kwargs())


# -- the settings of one KVCache -------------------------------------------------------------------
def _with_cache_fields(cls: type) -> type:
    """Adds CacheConfig's fields, each from its config key (CACHE_FIELDS), and their docs."""
    keys = config_keys()
    lines = []
    for name, dotted in CACHE_FIELDS.items():
        section, _, key = dotted.partition(".")
        if key:
            f = next(f for f in dataclasses.fields(_SECTIONS[section]) if f.name == key)
            default, check, doc, type_, show = (
                f.default,
                f.metadata["check"],
                f.metadata["doc"],
                f.type,
                f.repr,
            )
        else:
            default, check, doc = _TOP_LEVEL[dotted]
            type_, show = "float", True
        env = keys[dotted]["env"]
        if name in _CACHE_FROM_ENV:
            default, type_ = None, f"{type_} | None"
            doc += f" (None: {env}, or {_plain(keys[dotted]['default'])!r} when it is unset)"
        cls.__annotations__[name] = type_
        setattr(
            cls,
            name,
            field(default=default, repr=show, metadata={"key": dotted, "check": check, "doc": doc}),
        )
        lines.append((name, f"{doc}. Config key ``{dotted}``, variable ``{env}``."))
    cls.__doc__ = _with_attributes_doc(cls.__doc__, lines)
    return cls


@dataclass(frozen=True)
@_with_cache_fields
class CacheConfig:
    """The settings of one :class:`kvtier.KVCache` (``kvtier.CacheConfig``): the cache keys of
    :class:`KVTierConfig` under the names of KVCache's keywords (CACHE_FIELDS), with the same
    checks and defaults. Python values only: sizes as ints of bytes, booleans as bools (a
    config file or the environment takes text forms; see :meth:`KVTierConfig.cache_config`). A
    wrong value raises InvalidArgumentError naming the field, the value and what is allowed."""

    def __post_init__(self) -> None:
        values: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            raw = getattr(self, f.name)
            if raw is None and f.name in _CACHE_FROM_ENV:
                value = _from_environ(f.metadata["key"])
            else:
                value = _checked(f.name, f.metadata["check"], raw, typed=True)
            object.__setattr__(self, f.name, value)
            values[f.metadata["key"]] = value
        _check_rules(values, _CACHE_NAMES.__getitem__)


_CACHE_NAMES = {dotted: name for name, dotted in CACHE_FIELDS.items()}


def _from_environ(dotted: str) -> Any:
    """A key's value from its KVTIER_* variable in os.environ; its default when unset or empty."""
    info = config_keys()[dotted]
    raw = os.environ.get(info["env"], "")
    if not raw.strip():
        return info["default"]
    section, _, key = dotted.partition(".")
    check = _section_keys(section)[key][1] if key else _TOP_LEVEL[dotted][1]
    try:
        return check(raw)
    except _Rejected:
        raise _invalid(dotted, raw, check.allowed, f"environment {info['env']}") from None


# -- sources ---------------------------------------------------------------------------------------
def _yaml():
    try:
        import yaml
    except ImportError as e:
        raise UnavailableError(
            f"reading or writing YAML config needs PyYAML: pip install pyyaml ({e})"
        ) from None
    return yaml


def _read_yaml(path: str | os.PathLike) -> dict[str, tuple[Any, str]]:
    yaml = _yaml()
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise InvalidArgumentError(f"config file {name!r} does not exist") from None
    except IsADirectoryError:
        raise InvalidArgumentError(f"config file {name!r} is a directory") from None
    except yaml.YAMLError as e:
        raise InvalidArgumentError(f"config file {name!r} is not valid YAML: {e}") from None
    if data is None:  # an empty file
        return {}
    return _flatten(data, name)


def _flatten(data: Any, source: str) -> dict[str, tuple[Any, str]]:
    """Nested sections -> {dotted key: (value, source)}, unknown keys refused."""
    if not isinstance(data, Mapping):
        raise InvalidArgumentError(
            f"config from {source} must be a mapping of sections ({', '.join(_SECTIONS)}) and "
            f"timeout_s, got {type(data).__name__}"
        )
    top_names = [*_SECTIONS, *_TOP_LEVEL]
    out: dict[str, tuple[Any, str]] = {}
    for name, value in data.items():
        if name in _TOP_LEVEL:
            out[name] = (value, source)
            continue
        if name not in _SECTIONS:
            raise _unknown("config section", str(name), top_names, source)
        if value is None:  # "disk:" with nothing under it
            continue
        if isinstance(value, _Section):
            value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        if not isinstance(value, Mapping):
            known = ", ".join(_section_keys(name))
            raise InvalidArgumentError(
                f"{name}: invalid value {value!r} (from {source}); "
                f"allowed: a mapping of {name} keys ({known})"
            )
        known = _section_keys(name)
        for key, v in value.items():
            # peers passes keys it does not know through to the peer service
            if not isinstance(key, str) or (key not in known and name != "peers"):
                known_keys = [f"{name}.{k}" for k in known]
                raise _unknown("config key", f"{name}.{key}", known_keys, source, f"{name}.")
            out[f"{name}.{key}"] = (v, source)
    return out


def _read_env(env: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    out: dict[str, tuple[Any, str]] = {}
    for var, value in env.items():
        if (
            not var.startswith(ENV_PREFIX)
            or var in _ENV_NOT_CONFIG
            or var.startswith(_ENV_NOT_CONFIG_PREFIXES)
        ):
            continue
        dotted = ENV_VARS.get(var)
        if dotted is None:
            raise _unknown(
                "environment variable",
                var,
                sorted(ENV_VARS),
                None,
                prefix=ENV_PREFIX,
                hint="every KVTIER_* variable must be a config key (see docs/configuration.md)",
            )
        out[dotted] = (value, f"environment {var}")
    return out


def _read_overrides(overrides: Mapping[str, Any]) -> dict[str, tuple[Any, str]]:
    out: dict[str, tuple[Any, str]] = {}
    for name, value in overrides.items():
        source = f"keyword {name}"
        if name in _SECTIONS:
            out.update(_flatten({name: value}, source))
        elif name in _FLAT_OVERRIDES:
            out[_FLAT_OVERRIDES[name]] = (value, source)
        elif "." in name and name.partition(".")[0] in _SECTIONS:
            out.update(_flatten({name.partition(".")[0]: {name.partition(".")[2]: value}}, source))
        else:
            known = [*_SECTIONS, *_FLAT_OVERRIDES]
            raise _unknown(
                "config override",
                name,
                known,
                None,
                hint="known: sections, " + ", ".join(_FLAT_OVERRIDES),
            )
    return out


__all__ = [
    "CACHE_FIELDS",
    "CONFIG_FILE_ENV",
    "ENV_VARS",
    "CacheConfig",
    "CpuConfig",
    "DiskConfig",
    "GpuConfig",
    "KVTierConfig",
    "MetricsConfig",
    "ModelConfig",
    "PeersSection",
    "PlannerConfig",
    "config_keys",
    "parse_address",
    "parse_size",
]


def __getattr__(name: str) -> Any:
    if name == "PeersConfig":
        import warnings

        warnings.warn(
            "kvtier.config.PeersConfig is renamed PeersSection (the `peers:` section of a config "
            "file; kvtier.p2p.PeerConfig is a peer service's settings); the old name goes in the "
            "next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return PeersSection
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_cache(layout, config: KVTierConfig | None = None, **overrides):
    """A :class:`kvtier.KVCache` for ``layout`` built from one config (YAML / ``KVTIER_*`` env /
    overrides, see :meth:`KVTierConfig.load`), with its metrics attached as ``cache.metrics``
    (a :class:`kvtier.metrics.Metrics` reading ``cache.stats()`` on every scrape) and its
    Prometheus endpoint started when ``metrics.prometheus_port`` is set. ``cache.close()``
    stops the endpoint too.

    Example::

        cache = open_cache(layout, KVTierConfig.load("kvtier.yaml"))
        print(cache.metrics.servers[0].url)   # http://127.0.0.1:9400/metrics
    """
    from kvtier.cache import KVCache
    from kvtier.metrics import Metrics

    cfg = config if config is not None else KVTierConfig.load(**overrides)
    if config is not None and overrides:
        cfg = cfg.replace(**overrides)
    cache = KVCache(layout, **cfg.cache_kwargs())
    cache.metrics = Metrics.from_config(cfg, stats_fn=cache.stats)
    return cache
