"""KV layouts: where a model's KV pages live in memory, as segments of equally strided pages.

A :class:`Layout` turns an inference engine's KV tensors (vLLM, FlashInfer NHD/HND, MLA, a
contiguous HF-transformers cache, or kvtier's own cross-layer pool) into one description the C++
core copies with: a list of :class:`Segment`, each a base pointer, a page stride and the number
of contiguous bytes of one page. Page ``p`` of segment ``s`` is the byte range
``[s.base_ptr + p * s.page_stride, ... + s.page_bytes)``.

A chunk's blob is segment-major: the ``pages_per_chunk`` pages of segment 0, then those of
segment 1, and so on, so that one layer's bytes form one contiguous range of the blob.

This module reads tensor metadata only (shapes, strides, pointers); it never imports the
compiled core and needs torch only for the ``from_*`` tensor constructors.

Example::

    >>> import torch
    >>> kv = [torch.zeros(2, 64, 16, 8, 128, dtype=torch.bfloat16) for _ in range(4)]
    >>> layout = Layout.from_vllm(kv, chunk_tokens=256)
    >>> len(layout.segments), layout.pages_per_chunk, layout.chunk_bytes
    (8, 16, 4194304)
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from hashlib import blake2b

from kvtier.errors import InvalidArgumentError

__all__ = ["FINGERPRINT_BYTES", "Layout", "Segment", "Shard"]

FINGERPRINT_BYTES = 16
"""Length of :attr:`Layout.fingerprint` in bytes."""

# Bump when the meaning of a blob changes (page order, what a segment holds, the encoding below):
# every old blob then mismatches instead of being read as the new format.
_FINGERPRINT_TAG = b"kvtier-layout-v1"

# Every bad argument raises InvalidArgumentError (a ValueError), wrong types included (hence the
# TRY004 waivers), so callers catch one class.

# Element sizes for from_segments, which has no tensor to ask.
_ELEMENT_SIZES = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Segment:
    """One run of equally strided pages: layer x K/V (vLLM, FlashInfer), one layer (MLA), one
    head of one layer's K or V (HF), or a whole cross-layer pool.

    Page ``p`` occupies ``[base_ptr + p * page_stride, base_ptr + p * page_stride + page_bytes)``.

    Attributes:
        base_ptr: address of page 0 (device or host memory, as the layout's ``device`` says).
        page_stride: bytes between the starts of consecutive pages; ``>= page_bytes``.
        page_bytes: contiguous bytes of one page.
        num_pages: pages in the segment.
        name: for messages, e.g. ``"layer3.k"``.

    Example::

        >>> seg = Segment(base_ptr=0x1000, page_stride=8192, page_bytes=4096, num_pages=4,
        ...               name="layer0.k")
        >>> hex(seg.page_ptr(2))
        '0x5000'
    """

    base_ptr: int
    page_stride: int
    page_bytes: int
    num_pages: int
    name: str

    def __post_init__(self) -> None:
        for field in ("base_ptr", "page_stride", "page_bytes", "num_pages"):
            value = getattr(self, field)
            if not _is_int(value):
                raise InvalidArgumentError(f"Segment {self.name!r}: {field} must be an int, got {value!r}")
        if self.base_ptr <= 0:
            raise InvalidArgumentError(f"Segment {self.name!r}: base_ptr must be a non-null address")
        if self.page_bytes <= 0:
            raise InvalidArgumentError(f"Segment {self.name!r}: page_bytes must be > 0, got {self.page_bytes}")
        if self.num_pages <= 0:
            raise InvalidArgumentError(f"Segment {self.name!r}: num_pages must be > 0, got {self.num_pages}")
        if self.num_pages > 1 and self.page_stride < self.page_bytes:
            # Overlapping pages would make a store of one page clobber its neighbour.
            raise InvalidArgumentError(
                f"Segment {self.name!r}: page_stride ({self.page_stride}) is smaller than "
                f"page_bytes ({self.page_bytes}), so pages overlap"
            )

    def page_ptr(self, page: int) -> int:
        """Address of page ``page`` (0 <= page < num_pages)."""
        if not 0 <= page < self.num_pages:
            raise InvalidArgumentError(f"Segment {self.name!r}: page {page} out of range [0, {self.num_pages})")
        return self.base_ptr + page * self.page_stride


def disk_geometry_label(chunk_tokens: int | None, codec_spec: str | None = None, slot_bytes: int | None = None) -> str:
    """The label a disk cache file of chunks of ``chunk_tokens`` tokens carries (``""`` for the
    chunk size when the writer does not know it: a peer node given only blob bytes), then, for
    encoded chunks, the codec's spec (``codec=...``) and a slot below the codec's largest blob
    (``slot=N``)."""
    parts = [] if chunk_tokens is None else [f"chunk_tokens={int(chunk_tokens)}"]
    if codec_spec is not None:
        parts.append(f"codec={codec_spec}")
    if slot_bytes is not None:
        parts.append(f"slot={int(slot_bytes)}")
    return " ".join(parts)


@dataclass(frozen=True)
class Shard:
    """Which part of a model's KV one process holds, when the model is split over processes:
    tensor-parallel rank ``tp_rank`` of ``tp_size`` (its share of the KV heads) in pipeline stage
    ``pp_rank`` of ``pp_size`` (its share of the layers).

    A sharded :class:`Layout`'s :attr:`Layout.fingerprint` names the shard, so one shard's blobs
    never meet another's (peers and disk files check it), while chunk keys come from
    :attr:`Layout.key_fingerprint`, which names only the split (``tp_size``, ``pp_size``): every
    rank of a deployment names a prefix's chunk with the same key, and two deployments with the
    same split share shard for shard.
    """

    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1

    def __post_init__(self) -> None:
        for size, rank in (("tp_size", "tp_rank"), ("pp_size", "pp_rank")):
            n, r = getattr(self, size), getattr(self, rank)
            if not _is_int(n) or n <= 0:
                raise InvalidArgumentError(f"Shard.{size} must be a positive int, got {n!r}")
            if not _is_int(r) or not 0 <= r < n:
                raise InvalidArgumentError(f"Shard.{rank} must be an int in [0, {n}), got {r!r}")

    @property
    def rank(self) -> int:
        """The shard's index among all ``tp_size * pp_size`` shards (stage-major)."""
        return self.pp_rank * self.tp_size + self.tp_rank

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def label(self) -> str:
        """``tp<rank>of<size>-pp<rank>of<size>``: a name for this shard's files and logs."""
        return f"tp{self.tp_rank}of{self.tp_size}-pp{self.pp_rank}of{self.pp_size}"


class Layout:
    """Where one model's KV pages live: segments, page and chunk geometry, and a fingerprint.

    Build one with a ``from_*`` constructor; the attributes are read-only.

    Attributes:
        kind: which constructor described the memory: ``"vllm"``, ``"flashinfer_nhd"``,
            ``"flashinfer_hnd"``, ``"mla"``, ``"hf"``, ``"cross_layer"``, or the kind given to
            :meth:`from_segments`.
        segments: tuple of :class:`Segment`, in blob order.
        num_layers: model layers covered.
        page_tokens: tokens per page.
        chunk_tokens: tokens per chunk, a multiple of ``page_tokens``.
        pages_per_chunk: ``chunk_tokens // page_tokens``.
        num_pages: pages per segment (equal in every segment).
        dtype: element type name, e.g. ``"bfloat16"``.
        element_size: bytes per element.
        device: ``"cpu"``, ``"cuda:0"``, ...
        page_shape: per-page element shape of one segment, e.g. ``(page_tokens, kv_heads,
            head_dim)`` for vLLM.
        chunk_bytes: payload bytes of one blob, ``sum(page_bytes) * pages_per_chunk``.
        fingerprint: 16 bytes naming the blob format (see :attr:`fingerprint`).
        shard: the :class:`Shard` of a model split over processes, or None.
        key_fingerprint: what chunk keys are scoped by (see :attr:`key_fingerprint`).
        tensors: the source tensors, held so that the pointers stay valid.

    A Layout is a snapshot of pointers: it is valid while its tensors are neither freed nor
    reallocated (an HF ``DynamicCache`` reallocates as it grows, so describe it after prefill).
    """

    __slots__ = (
        "_fingerprint",
        "_key_fingerprint",
        "_layer_segments",
        "_segment_offsets",
        "chunk_bytes",
        "chunk_tokens",
        "device",
        "dtype",
        "element_size",
        "kind",
        "num_layers",
        "num_pages",
        "page_shape",
        "page_tokens",
        "pages_per_chunk",
        "segments",
        "shard",
        "tensors",
    )

    def __init__(
        self,
        *,
        kind: str,
        segments: Sequence[Segment],
        num_layers: int,
        page_tokens: int,
        chunk_tokens: int,
        dtype: str,
        element_size: int,
        device: str,
        page_shape: Sequence[int],
        layer_segments: Sequence[Sequence[int]],
        tensors: Sequence = (),
        shard: Shard | None = None,
    ) -> None:
        """Validate and freeze a layout; prefer the ``from_*`` constructors."""
        if shard is not None and not isinstance(shard, Shard):
            raise InvalidArgumentError(f"shard must be a kvtier.layout.Shard or None, got {type(shard).__name__}")
        if not isinstance(kind, str) or not kind:
            raise InvalidArgumentError(f"kind must be a non-empty str, got {kind!r}")
        segments = tuple(segments)
        if not segments:
            raise InvalidArgumentError("segments must not be empty")
        for s in segments:
            if not isinstance(s, Segment):
                raise InvalidArgumentError(f"segments must be Segment objects, got {type(s).__name__}")
        page_tokens, chunk_tokens = _check_page_and_chunk_tokens(page_tokens, chunk_tokens)
        if not _is_int(num_layers) or num_layers <= 0:
            raise InvalidArgumentError(f"num_layers must be a positive int, got {num_layers!r}")
        if not _is_int(element_size) or element_size <= 0:
            raise InvalidArgumentError(f"element_size must be a positive int, got {element_size!r}")
        num_pages = segments[0].num_pages
        for s in segments:
            if s.num_pages != num_pages:
                raise InvalidArgumentError(
                    f"segments have different num_pages: {segments[0].name!r} has {num_pages}, "
                    f"{s.name!r} has {s.num_pages}"
                )
        page_shape = tuple(int(d) for d in page_shape)
        if not page_shape or min(page_shape) <= 0:
            raise InvalidArgumentError(f"page_shape must be non-empty with positive dims, got {page_shape}")
        layer_segments = tuple(tuple(int(i) for i in group) for group in layer_segments)
        if len(layer_segments) != num_layers:
            raise InvalidArgumentError(f"layer_segments has {len(layer_segments)} entries for {num_layers} layers")
        for layer, group in enumerate(layer_segments):
            # Layer-wise loading relies on a layer's bytes being one contiguous blob range.
            if not group or list(group) != list(range(group[0], group[0] + len(group))):
                raise InvalidArgumentError(
                    f"layer_segments[{layer}] = {group} must be a non-empty run of consecutive segment indices"
                )
            if group[0] < 0 or group[-1] >= len(segments):
                raise InvalidArgumentError(
                    f"layer_segments[{layer}] = {group} refers to segments outside [0, {len(segments)})"
                )
        pages_per_chunk = chunk_tokens // page_tokens
        offsets = [0]
        for s in segments:
            offsets.append(offsets[-1] + s.page_bytes * pages_per_chunk)

        setattr_ = object.__setattr__
        setattr_(self, "kind", kind)
        setattr_(self, "segments", segments)
        setattr_(self, "num_layers", num_layers)
        setattr_(self, "page_tokens", page_tokens)
        setattr_(self, "chunk_tokens", chunk_tokens)
        setattr_(self, "pages_per_chunk", pages_per_chunk)
        setattr_(self, "num_pages", num_pages)
        setattr_(self, "dtype", str(dtype))
        setattr_(self, "element_size", element_size)
        setattr_(self, "device", str(device))
        setattr_(self, "page_shape", page_shape)
        setattr_(self, "chunk_bytes", offsets[-1])
        setattr_(self, "tensors", tuple(tensors))
        setattr_(self, "_layer_segments", layer_segments)
        setattr_(self, "_segment_offsets", tuple(offsets))
        setattr_(self, "shard", shard)
        setattr_(self, "_fingerprint", self._compute_fingerprint(with_rank=True))
        setattr_(self, "_key_fingerprint", self._compute_fingerprint(with_rank=False))

    def __setattr__(self, name, value) -> None:
        # The fingerprint is computed once; changing a field afterwards would make it lie.
        raise AttributeError(f"Layout is immutable (tried to set {name!r})")

    # ----------------------------------------------------------------------------------------
    # Derived geometry

    @property
    def fingerprint(self) -> bytes:
        """16 bytes naming the blob format this layout reads and writes.

        blake2b-128 over a length-prefixed encoding of: the format version, ``kind``, ``dtype``,
        ``page_tokens``, ``chunk_tokens``, ``num_layers``, the number of segments, each
        segment's ``page_bytes``, ``page_shape`` and the layer-to-segment grouping.

        It leaves out pointers, strides, ``num_pages`` and ``device``: two instances with
        different pool sizes, addresses or GPUs write identical blobs and must share them. It
        differs whenever dtype, per-page shapes, page size or chunk size differ, since then the
        same blob bytes would mean different KV. A sharded layout's also covers its
        :class:`Shard` (split and ranks): equally shaped shards hold different heads or layers.
        """
        return self._fingerprint

    @property
    def key_fingerprint(self) -> bytes:
        """16 bytes that chunk keys are scoped by (:meth:`kvtier.keys.ChunkKeyer.from_layout`):
        :attr:`fingerprint` for an unsharded layout; for a sharded one, the same encoding with
        the split (``tp_size``, ``pp_size``) but not the ranks, so that every rank of a
        deployment keys a prefix alike (a router, vLLM's event aggregation) while
        :attr:`fingerprint` keeps their blobs apart."""
        return self._key_fingerprint

    @property
    def fingerprint_hex(self) -> str:
        """:attr:`fingerprint` as 32 lowercase hex digits."""
        return self._fingerprint.hex()

    @property
    def geometry_label(self) -> str:
        """The words a disk cache file's header records beside :attr:`fingerprint`
        (``chunk_tokens=N``), so a refusal to open another geometry's file can say what it holds."""
        return disk_geometry_label(self.chunk_tokens)

    def layer_segments(self, layer: int) -> tuple[int, ...]:
        """Indices into :attr:`segments` of layer ``layer``'s segments (consecutive).

        ``(2*layer, 2*layer + 1)`` for vLLM / FlashInfer (K, V); ``(layer,)`` for MLA;
        ``2 * kv_heads`` segments for HF; ``(0,)`` for every layer of a cross-layer pool.
        """
        if not _is_int(layer) or not 0 <= layer < self.num_layers:
            raise InvalidArgumentError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return self._layer_segments[layer]

    def segment_offset_in_blob(self, segment: int) -> int:
        """Byte offset in a blob's payload where segment ``segment``'s pages start.

        ``segment == len(segments)`` gives :attr:`chunk_bytes`, the end of the last segment.
        """
        if not _is_int(segment) or not 0 <= segment <= len(self.segments):
            raise InvalidArgumentError(f"segment must be an int in [0, {len(self.segments)}], got {segment!r}")
        return self._segment_offsets[segment]

    def layer_range_in_blob(self, layer: int) -> tuple[int, int]:
        """``(offset, length)`` of layer ``layer``'s bytes in a blob's payload: one range, since
        a layer's segments are consecutive. For a cross-layer pool it is the whole payload."""
        group = self.layer_segments(layer)
        start = self._segment_offsets[group[0]]
        return start, self._segment_offsets[group[-1] + 1] - start

    def to_core_segments(self) -> list[tuple[int, int, int, int]]:
        """``[(base_ptr, page_stride, page_bytes, num_pages), ...]`` in blob order, for the C++
        core's gather/scatter."""
        return [(s.base_ptr, s.page_stride, s.page_bytes, s.num_pages) for s in self.segments]

    def _compute_fingerprint(self, with_rank: bool) -> bytes:
        def text(value: str) -> bytes:
            raw = value.encode("utf-8")
            return struct.pack("<Q", len(raw)) + raw

        def ints(values) -> bytes:
            values = list(values)
            return struct.pack(f"<Q{len(values)}q", len(values), *values)

        h = blake2b(_FINGERPRINT_TAG, digest_size=FINGERPRINT_BYTES)
        h.update(text(self.kind))
        h.update(text(self.dtype))
        h.update(ints([self.page_tokens, self.chunk_tokens, self.num_layers]))
        h.update(ints([len(self.segments)]))
        h.update(ints(s.page_bytes for s in self.segments))
        h.update(ints(self.page_shape))
        for group in self._layer_segments:
            h.update(ints(group))
        if self.shard is not None:  # unsharded layouts keep the fingerprint they always had
            sh = self.shard
            h.update(text("shard"))
            h.update(ints([sh.tp_size, sh.pp_size]))
            if with_rank:
                h.update(ints([sh.tp_rank, sh.pp_rank]))
        return h.digest()

    def __repr__(self) -> str:
        return (
            f"Layout(kind={self.kind!r}, num_layers={self.num_layers}, "
            f"segments={len(self.segments)}, page_shape={self.page_shape}, "
            f"page_tokens={self.page_tokens}, chunk_tokens={self.chunk_tokens}, "
            f"num_pages={self.num_pages}, dtype={self.dtype!r}, device={self.device!r}, "
            f"chunk_bytes={self.chunk_bytes}, fingerprint={self.fingerprint_hex}"
            + (f", shard={self.shard.label!r})" if self.shard is not None else ")")
        )

    # ----------------------------------------------------------------------------------------
    # Constructors

    @classmethod
    def from_segments(
        cls,
        segments: Sequence[Segment],
        *,
        page_tokens: int,
        chunk_tokens: int = 256,
        dtype: str,
        page_shape: Sequence[int],
        num_layers: int | None = None,
        layer_segments: Sequence[Sequence[int]] | None = None,
        kind: str = "segments",
        device: str = "cpu",
        element_size: int | None = None,
        tensors: Sequence = (),
        shard: Shard | None = None,
    ) -> Layout:
        """A layout from explicit segments, for memory kvtier did not get as torch tensors.

        Without ``layer_segments`` the segments are split evenly over ``num_layers`` layers
        (default: one segment per layer). ``element_size`` defaults to the size of ``dtype``.
        The caller keeps the memory alive; pass ``tensors`` to have the layout hold it.
        ``shard``: the part of a split model these segments hold (:class:`Shard`).

        Example::

            >>> segs = [Segment(0x10000 * (i + 1), 4096, 4096, 8, f"layer{i // 2}.{'kv'[i % 2]}")
            ...         for i in range(4)]
            >>> layout = Layout.from_segments(segs, page_tokens=16, chunk_tokens=64,
            ...                               dtype="bfloat16", page_shape=(16, 1, 128),
            ...                               num_layers=2)
            >>> layout.layer_segments(1), layout.chunk_bytes
            ((2, 3), 65536)
        """
        segments = tuple(segments)
        if not segments:
            raise InvalidArgumentError("segments must not be empty")
        if element_size is None:
            if dtype not in _ELEMENT_SIZES:
                raise InvalidArgumentError(f"dtype {dtype!r} has no known element size; pass element_size")
            element_size = _ELEMENT_SIZES[dtype]
        if layer_segments is None:
            if num_layers is None:
                num_layers = len(segments)
            if not _is_int(num_layers) or num_layers <= 0 or len(segments) % num_layers:
                raise InvalidArgumentError(
                    f"num_layers ({num_layers!r}) must be a positive int dividing the "
                    f"{len(segments)} segments; otherwise pass layer_segments"
                )
            per_layer = len(segments) // num_layers
            layer_segments = [tuple(range(i * per_layer, (i + 1) * per_layer)) for i in range(num_layers)]
        elif num_layers is None:
            num_layers = len(layer_segments)
        return cls(
            kind=kind,
            segments=segments,
            num_layers=num_layers,
            page_tokens=page_tokens,
            chunk_tokens=chunk_tokens,
            dtype=dtype,
            element_size=element_size,
            device=device,
            page_shape=page_shape,
            layer_segments=layer_segments,
            tensors=tensors,
            shard=shard,
        )

    @classmethod
    def from_vllm(cls, kv_caches, page_tokens: int | None = None, chunk_tokens: int = 256) -> Layout:
        """Describe vLLM's per-layer paged KV (FlashAttention-style backends).

        Args:
            kv_caches: one tensor per layer (a list, or vLLM's ``{layer_name: tensor}`` dict in
                layer order), each ``[2, num_pages, page_tokens, kv_heads, head_dim]``: K at
                index 0, V at 1. One page (``[page_tokens, kv_heads, head_dim]``) must be
                contiguous; the page stride and the K-to-V distance may be anything.
            page_tokens: if given, must equal ``shape[2]``.
            chunk_tokens: tokens per chunk, a positive multiple of ``page_tokens``.

        Returns:
            A layout with 2 segments per layer, ``layer{i}.k`` then ``layer{i}.v``.

        Example::

            >>> import torch
            >>> kv = [torch.zeros(2, 32, 16, 8, 128, dtype=torch.float16) for _ in range(2)]
            >>> Layout.from_vllm(kv).layer_segments(1)
            (2, 3)
        """
        tensors = _check_tensors(
            kv_caches,
            "kv_caches",
            rank=5,
            shape_doc="[2, num_pages, page_tokens, kv_heads, head_dim]",
        )
        t0 = tensors[0]
        _check_dim(tensors, "kv_caches", dim=0, size=2, meaning="K/V")
        page_tokens = _resolve_page_tokens(page_tokens, t0.shape[2], "kv_caches", "shape[2]")
        segments = _kv_segments(tensors, kv_dim=0, page_dim=1)
        return cls._from_tensors(
            "vllm",
            tensors,
            segments,
            page_tokens,
            chunk_tokens,
            tuple(t0.shape[2:]),
            per_layer=2,
        )

    @classmethod
    def from_flashinfer(
        cls,
        kv_caches,
        kv_layout: str = "NHD",
        chunk_tokens: int = 256,
        page_tokens: int | None = None,
    ) -> Layout:
        """Describe FlashInfer's per-layer paged KV (also SGLang's FlashInfer pools).

        Args:
            kv_caches: one tensor per layer, ``[num_pages, 2, page_tokens, kv_heads, head_dim]``
                for ``kv_layout="NHD"`` or ``[num_pages, 2, kv_heads, page_tokens, head_dim]``
                for ``"HND"``; K at index 0 of dim 1, V at 1. One page (dims 2..4) must be
                contiguous.
            kv_layout: ``"NHD"`` or ``"HND"``; the kinds differ (``flashinfer_nhd`` /
                ``flashinfer_hnd``) because the bytes of a page are ordered differently.
            chunk_tokens: tokens per chunk, a positive multiple of ``page_tokens``.
            page_tokens: if given, must equal the tensors' page dimension.

        Returns:
            A layout with 2 segments per layer (K, V); K and V pages of one page id interleave.

        Example::

            >>> import torch
            >>> kv = [torch.zeros(32, 2, 8, 16, 64, dtype=torch.float16)]  # HND
            >>> Layout.from_flashinfer(kv, kv_layout="HND").page_shape
            (8, 16, 64)
        """
        if kv_layout not in ("NHD", "HND"):
            raise InvalidArgumentError(f"kv_layout must be 'NHD' or 'HND', got {kv_layout!r}")
        token_dim = 2 if kv_layout == "NHD" else 3
        shape_doc = (
            "[num_pages, 2, page_tokens, kv_heads, head_dim]"
            if kv_layout == "NHD"
            else "[num_pages, 2, kv_heads, page_tokens, head_dim]"
        )
        tensors = _check_tensors(kv_caches, "kv_caches", rank=5, shape_doc=shape_doc)
        t0 = tensors[0]
        _check_dim(tensors, "kv_caches", dim=1, size=2, meaning="K/V")
        page_tokens = _resolve_page_tokens(page_tokens, t0.shape[token_dim], "kv_caches", f"shape[{token_dim}]")
        segments = _kv_segments(tensors, kv_dim=1, page_dim=0)
        return cls._from_tensors(
            f"flashinfer_{kv_layout.lower()}",
            tensors,
            segments,
            page_tokens,
            chunk_tokens,
            tuple(t0.shape[2:]),
            per_layer=2,
        )

    @classmethod
    def from_mla(cls, kv_caches, chunk_tokens: int = 256, page_tokens: int | None = None) -> Layout:
        """Describe an MLA (DeepSeek-style latent) paged cache: one segment per layer.

        Args:
            kv_caches: one tensor per layer, ``[num_pages, page_tokens, latent_dim]`` (e.g.
                ``latent_dim = 512 + 64`` for the compressed KV plus the rope key). One page
                (dims 1..2) must be contiguous.
            chunk_tokens: tokens per chunk, a positive multiple of ``page_tokens``.
            page_tokens: if given, must equal ``shape[1]``.

        Example::

            >>> import torch
            >>> kv = [torch.zeros(16, 64, 576, dtype=torch.bfloat16) for _ in range(3)]
            >>> layout = Layout.from_mla(kv)
            >>> len(layout.segments), layout.layer_segments(2)
            (3, (2,))
        """
        tensors = _check_tensors(kv_caches, "kv_caches", rank=3, shape_doc="[num_pages, page_tokens, latent_dim]")
        t0 = tensors[0]
        page_tokens = _resolve_page_tokens(page_tokens, t0.shape[1], "kv_caches", "shape[1]")
        segments = []
        for i, t in enumerate(tensors):
            _check_page_contiguous(t, (1, 2), f"kv_caches[{i}]")
            esize = t.element_size()
            segments.append(
                Segment(
                    base_ptr=t.data_ptr(),
                    page_stride=t.stride(0) * esize,
                    page_bytes=math.prod(t.shape[1:]) * esize,
                    num_pages=t.shape[0],
                    name=f"layer{i}.kv",
                )
            )
        return cls._from_tensors(
            "mla",
            tensors,
            segments,
            page_tokens,
            chunk_tokens,
            tuple(t0.shape[1:]),
            per_layer=1,
        )

    @classmethod
    def from_hf_cache(cls, layers, page_tokens: int = 16, chunk_tokens: int = 256) -> Layout:
        """Describe a contiguous HF-transformers KV cache of ONE sequence.

        Args:
            layers: per layer ``(key, value)``, each ``[batch, kv_heads, seq, head_dim]`` with
                ``batch == 1`` (a batched cache holds several prompts whose chunks have
                different keys: describe each row separately). Also accepted: a transformers
                ``Cache`` object with ``.layers[i].keys/.values`` or ``.key_cache/.value_cache``.
                Each head's ``[seq, head_dim]`` must be contiguous; the head stride may be
                anything (a ``StaticCache`` sliced to ``[:, :, :seq]`` works).
            page_tokens: tokens per page; here a page is ``page_tokens`` consecutive tokens of
                one head, ``page_tokens * head_dim`` contiguous elements.
            chunk_tokens: tokens per chunk, a positive multiple of ``page_tokens``.

        Returns:
            A layout with ``2 * kv_heads`` segments per layer (``layer{i}.k.head{h}`` for every
            head, then the V heads) and ``num_pages = seq // page_tokens``: tokens past the
            last full page are not addressable (only full chunks are stored anyway). ``seq``
            must be at least ``page_tokens``.

        Example::

            >>> import torch
            >>> kv = [(torch.zeros(1, 4, 512, 64), torch.zeros(1, 4, 512, 64))] * 2
            >>> layout = Layout.from_hf_cache(kv, page_tokens=16)
            >>> len(layout.segments), layout.num_pages, layout.page_shape
            (16, 32, (16, 64))
        """
        pairs = _hf_layer_pairs(layers)
        flat = []
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise InvalidArgumentError(f"layers[{i}] must be a (key, value) pair of tensors")
            flat.extend(pair)
        tensors = _check_tensors(flat, "layers", rank=4, shape_doc="[batch, kv_heads, seq, head_dim]", pairs=True)
        t0 = tensors[0]
        batch, heads, seq, head_dim = t0.shape
        if batch != 1:
            raise InvalidArgumentError(
                f"layers: batch is {batch}, but from_hf_cache describes one sequence (batch "
                "must be 1); slice the cache per sequence, e.g. key[i:i+1]"
            )
        if not _is_int(page_tokens) or page_tokens <= 0:
            raise InvalidArgumentError(f"page_tokens must be a positive int, got {page_tokens!r}")
        if seq < page_tokens:
            raise InvalidArgumentError(
                f"layers: seq ({seq}) is shorter than page_tokens ({page_tokens}); there is no full page to describe"
            )
        segments = []
        for i, t in enumerate(tensors):
            layer, kv = divmod(i, 2)
            what = f"layers[{layer}][{kv}]"
            _check_page_contiguous(t, (2, 3), what, note="each head's [seq, head_dim]")
            esize = t.element_size()
            page_bytes = page_tokens * head_dim * esize
            for h in range(heads):
                segments.append(
                    Segment(
                        base_ptr=t.data_ptr() + h * t.stride(1) * esize,
                        page_stride=page_bytes,
                        page_bytes=page_bytes,
                        num_pages=seq // page_tokens,
                        name=f"layer{layer}.{'kv'[kv]}.head{h}",
                    )
                )
        return cls._from_tensors(
            "hf",
            tensors,
            segments,
            page_tokens,
            chunk_tokens,
            (page_tokens, head_dim),
            per_layer=2 * heads,
            num_layers=len(pairs),
        )

    @classmethod
    def from_cross_layer(cls, kv_pool, chunk_tokens: int = 256, page_tokens: int | None = None) -> Layout:
        """Describe kvtier's own cross-layer page pool: ONE segment, a page holds every layer.

        Args:
            kv_pool: ``[num_pages, num_layers, 2, page_tokens, kv_heads, head_dim]``; one page
                (dims 1..5, all layers' K and V of its tokens) must be contiguous.
            chunk_tokens: tokens per chunk, a positive multiple of ``page_tokens``.
            page_tokens: if given, must equal ``shape[3]``.

        With one segment the blob is page-major: a chunk is ``pages_per_chunk`` large contiguous
        copies, which DMA moves at full speed without a gather kernel. The price: a chunk's
        layers are interleaved page by page, so layer-wise loading cannot release layer 0
        early; all layers complete together (``layer_segments(i) == (0,)`` for every layer).

        Example::

            >>> import torch
            >>> pool = torch.zeros(64, 4, 2, 16, 8, 64, dtype=torch.float16)
            >>> layout = Layout.from_cross_layer(pool, chunk_tokens=64)
            >>> len(layout.segments), layout.num_layers, layout.layer_range_in_blob(3)
            (1, 4, (0, 524288))
        """
        if not type(kv_pool).__module__.startswith("torch"):
            raise InvalidArgumentError(f"kv_pool must be one torch tensor, got {type(kv_pool).__name__}")
        tensors = _check_tensors(
            [kv_pool],
            "kv_pool",
            rank=6,
            shape_doc="[num_pages, num_layers, 2, page_tokens, kv_heads, head_dim]",
        )
        t = tensors[0]
        _check_dim(tensors, "kv_pool", dim=2, size=2, meaning="K/V", single=True)
        page_tokens = _resolve_page_tokens(page_tokens, t.shape[3], "kv_pool", "shape[3]")
        _check_page_contiguous(t, (1, 2, 3, 4, 5), "kv_pool")
        esize = t.element_size()
        segment = Segment(
            base_ptr=t.data_ptr(),
            page_stride=t.stride(0) * esize,
            page_bytes=math.prod(t.shape[1:]) * esize,
            num_pages=t.shape[0],
            name="pool",
        )
        num_layers = t.shape[1]
        return cls(
            kind="cross_layer",
            segments=[segment],
            num_layers=num_layers,
            page_tokens=page_tokens,
            chunk_tokens=chunk_tokens,
            dtype=_dtype_name(t),
            element_size=esize,
            device=str(t.device),
            page_shape=tuple(t.shape[1:]),
            layer_segments=[(0,)] * num_layers,
            tensors=tensors,
        )

    @classmethod
    def _from_tensors(
        cls,
        kind,
        tensors,
        segments,
        page_tokens,
        chunk_tokens,
        page_shape,
        *,
        per_layer,
        num_layers=None,
    ) -> Layout:
        if num_layers is None:
            num_layers = len(tensors)
        t0 = tensors[0]
        return cls(
            kind=kind,
            segments=segments,
            num_layers=num_layers,
            page_tokens=page_tokens,
            chunk_tokens=chunk_tokens,
            dtype=_dtype_name(t0),
            element_size=t0.element_size(),
            device=str(t0.device),
            page_shape=page_shape,
            layer_segments=[tuple(range(i * per_layer, (i + 1) * per_layer)) for i in range(num_layers)],
            tensors=tensors,
        )


# --------------------------------------------------------------------------------------------
# Tensor checks shared by the constructors. Each names the argument and the problem, because a
# wrong layout would otherwise surface as silently wrong KV much later.


def _kv_segments(tensors, *, kv_dim: int, page_dim: int) -> list[Segment]:
    """K then V segment of each per-layer tensor whose dims 0 and 1 are K/V and page (either
    order) and whose dims 2.. are one contiguous page."""
    segments = []
    for i, t in enumerate(tensors):
        _check_page_contiguous(t, (2, 3, 4), f"kv_caches[{i}]")
        esize = t.element_size()
        page_bytes = math.prod(t.shape[2:]) * esize
        for kv, name in enumerate("kv"):
            segments.append(
                Segment(
                    base_ptr=t.data_ptr() + kv * t.stride(kv_dim) * esize,
                    page_stride=t.stride(page_dim) * esize,
                    page_bytes=page_bytes,
                    num_pages=t.shape[page_dim],
                    name=f"layer{i}.{name}",
                )
            )
    return segments


def _dtype_name(tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _check_page_and_chunk_tokens(page_tokens, chunk_tokens) -> tuple[int, int]:
    if not _is_int(page_tokens) or page_tokens <= 0:
        raise InvalidArgumentError(f"page_tokens must be a positive int, got {page_tokens!r}")
    if not _is_int(chunk_tokens) or chunk_tokens <= 0 or chunk_tokens % page_tokens:
        raise InvalidArgumentError(
            f"chunk_tokens must be a positive multiple of page_tokens ({page_tokens}), got {chunk_tokens!r}"
        )
    return page_tokens, chunk_tokens


def _resolve_page_tokens(given, actual, arg: str, where: str) -> int:
    actual = int(actual)
    if given is not None and given != actual:
        raise InvalidArgumentError(f"page_tokens={given!r} does not match {arg}: {where} is {actual}")
    return actual


def _check_tensors(tensors, arg: str, *, rank: int, shape_doc: str, pairs: bool = False):
    """Check one tensor per layer (or per K/V when ``pairs``): same rank, shape, dtype, device."""
    if isinstance(tensors, Mapping):
        tensors = list(tensors.values())
    if not isinstance(tensors, (list, tuple)):
        raise InvalidArgumentError(f"{arg} must be a list of tensors, got {type(tensors).__name__}")
    tensors = tuple(tensors)
    if not tensors:
        raise InvalidArgumentError(f"{arg} is empty: need at least one layer")

    def label(i: int) -> str:
        return f"{arg}[{i // 2}][{i % 2}]" if pairs else f"{arg}[{i}]"

    for i, t in enumerate(tensors):
        if not type(t).__module__.startswith("torch") or not hasattr(t, "data_ptr"):
            raise InvalidArgumentError(f"{label(i)} must be a torch tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise InvalidArgumentError(
                f"{label(i)} has rank {t.dim()} (shape {tuple(t.shape)}), expected {rank}: {shape_doc}"
            )
        if t.numel() == 0:
            raise InvalidArgumentError(f"{label(i)} has no elements (shape {tuple(t.shape)})")
    t0 = tensors[0]
    for i, t in enumerate(tensors[1:], start=1):
        if t.device != t0.device:
            raise InvalidArgumentError(
                f"{arg}: tensors are on mixed devices: {label(0)} on {t0.device}, {label(i)} on {t.device}"
            )
        if t.dtype != t0.dtype:
            raise InvalidArgumentError(
                f"{arg}: mixed dtypes: {label(0)} is {_dtype_name(t0)}, {label(i)} is {_dtype_name(t)}"
            )
        if t.shape != t0.shape:
            raise InvalidArgumentError(
                f"{arg}: shapes differ between layers: {label(0)} is {tuple(t0.shape)}, {label(i)} is {tuple(t.shape)}"
            )
    if t0.device.type == "meta":
        raise InvalidArgumentError(f"{arg}: meta tensors have no memory to describe")
    return tensors


def _check_dim(tensors, arg: str, *, dim: int, size: int, meaning: str, single=False) -> None:
    t0 = tensors[0]
    if t0.shape[dim] != size:
        where = arg if single else f"{arg}[0]"
        raise InvalidArgumentError(f"{where}: dimension {dim} must be {size} ({meaning}), got shape {tuple(t0.shape)}")


def _check_page_contiguous(tensor, dims, what: str, note: str = "one page") -> None:
    """Raise unless dims ``dims`` (the page) of ``tensor`` are densely packed, row-major.

    Size-1 dims are skipped: their stride never changes an address, and torch reports
    arbitrary strides for them.
    """
    expected = 1
    for d in reversed(dims):
        size = tensor.shape[d]
        if size != 1 and tensor.stride(d) != expected:
            shape = tuple(tensor.shape[k] for k in dims)
            strides = tuple(tensor.stride(k) for k in dims)
            raise InvalidArgumentError(
                f"{what}: the bytes of {note} are not contiguous: dims {tuple(dims)} have shape "
                f"{shape} and strides {strides} (in elements); dim {d} needs stride {expected}"
            )
        expected *= size


def _hf_layer_pairs(layers):
    """Normalize a legacy tuple cache or a transformers Cache object to [(key, value), ...]."""
    if isinstance(layers, (list, tuple)):
        return list(layers)
    cache_layers = getattr(layers, "layers", None)
    if cache_layers is not None:  # transformers >= 4.54: Cache.layers[i].keys / .values
        return [(layer.keys, layer.values) for layer in cache_layers]
    if hasattr(layers, "key_cache") and hasattr(layers, "value_cache"):
        return list(zip(layers.key_cache, layers.value_cache))
    raise InvalidArgumentError(
        f"layers must be a list of (key, value) tensor pairs or a transformers Cache, got {type(layers).__name__}"
    )
