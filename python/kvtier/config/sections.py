"""The sections of a config file other than peers (cpu, codec, disk, gpu, model, planner, metrics, events): one
frozen dataclass each on _Section, which checks it; every key declared once (_field: checker, default, doc)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kvtier.config.checks import (
    _Bool,
    _Check,
    _checked,
    _Choice,
    _Dir,
    _Float,
    _Int,
    _Optional,
    _Salt,
    _Size,
    _Text,
)
from kvtier.config.rules import _check_rules

METHODS = ("auto", "direct", "staged", "zero_copy", "cpu")
EVICTION_POLICIES = ("lru", "s3fifo", "lfu")
DISK_BACKENDS = ("auto", "io_uring", "posix")
# kvtier.codecs.codec_names(), spelled out: the config package does not import torch
# (tests/test_codec_tier.py checks that the two agree).
CODECS = ("none", "fp8", "byteplane_zstd")
FP8_SCALE_DTYPES = ("bfloat16", "float32")
CODEC_DEVICES = ("host", "gpu")


def _field(default: Any, check: _Check, doc: str, *, env: str | None = None, show: bool = True) -> Any:
    """A config field: its checker, one line of documentation and (rarely) its own env name."""
    return field(default=default, repr=show, metadata={"check": check, "doc": doc, "env": env})


def _with_attributes_doc(doc: str | None, lines: list[tuple[str, str]]) -> str:
    """``doc`` with an ``Attributes:`` section of (name, doc) lines appended."""
    body = "\n".join(f"    {name}: {text}" for name, text in lines)
    return (doc or "").rstrip() + "\n\n    Attributes:\n" + body + "\n"


def _plain(value: Any) -> Any:
    """A value as YAML-safe plain data (tuples become lists)."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class _Section:
    """Validates and normalizes every field of a frozen settings dataclass after __init__: each
    field's checker (its ``_field`` metadata), then the rules over several of its keys."""

    SECTION: ClassVar[str] = ""
    # True: Python values only (see _Check); False: text forms as well.
    TYPED: ClassVar[bool] = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = _checked(f"{self.SECTION}.{f.name}", f.metadata["check"], getattr(self, f.name), self.TYPED)
            object.__setattr__(self, f.name, value)
        _check_rules({f"{self.SECTION}.{f.name}": getattr(self, f.name) for f in dataclasses.fields(self)})
        self._check_together()

    def _check_together(self) -> None:
        """Rules of this section that need more than the values (files, other objects)."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class CpuConfig(_Section):
    """The pinned CPU tier and the copies between it and the GPU."""

    SECTION: ClassVar[str] = "cpu"
    bytes: int = _field(1 << 30, _Size(1), "hard capacity of the pinned CPU tier (rounded down to whole chunks)")
    method: str = _field(
        "auto",
        _Choice(METHODS),
        "how bytes cross PCIe: DMA of whole pages (direct), DMA after a gather into a GPU "
        "staging buffer (staged), a kernel writing pinned memory (zero_copy), host copies "
        "(cpu); auto picks",
    )
    staging_bytes: int = _field(256 << 20, _Size(1), "GPU staging buffer of the 'staged' method")
    threads: int = _field(2, _Int(1, 1024), "copy threads of the CPU path, and threads of fp8's host pass")
    prefault: bool | None = _field(
        None,
        _Optional(_Bool(), "on in the vLLM connector (a serving process), off elsewhere"),
        "fault in a plain (unpinned) host tier's memory on a background thread at open, so that "
        "first stores do not pay page faults; skipped where the tier exceeds half of MemAvailable "
        "(pinned memory is resident already)",
    )
    eviction_policy: str = _field("lru", _Choice(EVICTION_POLICIES), "which chunk the CPU tier evicts first")
    verify_stores: bool = _field(
        False,
        _Bool(),
        "debug check of store()'s page contract: each stored chunk is copied from its pages a "
        "second time once its copy landed, and differences are counted "
        "(stats()['store_verify_mismatches']); costs a second copy of every stored chunk",
    )


@dataclass(frozen=True)
class CodecConfig(_Section):
    """How chunks are encoded below the GPU: in the CPU tier, in disk slots and between peers."""

    SECTION: ClassVar[str] = "codec"
    name: str = _field(
        "none",
        _Choice(CODECS),
        "the codec of every chunk below the GPU: none (raw), fp8 (e4m3, a scale per token per "
        "head; lossy, about half the bytes) or byteplane_zstd (lossless; blocks and slots keep "
        "its worst case, so no capacity gain unless codec.slot_fraction is below 1)",
    )
    fp8_scale_dtype: str = _field(
        "bfloat16", _Choice(FP8_SCALE_DTYPES), "dtype of fp8's scales (bfloat16: smaller, same error)"
    )
    zstd_level: int = _field(1, _Int(-7, 22), "zstd level of byteplane_zstd")
    slot_fraction: float = _field(
        1.0,
        _Float(0.0, hi=1.0),
        "a variable-size codec's (byteplane_zstd's) CPU block and disk slot as a fraction of its "
        "largest blob: 1 holds every chunk; below 1 holds 1/fraction as many chunks, and a chunk "
        "whose blob does not fit is not stored (a miss, counted in stats codec_blob_too_large). "
        "Fixed-size codecs (fp8) take only 1",
    )
    device: str = _field(
        "host",
        _Choice(CODEC_DEVICES),
        "where chunks are encoded and decoded: host (gathered into pinned memory, then coded by "
        "the CPU) or gpu (gathered, coded and scattered on the GPU: encoded bytes cross PCIe; a "
        "layout on a CUDA device only)",
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
    bytes: int = _field(0, _Size(0), "hard capacity of the disk tier's cache file (required when dir is set)")
    backend: str = _field("auto", _Choice(DISK_BACKENDS), "I/O backend: io_uring where it works (auto), or forced")
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
    write_through: bool = _field(
        True,
        _Bool(),
        "write each chunk the admission rule admits to disk soon after it reaches the CPU tier "
        "(on a thread of the tier) instead of when it is evicted: an eviction then finds it on "
        "disk and frees its block at once, so a store into a full CPU tier does not wait for the "
        "disk. Costs the writes of chunks that would have left without a write-back; off with "
        "deterministic_writeback",
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
    model_id: str = _field("default", _Text(), "the model's name; part of every chunk key", env="KVTIER_MODEL_ID")
    tenant_salt: str | bytes | None = _field(
        None,
        _Optional(_Salt(), "no salt", none_words=()),
        "per-tenant secret in the key namespace; '' is a salt, distinct from null",
        show=False,
    )
    chunk_tokens: int = _field(256, _Int(1), "tokens per chunk, the caching unit (a multiple of gpu.page_tokens)")


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
    prometheus_addr: str = _field("127.0.0.1", _Text(), "address the endpoint binds ('0.0.0.0' exposes it)")
    namespace: str = _field(
        "kvtier",
        _Text(r"[a-zA-Z_][a-zA-Z0-9_]*", "a Prometheus name: [a-zA-Z_][a-zA-Z0-9_]*"),
        "prefix of every metric name",
    )


@dataclass(frozen=True)
class EventsConfig(_Section):
    """KV events: which chunks each medium gained or lost, for routers (kvtier.events)."""

    SECTION: ClassVar[str] = "events"
    capacity: int = _field(
        65536,
        _Int(0, 1 << 30),
        "events kept for take_events() per cache (and per GPU pool); past it the oldest are "
        "dropped and counted (stats()['events_dropped']); 0 records none",
    )
