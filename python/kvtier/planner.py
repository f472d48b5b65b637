"""Load-or-recompute planning: for each cached chunk below the GPU, is loading it faster than
recomputing it?

A chunk on a slow tier behind a fast GPU is cheaper to recompute: the planner compares, chunk by
chunk, the time to move its bytes from its tier (bytes / the tier's bandwidth, plus a per-request
latency) with the time to prefill its tokens at their position (a transformer's prefill FLOPs
grow with the position through attention). It returns how many leading lower-tier chunks to load;
the rest of the prompt is recomputed.

A custom planner is any object with ``plan(pool, gpu_hit_chunks, tiers) -> int`` (the
:class:`LoadPlanner` protocol); pass it as ``PagedKVPool(..., planner=...)``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

__all__ = ["CodecCost", "CostModelPlanner", "LoadPlanner", "ModelCost", "SplitCostModelPlanner", "SplitPlanner"]


@runtime_checkable
class LoadPlanner(Protocol):
    """Decides how many of the lower-tier chunks of a request to load (the rest is recomputed).

    ``tiers[i]`` is ``"cpu"`` or ``"disk"``: where chunk ``gpu_hit_chunks + i`` of the prompt is.
    Called once per request (per batch of chunks), under the pool's lock: keep it cheap.
    """

    def plan(self, pool, gpu_hit_chunks: int, tiers: list[str]) -> int: ...


class SplitPlanner(Protocol):
    """Optional: a planner that also has ``plan_split`` is asked it instead of ``plan``. It returns
    ``(head, load)``: recompute the first ``head`` lower-tier chunks while the next ``load`` are
    loaded in the background, then recompute the rest. (``PagedKVPool`` does the overlap; the
    engine computes the head, calls ``pool.finish_tail(seq)``, then the rest.)"""

    def plan_split(self, pool, gpu_hit_chunks: int, tiers: list[str]) -> tuple[int, int]: ...


@dataclass(frozen=True)
class ModelCost:
    """Prefill cost of a dense decoder: FLOPs per token at position ``p`` =
    ``2 * params + 4 * layers * hidden * p`` (weights, then attention over the ``p`` tokens before).

    ``flops_per_s`` is the GPU's achieved prefill throughput (calibrate it: time a prefill).
    """

    params: float
    layers: int
    hidden: int
    flops_per_s: float

    @classmethod
    def llama3_8b(cls, flops_per_s: float = 400e12) -> ModelCost:
        return cls(params=8.0e9, layers=32, hidden=4096, flops_per_s=flops_per_s)

    @classmethod
    def measured(
        cls, *, params: float, layers: int, hidden: int, prefill_fn, tokens: int = 2048, reps: int = 3
    ) -> ModelCost:
        """Calibrate ``flops_per_s`` by timing ``prefill_fn(tokens)`` (it must prefill that many
        tokens from an empty cache and return once the GPU is done, e.g. after a synchronize):
        the achieved throughput of this model on this GPU, best of ``reps``."""
        prefill_fn(tokens)  # warm-up: first calls pick kernels
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            prefill_fn(tokens)
            best = min(best, time.perf_counter() - t0)
        probe = cls(params=params, layers=layers, hidden=hidden, flops_per_s=1.0)
        return cls(params=params, layers=layers, hidden=hidden, flops_per_s=probe.prefill_seconds(0, tokens) / best)

    def prefill_seconds(self, start: int, end: int) -> float:
        """Seconds to prefill tokens [start, end) given the KV of [0, start) is present."""
        n = end - start
        attention = 4.0 * self.layers * self.hidden * (end * (end - 1) - start * (start - 1)) / 2.0
        return (2.0 * self.params * n + attention) / self.flops_per_s


@dataclass(frozen=True)
class CodecCost:
    """What the codec of the chunks below the GPU (``codec.name``, docs/codecs.md) adds to a load.

    A chunk below the GPU is held as a blob of ``chunk_bytes / ratio`` bytes: disk reads and peer
    pulls move that many, and so does the CPU -> GPU copy when ``decode_on_gpu`` (the bytes
    crossing PCIe are still encoded); on the CPU path (today's) the chunk is decoded on the host
    and the copy moves its ``chunk_bytes``. Decoding costs ``chunk_bytes / decode_bytes_per_s``
    (a rate of the original bytes; None: not priced).

    Attributes:
        name: the codec, for reports.
        ratio: chunk bytes / stored bytes (a block or slot: the codec's largest blob of a chunk).
        decode_bytes_per_s: decode rate, bytes of the original chunk per second.
        decode_on_gpu: the chunk crosses PCIe encoded and is decoded on the GPU.
        encode_bytes_per_s: encode rate of a store (the simulator prices offloads with it; the
            planner plans loads only).
    """

    name: str = "none"
    ratio: float = 1.0
    decode_bytes_per_s: float | None = None
    decode_on_gpu: bool = False
    encode_bytes_per_s: float | None = None

    def __post_init__(self) -> None:
        if not self.ratio > 0:
            raise ValueError(f"CodecCost.ratio must be > 0, got {self.ratio!r}")
        for name in ("decode_bytes_per_s", "encode_bytes_per_s"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"CodecCost.{name} must be > 0 or None, got {v!r}")

    @classmethod
    def of_cache(cls, cache, decode_bytes_per_s: float | None = None) -> CodecCost:
        """The cost of ``cache``'s codec (a KVCache): its ratio is the layout's chunk bytes over
        the tier's block bytes, decoded on the GPU with ``codec.device: gpu``; no codec:
        ``none``, ratio 1."""
        codec = getattr(cache, "codec", None)
        if codec is None:
            return cls()
        on_gpu = cache.config.codec_device == "gpu"
        return cls(codec.spec, cache.layout.chunk_bytes / cache.tier.blob_bytes, decode_bytes_per_s, on_gpu)

    def moved_bytes(self, tier: str, chunk_bytes: int) -> float:
        """Bytes a load of one chunk from ``tier`` moves over the tier's link."""
        if tier == "cpu" and not self.decode_on_gpu:
            return float(chunk_bytes)
        return chunk_bytes / self.ratio

    def stored_bytes(self, chunk_bytes: int) -> int:
        """Bytes of one chunk's block or slot below the GPU."""
        return math.ceil(chunk_bytes / self.ratio)

    def decode_seconds(self, chunk_bytes: int) -> float:
        if self.decode_bytes_per_s is None or self.name == "none":
            return 0.0
        return chunk_bytes / self.decode_bytes_per_s

    def encode_seconds(self, chunk_bytes: int) -> float:
        if self.encode_bytes_per_s is None or self.name == "none":
            return 0.0
        return chunk_bytes / self.encode_bytes_per_s


@dataclass
class CostModelPlanner:
    """The built-in planner: load chunk i while moving its bytes beats recomputing its tokens.

    Attributes:
        model: the prefill cost model.
        bandwidth: bytes/s per tier: "cpu", "disk" and "peer" (chunks peers hold, pulled over
            TCP), e.g. ``{"cpu": 50e9, "disk": 2e9, "peer": 2e9}`` (measured or set). A tier
            without a bandwidth is never loaded from. The "peer" default is the end-to-end rate
            of a loopback pull into GPU pages measured on a GPU host (docs/p2p.md); ``calibrate``
            replaces it with the pool's own measured pulls once it has some.
        latency_s: fixed cost per chunk load per tier (submission, completion).
        codec: the codec below the GPU (:class:`CodecCost`): loads move its stored bytes and
            pay its decode. None: the pool's cache's codec, ratio from its blocks, decode not
            priced (``calibrate`` measures it and sets this).
        last_plan: the inputs and the decision of the latest request (shown in stats).
    """

    model: ModelCost
    bandwidth: dict[str, float] = field(default_factory=lambda: {"cpu": 50e9, "disk": 2e9, "peer": 2e9})
    latency_s: dict[str, float] = field(default_factory=lambda: {"cpu": 20e-6, "disk": 100e-6, "peer": 100e-6})
    codec: CodecCost | None = None
    last_plan: dict = field(default_factory=dict)
    decisions: dict[str, int] = field(default_factory=lambda: {"load": 0, "recompute": 0})

    def chunk_seconds(self, tier: str, chunk_bytes: int, codec: CodecCost | None = None) -> float:
        """Seconds to load one chunk of ``chunk_bytes`` from ``tier``: its stored bytes over the
        tier's bandwidth, its latency, and the codec's decode (``codec``, else ``self.codec``)."""
        bw = self.bandwidth.get(tier)
        if not bw:
            return float("inf")
        codec = codec or self.codec or CodecCost()
        return (
            codec.moved_bytes(tier, chunk_bytes) / bw
            + self.latency_s.get(tier, 0.0)
            + codec.decode_seconds(chunk_bytes)
        )

    def codec_of(self, pool) -> CodecCost:
        """``self.codec``, else the codec of ``pool``'s cache (``none`` without one)."""
        if self.codec is not None:
            return self.codec
        return CodecCost.of_cache(getattr(pool, "cache", None))

    def plan(self, pool, gpu_hit_chunks: int, tiers: list[str]) -> int:
        ct = pool.chunk_tokens
        chunk_bytes = pool.layout.chunk_bytes
        codec = self.codec_of(pool)
        load = 0
        rows = []
        for i, tier in enumerate(tiers):
            start = (gpu_hit_chunks + i) * ct
            t_load = self.chunk_seconds(tier, chunk_bytes, codec)
            t_compute = self.model.prefill_seconds(start, start + ct)
            rows.append((tier, t_load, t_compute))
            if t_load > t_compute:
                break  # the prefix stops here; the rest of the prompt is recomputed
            load += 1
        self.decisions["load"] += load
        self.decisions["recompute"] += len(tiers) - load
        self.last_plan = {
            "gpu_hit_chunks": gpu_hit_chunks,
            "lower_chunks": len(tiers),
            "load_chunks": load,
            "chunk_bytes": chunk_bytes,
            "codec": codec.name,
            "per_chunk": [{"tier": t, "load_s": a, "recompute_s": b} for t, a, b in rows],
        }
        return load

    def calibrate(self, pool, chunks: int = 4, reps: int = 3) -> float:
        """Measure the CPU tier's load bandwidth into ``pool``'s pages (best of ``reps`` loads of
        ``chunks`` chunks), store it in ``bandwidth["cpu"]`` and return it in bytes/s. Where the
        pool has peers and has pulled enough from them (``ChunkSource.pull_rate``), also set
        ``bandwidth["peer"]``: that rate, then the copy into pages.

        Uses free pool pages and fresh random chunk keys (the calibration chunks stay in the CPU
        tier until evicted like any other). The disk tier's bandwidth is not measured here: set it
        from bench_disk's results or your device's specification.
        """
        if pool.cache is None:
            raise ValueError("calibrate needs a pool with a CPU tier (cpu_bytes > 0)")
        tier = pool.cache.tier
        with pool.scratch_pages(chunks * pool.pages_per_chunk) as pages:
            import numpy as np

            page_ids = np.asarray(pages, dtype=np.int64)
            keys = b"".join(os.urandom(16) for _ in range(chunks))
            stream = pool.cache.stream_handle(None)
            op = tier.store(keys, page_ids, stream)
            if op.transfer is not None:
                op.transfer.wait(pool.cache.config.timeout_s)
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                op = tier.load(keys, page_ids, stream)
                if op.chunks < chunks:
                    raise RuntimeError("calibration chunks were evicted from the CPU tier: too small a tier")
                if op.transfer is not None:  # a codec's tier has decoded and copied already
                    op.transfer.wait(pool.cache.config.timeout_s)
                best = min(best, time.perf_counter() - t0)
        codec = pool.cache.codec
        if codec is not None and self.codec is None:
            # A codec's CPU-tier load decodes each chunk on the host, then copies it: the decode
            # is timed apart, and the copy's bandwidth is what remains of the load's time.
            on_gpu = pool.cache.config.codec_device == "gpu"
            decode_s = _decode_seconds(codec, pool.layout, reps, pool.layout.device if on_gpu else "cpu")
            self.codec = CodecCost.of_cache(pool.cache, pool.layout.chunk_bytes / decode_s)
            best = max(best - chunks * decode_s, best * 1e-3)
        bw = chunks * pool.layout.chunk_bytes / best
        self.bandwidth["cpu"] = bw
        peers = pool.cache.peers
        rate = peers.pull_rate() if peers is not None else None
        if rate:  # this pool's own pulls so far (TCP, checksum, into the CPU tier) ...
            # ... then the copy into pages, as a CPU-tier load: the two run one after the other.
            self.bandwidth["peer"] = 1.0 / (1.0 / rate + 1.0 / bw)
        return bw


def _decode_seconds(codec, layout, reps: int, device: str) -> float:
    """Seconds ``codec`` takes to decode one chunk of ``layout`` on ``device`` (best of
    ``reps``), on values drawn like KV (normal), as the codec tier encodes a chunk."""
    import torch

    from kvtier.codec_tier import chunk_shape  # torch: only a cache with a codec gets here

    shape, dtype = chunk_shape(layout)
    blob = codec.encode(torch.randn(shape).to(dtype).to(device))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best = float("inf")
    for _ in range(max(1, reps)):
        sync()
        t0 = time.perf_counter()
        codec.decode(blob, device=device)
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


@dataclass
class SplitCostModelPlanner(CostModelPlanner):
    """The built-in planner with the split: recompute a head while the tail after it loads
    (worth it where a tier is slower than recompute per chunk, such as a disk against a GPU:
    both run at once). Same cost model and calibration as :class:`CostModelPlanner`."""

    def plan_split(self, pool, gpu_hit_chunks: int, tiers: list[str]) -> tuple[int, int]:
        """Recompute the first ``head`` lower-tier chunks while the ``load`` after them are read
        (the pool loads that tail in the background), minimising the modelled time
        ``max(prefill of the head, load of the tail)``. ``head = 0`` loads everything;
        ``load = 0`` recomputes everything. Returns ``(head, load)``."""
        ct = pool.chunk_tokens
        chunk_bytes = pool.layout.chunk_bytes
        codec = self.codec_of(pool)
        n = len(tiers)
        load_s = [self.chunk_seconds(t, chunk_bytes, codec) for t in tiers]
        tail = [0.0] * (n + 1)  # tail[r]: seconds to load chunks [r, n)
        for r in range(n - 1, -1, -1):
            tail[r] = tail[r + 1] + load_s[r]
        start = gpu_hit_chunks * ct
        best = (float("inf"), n)
        for r in range(n + 1):
            t = max(self.model.prefill_seconds(start, start + r * ct), tail[r])
            if t < best[0]:
                best = (t, r)
        head = best[1]
        load = n - head
        self.decisions["load"] += load
        self.decisions["recompute"] += head
        self.last_plan = {
            "gpu_hit_chunks": gpu_hit_chunks,
            "lower_chunks": n,
            "head_chunks": head,
            "load_chunks": load,
            "chunk_bytes": chunk_bytes,
            "modelled_s": {
                "split": best[0],
                "recompute": self.model.prefill_seconds(start, start + n * ct),
                "load": tail[0],
            },
        }
        return head, load
