"""CodecTier: the CPU tier (and the disk and peers below it) holding encoded chunks.

A ``KVCache`` whose codec is not ``none`` keeps, instead of each chunk's raw blob, the blob a
:mod:`kvtier.codecs` codec made of it, in a ``_core.CpuTier`` whose blocks and disk slots are
one encoded chunk long (the codec's largest blob for the layout's chunk: ``fp8`` is fixed size,
so a block is its exact size; ``byteplane_zstd`` varies, so a block holds its worst case, the
raw planes). That inner tier knows nothing of the codec: it stores, evicts, writes back,
recovers, serves peers and checks CRC32C over opaque blobs, exactly as for raw chunks.

- store: the chunk's pages are gathered into a small raw staging tier (the copy engine, from GPU
  or host pages), encoded on the CPU, and put into the inner tier (``begin_put``/``commit_put``).
- load: the inner tier brings the leading chunks (promoting disk ones) into a small host buffer,
  each is decoded on the CPU, put into the staging tier and scattered into the caller's pages by
  the copy engine.
- ``codec_device="gpu"``: the chunks are gathered into and scattered from GPU memory with the
  core's segment copies and coded there; with a fixed-size codec as stacks (``encode_many`` /
  ``decode_many``), the blobs copied straight into the inner tier's blocks and loaded by the
  inner tier straight into GPU memory (its blocks pinned, as for any GPU layout), one wait per
  stack.

Both return once done (the coding and the copies waited for) and run one at a time;
a chunk that does not decode (a blob damaged past the tier's CRC32C, or written by another codec)
ends the load there: a miss, counted in ``stats()["codec_decode_failures"]``.

The inner tier's fingerprint (:func:`codec_fingerprint`) names the layout and the codec's
:attr:`~kvtier.codecs.Codec.spec`: a disk cache file written under one codec does not open under
another (its geometry differs), and peers of different codecs refuse each other's handshake.
Everything else (lookup, events, persist, blob access for peers) is the inner tier's own.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from hashlib import blake2b
from typing import NamedTuple

import numpy as np
import torch

from kvtier import _core
from kvtier.codecs import HEADER_ALIGN, Codec, PagedChunks, read_header
from kvtier.errors import (
    AlreadyExistsError,
    CorruptionError,
    DeadlineExceededError,
    InvalidArgumentError,
    KVTierError,
    ResourceExhaustedError,
)
from kvtier.layout import Layout, disk_geometry_label

__all__ = ["CodecOp", "CodecTier", "chunk_ranges", "codec_fingerprint", "codec_geometry_label", "slot_nbytes"]

log = logging.getLogger(__name__)

_STAGING_CHUNKS = 4  # raw chunks gathered or scattered per copy: the staging tier's size
# The GPU path with a fixed-size codec gathers, encodes and copies (or copies, decodes and
# scatters) a round of chunks at once: _GPU_BATCH_BYTES of raw KV, and at least
# _GPU_BATCH_CHUNKS chunks where those fit in _GPU_BATCH_MAX_BYTES (each round costs the host a
# fixed amount, so big chunks take bigger rounds). Its GPU scratch is a few times a round.
_GPU_BATCH_BYTES = 64 << 20
_GPU_BATCH_CHUNKS = 8
_GPU_BATCH_MAX_BYTES = 256 << 20
# How the GPU path moves bytes between the pages and its raw chunks (both in the layout's GPU
# memory): one copy kernel for all of a call's ranges. A chunk is one range per page of each
# segment (128 ranges of 32 KiB for 256 tokens of a Llama-3-8B layer pair in vLLM's layout), and
# the copy engines pay a fixed cost per range ("dma", cudaMemcpyBatchAsync).
_SEGMENT_METHOD = "kernel"
# GPU stacks: a store's blobs cross PCIe on a stream of their own (the copy engine moves round
# k's blobs while the codec's stream gathers and encodes round k + 1), else on the codec's
# stream (docs/codecs.md, "The stacked GPU path", has both measured).
_D2H_STREAM = True
# GPU stacks and fp8 in host pages: a load issues round k + 1 before it waits for round k, where
# the pool holds both (else once round k has landed).
_LOAD_AHEAD = True
# GPU stacks: a load checks each round's blob headers on a stream of its own (the host's wait for
# the check does not include the decode and scatter of the round before), else on the codec's.
_CHECK_STREAM = True
# GPU stacks: a fixed-size codec that codes chunks in place (Codec.encode_pages / decode_pages)
# reads a store's rows straight from the pages and writes a load's rows straight into them: one
# kernel a round each way, no raw chunks in GPU memory between; else the segment copies gather
# and scatter raw chunks, and the codec codes those (the default: docs/codecs.md says why).
_FUSED_PAGES = False
# Host path with the pages in host memory: a codec that codes chunks in place (fp8) encodes each
# chunk from its pages straight into its block and decodes a load straight into its pages; else
# the chunks are gathered into and scattered from a small staging tier around the codec.
_HOST_PAGES = True
# GPU stacks coded in the pages: a load's header check is made by the decode on the device, its
# counts read once at the end (else each round's check is read back before its decode).
_CHECK_IN_DECODE = True
# A wait for the GPU polls without sleeping for this long first.
_SPIN_S = 300e-6
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_BLOCK = 4096  # the tier's block and disk-slot alignment (O_DIRECT)


class _QueuedStack(NamedTuple):
    """One GPU stack round of a store, queued on the codec's stream and not yet committed."""

    reserved: list  # (index in the round's keys, key, the address of its reserved block)
    handled: int  # the round's chunks reserved or already there, before the first without a block
    full: bool  # the tier had no block for chunk ``handled``
    done: object  # torch.cuda.Event after the round's copies (None: nothing was reserved)
    keep: object  # (raw chunks, blobs, pinned ok flags): alive until the copies end


class CodecOp(NamedTuple):
    """What a CodecTier store or load did; the ``_core.TierOp`` fields, with no transfer left
    running (the copies were waited for)."""

    transfer: None
    chunks: int
    already_cached: int = 0
    skipped_full: int = 0


def codec_fingerprint(layout: Layout, codec: Codec, slot_fraction: float = 1.0) -> bytes:
    """The fingerprint of ``layout``'s chunks encoded by ``codec`` into slots of
    ``slot_nbytes(layout, codec, slot_fraction)``: the layout's for ``none`` (raw chunks are the
    layout's own blobs), else a hash of the layout's fingerprint, the codec's spec and, for a
    slot smaller than the codec's largest blob, the slot's size. Disk files and peer handshakes
    check it."""
    if codec.name == "none":
        return layout.fingerprint
    h = blake2b(b"kvtier-codec-blob", digest_size=len(layout.fingerprint))
    h.update(layout.fingerprint)
    h.update(codec.spec.encode())
    if slot_fraction != 1.0:
        h.update(f"slot={slot_nbytes(layout, codec, slot_fraction)}".encode())
    return h.digest()


def codec_geometry_label(layout: Layout, codec: Codec, slot_fraction: float = 1.0) -> str:
    """The words a disk cache file records beside the fingerprint: the layout's, the codec's
    spec and a reduced slot's size, so that a refused open names what it found."""
    if codec.name == "none":
        return layout.geometry_label
    slot = None if slot_fraction == 1.0 else slot_nbytes(layout, codec, slot_fraction)
    return disk_geometry_label(layout.chunk_tokens, codec.spec, slot)


def chunk_shape(layout: Layout) -> tuple[tuple[int, int], torch.dtype]:
    """The 2-D shape and dtype a raw chunk is encoded as: rows of the page's last dim (one token
    of one head for every built-in layout), so ``fp8``'s default scale is per token per head."""
    dtype = _DTYPES.get(layout.dtype)
    if dtype is None:
        raise InvalidArgumentError(
            f"codec: the layout's KV is {layout.dtype}; codecs encode float16, bfloat16 or float32 KV "
            "(use codec.name 'none')"
        )
    row = layout.page_shape[-1] * layout.element_size
    if layout.chunk_bytes % row:
        raise InvalidArgumentError(
            f"codec: a chunk of {layout.chunk_bytes} bytes is not a whole number of rows of the page's "
            f"last dim ({layout.page_shape[-1]} elements)"
        )
    return (layout.chunk_bytes // row, layout.page_shape[-1]), dtype


def slot_nbytes(layout: Layout, codec: Codec, slot_fraction: float = 1.0) -> int:
    """Bytes of one inner-tier block and disk slot: the codec's largest blob of a chunk, or for
    a variable-size codec that fraction of it (rounded up to 16 bytes, never below its header
    plus 16 bytes): a blob larger than the slot is not stored.

    Raises:
        InvalidArgumentError: ``slot_fraction`` is outside (0, 1], or below 1 for a fixed-size
            codec (its blobs are all one size).
    """
    shape, dtype = chunk_shape(layout)
    worst = codec.max_encoded_nbytes(shape, dtype)
    if not 0.0 < slot_fraction <= 1.0:
        raise InvalidArgumentError(f"codec.slot_fraction must be > 0 and <= 1, got {slot_fraction!r}")
    if slot_fraction == 1.0:
        return worst
    if codec.fixed_size:
        raise InvalidArgumentError(
            f"codec.slot_fraction={slot_fraction} applies to variable-size codecs; every {codec.name} blob "
            f"of this layout is {worst} bytes (set it to 1)"
        )
    floor = len(codec.batch_header(shape, dtype) or b"") + 2 * HEADER_ALIGN
    return max(floor, -(-math.ceil(worst * slot_fraction) // HEADER_ALIGN) * HEADER_ALIGN)


class CodecTier:
    """A ``_core.CpuTier`` look-alike whose blobs are encoded chunks (see the module doc).

    Thread safety: every method may be called from any thread; stores and loads run one at a
    time (they share the staging tier and the decode buffer).
    """

    def __init__(
        self,
        layout: Layout,
        codec: Codec,
        *,
        device: int,
        capacity_bytes: int,
        method: str,
        staging_bytes: int,
        cpu_threads: int,
        timeout_s: float,
        codec_device: str = "host",
        slot_fraction: float = 1.0,
        **inner_options,
    ) -> None:
        if codec_device not in ("host", "gpu"):
            raise InvalidArgumentError(f"codec_device must be 'host' or 'gpu', got {codec_device!r}")
        if codec_device == "gpu" and device < 0:
            raise InvalidArgumentError(
                f"codec.device 'gpu' needs a layout on a CUDA device; this layout is on {layout.device}"
            )
        self.layout = layout
        self.codec = codec
        self.codec_device = codec_device
        self._device = device
        self._stream = torch.cuda.Stream(device) if codec_device == "gpu" else None
        # GPU stacks: the stream a store's blobs cross PCIe on (_D2H_STREAM): one of their own,
        # where the copy engine moves round k's blobs while the codec's stream gathers and
        # encodes round k + 1, or the codec's stream itself.
        self._d2h_stream = None
        if codec_device == "gpu":
            self._d2h_stream = torch.cuda.Stream(device) if _D2H_STREAM else self._stream
        self._check_stream = self._stream
        if codec_device == "gpu" and _CHECK_STREAM:
            self._check_stream = torch.cuda.Stream(device)
        self._shape, self._dtype = chunk_shape(layout)
        self._slot = slot_nbytes(layout, codec, slot_fraction)
        self._slot_fraction = slot_fraction
        self._timeout_s = float(timeout_s)
        # the raw tier's bound on a wait for write-backs: every disk request ends by io_timeout
        self._writeback_wait_s = 2 * float(inner_options.get("disk_io_timeout_s", 10.0)) + 1.0
        self._ppc = layout.pages_per_chunk
        raw_block = math.ceil(layout.chunk_bytes / _BLOCK) * _BLOCK
        # GPU path, fixed-size codec: a call's chunks are encoded and decoded as stacks
        # (Codec.encode_many / decode_many), their blobs copied straight between GPU memory and
        # the inner tier's blocks.
        self._header = None
        self._segments = None  # GPU stacks coded in the pages: the layout's segment table
        self._batch = _STAGING_CHUNKS
        if codec_device == "gpu" and codec.fixed_size:
            self._header = codec.batch_header(self._shape, self._dtype)
            self._header_info = read_header(np.frombuffer(self._header, dtype=np.uint8))
            self._blob_len = codec.encoded_nbytes(self._shape, self._dtype)
            self._batch = gpu_round_chunks(layout.chunk_bytes)
            if self._slot != self._blob_len:
                raise KVTierError(f"codec {codec.name}: {self._slot}-byte slots for {self._blob_len}-byte blobs")
            self._segments = self._segment_table(torch.device("cuda", device)) if _FUSED_PAGES else None
        # Host path, pages in host memory, coded in place: the layout's segment table on the host.
        self._host_segments = None
        self._host_threads = max(1, int(cpu_threads))  # the host pass splits a chunk's rows
        if codec_device == "host" and codec.fixed_size and _HOST_PAGES and torch.device(layout.device).type == "cpu":
            self._host_segments = self._segment_table(torch.device("cpu"))
        if self._host_segments is not None:
            header = codec.batch_header(self._shape, self._dtype)
            self._host_header = torch.frombuffer(bytearray(header), dtype=torch.uint8)
            self._header_info = read_header(self._host_header)
        # Copies the GPU did not finish by the deadline: (event after them, keys whose blocks they
        # write, what they read or write); their blocks are given back once the event has passed.
        self._late: list[tuple[torch.cuda.Event, list[bytes], object]] = []
        self._buf_busy = None  # GPU stacks: the event after a late copy out of the load buffer
        # The host path gathers and scatters raw chunks through a small tier of its own; the GPU
        # path does it with the core's segment copies into GPU memory.
        self._staging = None
        if codec_device == "host" and self._host_segments is None:
            self._staging = _core.CpuTier(
                layout.to_core_segments(),
                device,
                layout.pages_per_chunk,
                [list(layout.layer_segments(i)) for i in range(layout.num_layers)],
                _STAGING_CHUNKS * raw_block,
                method,
                staging_bytes,
                cpu_threads,
                layout_fingerprint=layout.fingerprint,
            )
        # The pages the inner tier loads encoded chunks into (one chunk = one page): with GPU
        # stacks, GPU memory, so a hit's blobs cross PCIe straight from the tier's blocks (pinned,
        # as for any GPU layout) as the raw tier's chunks do; else host memory aligned like its blocks.
        # GPU stacks, and fp8 in host pages, load round k + 1 into one half of the buffer while
        # round k in the other half is checked and decoded.
        if self._header is not None:
            buf_slots = 2 * self._batch
            self._buf = torch.zeros(buf_slots * self._slot, dtype=torch.uint8, device=f"cuda:{device}")
            self._buf_at, inner_device, inner_method = 0, device, method
            self._header_gpu = torch.frombuffer(bytearray(self._header), dtype=torch.uint8).to(self._buf.device)
        else:  # in host pages, two halves as for GPU stacks
            buf_slots = self._batch * (2 if self._host_segments is not None else 1)
            self._buf = torch.zeros(buf_slots * self._slot + _BLOCK, dtype=torch.uint8)
            self._buf_at, inner_device, inner_method = (-self._buf.data_ptr()) % _BLOCK, -1, "cpu"
        inner_layout = [(self._buf.data_ptr() + self._buf_at, self._slot, self._slot, buf_slots)]
        if capacity_bytes < math.ceil(self._slot / _BLOCK) * _BLOCK:
            raise InvalidArgumentError(
                f"cpu_bytes={capacity_bytes} is smaller than one {codec.name} chunk ({self._slot} bytes)"
            )
        self._inner = _core.CpuTier(
            inner_layout,
            inner_device,
            1,
            [[0]],
            capacity_bytes,
            inner_method,
            staging_bytes,
            cpu_threads,
            layout_fingerprint=codec_fingerprint(layout, codec, slot_fraction),
            disk_geometry_label=codec_geometry_label(layout, codec, slot_fraction),
            **inner_options,
        )
        self._lock = threading.Lock()
        self._counts = {
            "codec_chunks_encoded": 0,
            "codec_chunks_decoded": 0,
            "codec_bytes_raw": 0,  # raw bytes of the chunks encoded
            "codec_bytes_encoded": 0,  # their blobs' bytes
            "codec_decode_failures": 0,
            "codec_encode_refused": 0,  # chunks the codec cannot encode (fp8: NaN or inf)
            "codec_late_copies": 0,  # GPU copies past the deadline (their blocks freed once done)
            "codec_blob_too_large": 0,  # blobs larger than a reduced slot (slot_fraction): not stored
        }

    def _segment_table(self, device: torch.device) -> torch.Tensor | None:
        """The layout's segments as :class:`~kvtier.codecs.PagedChunks` takes them, on
        ``device`` (the pages'), where the codec codes this layout's chunks in their pages
        there (every segment's pages of one size, a whole number of the codec's rows, laid
        segment-major in the chunk); else None."""
        segs = self.layout.segments
        page_bytes = segs[0].page_bytes
        row_bytes = self._shape[1] * self.layout.element_size
        offsets = [self.layout.segment_offset_in_blob(s) for s in range(len(segs))]
        if (
            not self.codec.pages_fused(self._shape, self._dtype, device)
            or any(seg.page_bytes != page_bytes for seg in segs)
            or page_bytes % row_bytes
            or offsets != [s * self._ppc * page_bytes for s in range(len(segs))]
        ):
            return None
        table = torch.tensor([[seg.base_ptr, seg.page_stride] for seg in segs], dtype=torch.int64)
        return table.to(device)

    def _paged(self, pages: np.ndarray) -> PagedChunks:
        """The chunks of ``pages`` (``pages_per_chunk`` ids each) as the codec codes them in place:
        on the host path the ids as they are; on the GPU's, copied there on the current stream
        (the codec's), from pinned memory."""
        ids = torch.from_numpy(np.ascontiguousarray(pages, dtype=np.int64))
        table = self._host_segments
        if table is None:
            ids, table = ids.pin_memory().to(f"cuda:{self._device}", non_blocking=True), self._segments
        return PagedChunks(ids, table, self._ppc, self.layout.segments[0].page_bytes)

    # -- the inner tier's own -----------------------------------------------------------------
    def __getattr__(self, name):
        # lookup, lookup_tiers, media, prefetch, take_events, persist, set_admission_hook,
        # begin_put / commit_put / abort_put, acquire_blobs / release_blobs, blob_bytes,
        # capacity_chunks, arena_region, arena_kind, method, pinned: the encoded chunks' tier.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._inner, name)

    @property
    def pages_per_chunk(self) -> int:
        """Pages of the caller's layout per chunk (store and load address those pages)."""
        return self._ppc

    @property
    def inner(self):
        """The ``_core.CpuTier`` of encoded chunks."""
        return self._inner

    def drain(self, timeout_s: float) -> None:
        with self._lock:
            self._reap_late()
        if self._staging is not None:
            self._staging.drain(timeout_s)
        self._inner.drain(timeout_s)

    def stats(self) -> dict:
        s = self._inner.stats()
        s.update(self._counts)
        s["codec"] = self.codec.spec
        s["codec_device"] = self.codec_device
        s["codec_slot_bytes"] = self._slot
        s["codec_slot_fraction"] = self._slot_fraction
        return s

    # -- store ----------------------------------------------------------------------------------
    def store(self, keys: bytes, page_ids, after_stream: int = 0) -> CodecOp:
        """Encode and keep every chunk of ``keys`` not held yet (pool or disk), from its pages.
        Stops at the first chunk that gets no block, as the raw tier does."""
        keys_l = _split_keys(keys)
        pages = np.asarray(page_ids, dtype=np.int64)
        if len(pages) < len(keys_l) * self._ppc:
            raise InvalidArgumentError(
                f"store: page_ids has {len(pages)} pages for {len(keys_l)} chunks of {self._ppc} pages"
            )
        self._check_pages(pages[: len(keys_l) * self._ppc])  # the GPU path copies by address
        with self._lock, self._on_stream():
            self._reap_late()
            held = bytes(self._inner.media(keys))
            todo = [i for i, m in enumerate(held) if not m]
            rounds = [
                (
                    at,
                    [keys_l[i] for i in todo[at : at + self._batch]],
                    [pages[i * self._ppc : (i + 1) * self._ppc] for i in todo[at : at + self._batch]],
                )
                for at in range(0, len(todo), self._batch)
            ]
            if self._header is not None:
                stored, skipped = self._store_stacks(rounds, len(todo), after_stream)
                return CodecOp(None, stored, len(keys_l) - len(todo), skipped)
            stored, skipped = 0, 0
            for at, batch_keys, batch_pages in rounds:
                if self._host_segments is not None:
                    n, full = self._store_in_pages(batch_keys, batch_pages)
                else:
                    n, full = self._store_batch(batch_keys, batch_pages, after_stream)
                stored += n
                if full:
                    skipped = len(todo) - at - n
                    break
            return CodecOp(None, stored, len(keys_l) - len(todo), skipped)

    def _store_stacks(self, rounds: list, todo: int, after_stream: int) -> tuple[int, int]:
        """GPU stacks: each round's copies are queued before the round before it is waited for
        and committed, so the GPU codes and copies one round while the host commits the last.
        Returns (chunks stored, chunks skipped); a round queued after one that stopped the store
        gives its blocks back once its copies end."""
        stored, prev = 0, None  # prev: (its start in todo, the queued round)
        for at, batch_keys, batch_pages in rounds:
            try:
                queued = self._queue_stack(batch_keys, batch_pages, after_stream)
            except BaseException:
                if prev is not None:
                    self._drop_stack(prev[1])
                raise
            if prev is not None:
                try:
                    n, full = self._commit_stack(prev[1])
                except BaseException:
                    self._drop_stack(queued)
                    raise
                stored += n
                if full:
                    self._drop_stack(queued)
                    return stored, todo - prev[0] - n
            prev = (at, queued)
            if queued.full:  # the tier had no block for the rest: no round after this one
                break
        if prev is None:
            return stored, 0
        n, full = self._commit_stack(prev[1])
        return stored + n, (todo - prev[0] - n) if full else 0

    def _store_batch(self, keys: list[bytes], pages: list[np.ndarray], after_stream: int) -> tuple[int, bool]:
        if self._stream is not None:
            raw = self._gather_gpu(np.concatenate(pages), after_stream)
            self._wait_stream("gather")
            return self._encode_and_put(keys, [raw[i] for i in range(len(keys))])
        scratch = [os.urandom(16) for _ in keys]  # fresh: the staging tier never answers "cached"
        op = self._staging.store(b"".join(scratch), np.concatenate(pages), after_stream)
        if op.transfer is not None:
            op.transfer.wait(self._timeout_s)
        views = self._staging.acquire_blobs(b"".join(scratch))
        try:
            if len(views) != len(keys):
                raise KVTierError(f"codec store: {len(views)} of {len(keys)} gathered chunks are in the staging tier")
            raws = [torch.from_numpy(np.frombuffer(v, dtype=np.uint8).copy()) for v in views]
        finally:
            self._staging.release_blobs(b"".join(scratch[: len(views)]))
        return self._encode_and_put(keys, raws)

    def _store_in_pages(self, keys: list[bytes], pages: list[np.ndarray]) -> tuple[int, bool]:
        """Host path, pages in host memory: each chunk encoded from its pages straight into its
        block and committed, one at a time (as the staged path puts them: a small pool frees a
        block by writing back the chunk before). Returns (chunks handled, whether the store must
        stop there)."""
        for n, (key, chunk_pages) in enumerate(zip(keys, pages, strict=True)):

            def fill(block: np.ndarray, chunk_pages=chunk_pages) -> int:
                out = torch.from_numpy(block[: self._slot]).view(1, -1)
                paged = self._paged(chunk_pages)
                _, ok = self.codec.encode_pages(paged, self._shape, self._dtype, out=out, threads=self._host_threads)
                return self._slot if bool(ok[0]) else 0

            put = self._put_chunk(key, fill)
            if put == "refused":  # fp8 and a NaN or inf: not cached, as a failed copy
                self._counts["codec_encode_refused"] += 1
                log.warning("kvtier: a chunk was not stored: %s holds NaN or inf", self.codec.name)
            if put in ("refused", "full"):
                return n, True
        return len(keys), False

    def _put_chunk(self, key: bytes, fill) -> str:
        """Put one encoded chunk into the inner tier: its block reserved (:meth:`_begin_put`),
        ``fill(block)`` (a uint8 numpy view of it) writes the blob and returns its length, or 0
        where the codec refuses the chunk, then the block is committed (or given back). Returns
        "stored", "held" (already there), "full" (no block) or "refused"."""
        try:
            block = np.asarray(self._begin_put(key))
        except AlreadyExistsError:
            return "held"  # stored meanwhile (a peer's pull): it is there
        except ResourceExhaustedError:
            return "full"  # no block: the raw tier stops here too
        try:
            nbytes = fill(block)
            if not nbytes:
                self._inner.abort_put(key)
                return "refused"
            self._inner.commit_put(key)
        except BaseException:
            self._inner.abort_put(key)
            raise
        self._counts["codec_chunks_encoded"] += 1
        self._counts["codec_bytes_raw"] += self.layout.chunk_bytes
        self._counts["codec_bytes_encoded"] += nbytes
        return "stored"

    def _queue_stack(self, keys: list[bytes], pages: list[np.ndarray], after_stream: int) -> _QueuedStack:
        """GPU path, fixed-size codec: reserve the chunks' blocks, gather the chunks, encode them
        as one stack and queue the copies of their blobs straight into the (pinned) blocks, up
        to the first chunk the tier has no block for. Nothing waits for the GPU; on an error
        nothing is left reserved (blocks whose copies were queued go back once those end)."""
        reserved, handled, full = self._reserve(keys)
        if not reserved:
            return _QueuedStack(reserved, handled, full, None, None)
        n, size = len(reserved), self._blob_len
        raw = blobs = None
        queued = False  # copies into the blocks are queued: they are the blocks' until they end
        try:
            chunk_pages = np.concatenate([pages[i] for i, _, _ in reserved])
            if self._segments is not None:  # read in place: no raw chunks
                self._ordered_after(after_stream)
                raw = self._paged(chunk_pages)
                blobs, ok = self.codec.encode_pages(raw, self._shape, self._dtype)
            else:
                raw = self._gather_gpu(chunk_pages, after_stream)
                blobs, ok = self.codec.encode_many(raw.view(self._dtype).view(n, *self._shape))
            ok_host = torch.empty(n, dtype=torch.bool, pin_memory=True)
            ok_host.copy_(ok, non_blocking=True)
            # The blobs' copies run on the blob stream after the encode; ``done`` follows both.
            self._blob_stream_after_codec()
            src = np.uint64(blobs.data_ptr()) + np.arange(n, dtype=np.uint64) * np.uint64(size)
            dst = np.array([address for _, _, address in reserved], dtype=np.uint64)
            sizes = np.full(n, size, dtype=np.uint64)
            _core.copy_segments(self._device, src, dst, sizes, self._d2h_stream.cuda_stream)
            queued = True
            done = torch.cuda.Event()
            done.record(self._d2h_stream)
        except BaseException:
            if queued:
                self._late_copies([key for _, key, _ in reserved], (raw, blobs))
            else:
                for _, key, _ in reserved:
                    self._inner.abort_put(key)
            raise
        return _QueuedStack(reserved, handled, full, done, (raw, blobs, ok_host))

    def _reserve(self, keys: list[bytes]) -> tuple[list[tuple[int, bytes, int]], int, bool]:
        """Blocks for ``keys`` in order (``begin_puts``; one chunk at a time through
        :meth:`_begin_put`'s wait where the tier is full), skipping chunks already held. Returns
        ((index in keys, key, block address) of each reserved, keys handled, whether the tier
        had no block for the rest)."""
        reserved: list[tuple[int, bytes, int]] = []
        at = 0
        try:
            while at < len(keys):
                addresses = self._inner.begin_puts(b"".join(keys[at:])).tolist()
                reserved += [(at + j, keys[at + j], a) for j, a in enumerate(addresses) if a]
                at += len(addresses)
                if at == len(keys):
                    break
                try:  # no block for keys[at] now: wait for write-backs to free one
                    block = np.asarray(self._begin_put(keys[at]))
                except AlreadyExistsError:
                    pass  # stored meanwhile (a peer's pull): it is there
                except ResourceExhaustedError:
                    return reserved, at, True  # no block: the raw tier stops here too
                else:
                    reserved.append((at, keys[at], block.ctypes.data))
                at += 1
        except BaseException:
            for _, key, _ in reserved:
                self._inner.abort_put(key)
            raise
        return reserved, len(keys), False

    def _commit_stack(self, q: _QueuedStack) -> tuple[int, bool]:
        """Wait for a queued round's copies (to the cache's deadline) and commit its chunks, up
        to the first the codec refused. Returns (chunks handled, whether the store stops)."""
        if not q.reserved:
            return q.handled, q.full
        try:
            self._wait_event(q.done, "store")
        except DeadlineExceededError:
            # The copies may still write into the blocks: they go back once the copies end.
            self._drop_stack(q)
            raise
        ok_host = q.keep[2].numpy()
        good = len(q.reserved) if ok_host.all() else int(ok_host.argmin())
        if good:
            self._inner.commit_puts(b"".join(key for _, key, _ in q.reserved[:good]))
            self._counts["codec_chunks_encoded"] += good
            self._counts["codec_bytes_raw"] += good * self.layout.chunk_bytes
            self._counts["codec_bytes_encoded"] += good * self._blob_len
        if good < len(q.reserved):  # fp8 and a NaN or inf: not cached, as a failed copy
            self._counts["codec_encode_refused"] += 1
            log.warning("kvtier: a chunk was not stored: %s holds NaN or inf", self.codec.name)
            for _, later, _ in q.reserved[good:]:
                self._inner.abort_put(later)
            return q.reserved[good][0], True
        return q.handled, q.full

    def _drop_stack(self, q: _QueuedStack) -> None:
        """A queued round that is not committed: its blocks go back once its copies end."""
        if q.reserved:
            self._late_copies([key for _, key, _ in q.reserved], q.keep)

    def _late_copies(self, keys: list[bytes], keep: object) -> None:
        """Copies queued on the codec's stream did not end by the deadline (or the call failed
        after queueing them): the blocks of ``keys`` (reserved, never committed) and the memory
        in ``keep`` stay theirs until they do (:meth:`_reap_late`)."""
        self._blob_stream_after_codec()  # the event follows both streams' work
        event = torch.cuda.Event()
        event.record(self._d2h_stream)
        self._late.append((event, keys, keep))
        self._counts["codec_late_copies"] += 1

    def _blob_stream_after_codec(self) -> None:
        """Order the blob stream's next work after the codec stream's (nothing to do when the
        blobs cross PCIe on the codec's stream itself)."""
        if self._d2h_stream is not self._stream:
            self._d2h_stream.wait_stream(self._stream)

    def _reap_late(self) -> None:
        """Give back the blocks of late copies that have ended since (called under the lock)."""
        still = []
        for event, keys, keep in self._late:
            if event.query():
                for key in keys:
                    self._inner.abort_put(key)
            else:
                still.append((event, keys, keep))
        self._late = still

    def _encode_and_put(self, keys: list[bytes], raws: list[torch.Tensor]) -> tuple[int, bool]:
        """Encode each raw chunk (1-D uint8, on the host or the GPU) and put it into the inner
        tier. Returns (chunks handled, whether the store must stop there)."""
        for n, (key, raw) in enumerate(zip(keys, raws, strict=True)):
            try:
                blob = self.codec.encode(raw.view(self._dtype).view(self._shape)).cpu()
            except InvalidArgumentError as e:  # fp8 and a NaN or inf: not cached, as a failed copy
                self._counts["codec_encode_refused"] += 1
                log.warning("kvtier: a chunk was not stored: %s", e)
                return n, True
            if blob.numel() > self._slot:
                if self._slot_fraction == 1.0:  # the slot is the codec's bound: a bug if it is not
                    raise KVTierError(
                        f"codec {self.codec.name} made a {blob.numel()}-byte blob for {self._slot}-byte slots"
                    )
                # A reduced slot (slot_fraction) and a chunk that compressed less: not cached, the
                # store ends there as when the tier is full.
                self._counts["codec_blob_too_large"] += 1
                log.info(
                    "kvtier: a chunk was not stored: its %d-byte %s blob exceeds the %d-byte slot "
                    "(codec.slot_fraction)",
                    blob.numel(),
                    self.codec.name,
                    self._slot,
                )
                return n, True

            def fill(dst: np.ndarray, blob=blob) -> int:
                dst[: blob.numel()] = blob.numpy()
                dst[blob.numel() :] = 0
                return blob.numel()

            if self._put_chunk(key, fill) == "full":
                return n, True
        return len(keys), False

    # -- the GPU path: segment copies between the pages and raw chunks in GPU memory ------------
    def _on_stream(self):
        """GPU path: the torch work of a store or load (encode, decode, the raw chunks' memory)
        runs on the codec's stream, where the segment copies run."""
        return contextlib.nullcontext() if self._stream is None else torch.cuda.stream(self._stream)

    def _ordered_after(self, after_stream: int) -> None:
        """Make the codec's stream wait for the work queued on ``after_stream`` (0: nothing)."""
        if after_stream:
            event = torch.cuda.Event()
            event.record(torch.cuda.ExternalStream(after_stream, device=self._device))
            self._stream.wait_event(event)

    def _gather_gpu(self, pages: np.ndarray, after_stream: int) -> torch.Tensor:
        """The raw chunks of ``pages`` as a ``[chunks, chunk_bytes]`` uint8 GPU tensor, copied
        on the codec's stream after ``after_stream``'s work (not waited for: the codec's work on
        them is queued behind)."""
        n = len(pages) // self._ppc
        self._ordered_after(after_stream)
        raw = torch.empty((n, self.layout.chunk_bytes), dtype=torch.uint8, device=f"cuda:{self._device}")
        src, dst, size = chunk_ranges(self.layout, pages, raw.data_ptr())
        _core.copy_segments(self._device, src, dst, size, self._stream.cuda_stream, _SEGMENT_METHOD)
        return raw

    def _scatter_gpu(self, raw: torch.Tensor, pages: np.ndarray, after_stream: int, wait: bool = True) -> None:
        """Copy raw chunks (``[chunks, chunk_bytes]`` uint8, made on the codec's stream) into
        ``pages``, after ``after_stream``'s work; returns once they have landed, or with ``wait``
        False once they are queued (``raw``, from torch's allocator on the codec's stream, is
        not reused before they run)."""
        self._ordered_after(after_stream)
        src, dst, size = chunk_ranges(self.layout, pages[: len(raw) * self._ppc], raw.data_ptr())
        _core.copy_segments(self._device, dst, src, size, self._stream.cuda_stream, _SEGMENT_METHOD)
        if wait:
            self._wait_stream("scatter")

    def _wait_stream(self, what: str) -> None:
        """Wait for the codec's stream, to the cache's deadline (DeadlineExceededError past it;
        the copies then end on their own, in stream order before any later use of its memory)."""
        event = torch.cuda.Event()
        event.record(self._stream)
        self._wait_event(event, what)

    def _wait_event(self, event: torch.cuda.Event, what: str) -> None:
        """Wait for ``event`` to the cache's deadline: polled without sleeping for its first
        _SPIN_S (a round's check or copy ends within that, and a sleep takes ~0.1 ms), then
        every 50 us."""
        start = time.monotonic()
        deadline = start + self._timeout_s
        while not event.query():
            now = time.monotonic()
            if now >= deadline:
                raise DeadlineExceededError(f"codec {what} on the GPU did not end within {self._timeout_s} s")
            time.sleep(0 if now - start < _SPIN_S else 50e-6)  # 0: gives up the GIL, not the core

    def _begin_put(self, key: bytes):
        """The inner tier's ``begin_put``, waiting while write-backs to disk hold the blocks, or
        write-through writes pin them (as the raw tier's store does): each ends by the disk's
        deadline, freeing or unpinning its block. ResourceExhaustedError once no write is left
        to wait for, or past the deadline."""
        deadline = time.monotonic() + self._writeback_wait_s
        idle = 0  # tries in a row that saw no write-back running and no block free
        while True:
            try:
                return self._inner.begin_put(key)
            except ResourceExhaustedError:
                s = self._inner.stats()
                # A write-back ends (demoting drops) just before its block is freed, a write-through
                # write just before its pin is released: one more try.
                writing = s.get("disk", {}).get("write_through_in_flight", 0)
                idle = 0 if s["index"]["demoting"] or s["blocks"]["free_blocks"] or writing else idle + 1
                if time.monotonic() >= deadline or idle > 1:
                    raise
            time.sleep(0.001)

    # -- load -----------------------------------------------------------------------------------
    def load(self, keys: bytes, page_ids, after_stream: int = 0) -> CodecOp:
        """Decode the leading held chunks of ``keys`` (pool, then disk) into ``page_ids``, as
        many as the pages cover. Returns once they are in place."""
        keys_l = _split_keys(keys)
        pages = np.asarray(page_ids, dtype=np.int64)
        wanted = min(len(keys_l), len(pages) // self._ppc)
        self._check_pages(pages[: wanted * self._ppc])  # before any decode: nothing done on bad input
        loaded = 0
        with self._lock, self._on_stream():
            self._reap_late()
            # A batch is promoted into the pool whole: no more than the pool holds.
            step = max(1, min(self._batch, self._inner.capacity_chunks))
            self._prefetch(keys_l[:wanted], step)
            rounds = [keys_l[at : min(wanted, at + step)] for at in range(0, wanted, step)]
            if self._header is not None:
                return CodecOp(None, self._load_stacks(rounds, pages, after_stream))
            if self._host_segments is not None:
                return CodecOp(None, self._load_in_pages(rounds, pages))
            while loaded < wanted:
                batch = keys_l[loaded : min(wanted, loaded + step)]
                got = self._load_batch(
                    batch, pages[loaded * self._ppc : (loaded + len(batch)) * self._ppc], after_stream
                )
                loaded += got
                if got < len(batch):
                    break
        return CodecOp(None, loaded)

    def _prefetch(self, keys: list[bytes], step: int) -> None:
        """Start the disk reads of all the chunks of a load that are only on disk (as many as the
        pool holds beside one round), so that the disk works on all of them at once while the
        rounds are loaded and decoded; each round's load then finds its chunks in the pool or
        waits for their reads. Without this a round's reads start only once the round before
        has been loaded. Nothing happens without a disk, where the pool has no room, or where
        one of the chunks is in the pool only: the reads' blocks could evict it before its round
        (a chunk also on disk would only be read again)."""
        room = self._inner.capacity_chunks - step
        if room <= 0 or len(keys) <= step:
            return
        wanted = b"".join(keys[:room])
        if 1 not in bytes(self._inner.media(wanted)):  # media: 1 pool, 2 disk, 3 both
            self._inner.prefetch(wanted)

    def _check_pages(self, pages: np.ndarray) -> None:
        """The copy engine's checks of page ids (range, repetition), made before any work."""
        bad = np.flatnonzero((pages < 0) | (pages >= self.layout.num_pages))
        if bad.size:
            i = int(bad[0])
            raise InvalidArgumentError(f"page_ids[{i}] = {int(pages[i])} is out of range [0, {self.layout.num_pages})")
        if len(np.unique(pages)) != len(pages):
            seen = set()
            for i, p in enumerate(pages.tolist()):
                if p in seen:
                    raise InvalidArgumentError(f"page_ids[{i}] = {p} is repeated")
                seen.add(p)

    def _load_batch(self, keys: list[bytes], pages: np.ndarray, after_stream: int) -> int:
        op = self._inner.load(b"".join(keys), np.arange(len(keys), dtype=np.int64), 0)
        if op.transfer is not None:
            op.transfer.wait(self._timeout_s)
        where = None if self._stream is None else f"cuda:{self._device}"
        raws = []
        for i in range(op.chunks):
            start = self._buf_at + i * self._slot
            slot = self._buf[start : start + self._slot]
            try:
                blob = slot[: self.codec.blob_nbytes(slot)]
                # On the GPU path the encoded blob crosses PCIe and is decoded there.
                raw = self.codec.decode(blob if where is None else blob.to(where), device=where)
            except CorruptionError as e:
                self._counts["codec_decode_failures"] += 1
                log.warning("kvtier: a %s chunk does not decode (%s): a miss", self.codec.name, e)
                break
            raws.append(raw.reshape(-1).view(torch.uint8))
            self._counts["codec_chunks_decoded"] += 1
        if not raws:
            return 0
        if self._stream is not None:
            self._scatter_gpu(torch.stack(raws), pages, after_stream)
            return len(raws)
        scratch = []
        for raw in raws:
            key = os.urandom(16)
            dst = np.asarray(self._staging.begin_put(key))
            dst[:] = raw.numpy()
            self._staging.commit_put(key)
            scratch.append(key)
        op = self._staging.load(b"".join(scratch), pages[: len(scratch) * self._ppc], after_stream)
        if op.transfer is not None:
            op.transfer.wait(self._timeout_s)
        return op.chunks

    def _load_in_pages(self, rounds: list[list[bytes]], pages: np.ndarray) -> int:
        """Host path, pages in host memory: the inner tier loads each round's encoded chunks into
        one half of the buffer (round r into half r % 2), round r + 1's load issued before round
        r is decoded where the pool holds both (its copy threads move the next blobs while this
        thread decodes), and each round is decoded straight into its pages. Stops after the first
        round not loaded or decoded whole. Returns the chunks in place."""
        ahead = _LOAD_AHEAD and 2 * max(len(k) for k in rounds) <= self._inner.capacity_chunks
        loaded, nxt = 0, None
        op = self._load_half(rounds[0], 0)
        try:
            for r, keys in enumerate(rounds):
                if ahead and r + 1 < len(rounds):
                    nxt = self._load_half(rounds[r + 1], (r + 1) % 2)
                if op.transfer is not None:
                    op.transfer.wait(self._timeout_s)
                good = self._decode_in_pages(op.chunks, r % 2, pages[loaded * self._ppc :])
                loaded += good
                if good < len(keys) or r + 1 == len(rounds):
                    break
                op, nxt = nxt if nxt is not None else self._load_half(rounds[r + 1], (r + 1) % 2), None
        finally:
            if nxt is not None and nxt.transfer is not None:
                # A round issued ahead and not used writes the buffer: not left running. Its
                # chunks are in the pool; a failure of its own is the inner tier's (counted there).
                with contextlib.suppress(KVTierError):
                    nxt.transfer.wait(self._timeout_s)
        return loaded

    def _load_half(self, keys: list[bytes], half: int):
        """Issue the inner tier's load of ``keys`` into ``half`` of the buffer."""
        base = half * self._batch
        return self._inner.load(b"".join(keys), np.arange(base, base + len(keys), dtype=np.int64), 0)

    def _decode_in_pages(self, n: int, half: int, pages: np.ndarray) -> int:
        """Host path, pages in host memory: the ``n`` encoded chunks the inner tier loaded into
        ``half`` of the buffer, checked (a slot whose header is not this layout's ends the round
        before it) and decoded straight into ``pages``. Returns the chunks decoded."""
        if not n:
            return 0
        at = self._buf_at + half * self._batch * self._slot
        blobs = self._buf[at : at + n * self._slot].view(n, self._slot)
        match = (blobs[:, : len(self._host_header)] == self._host_header).all(dim=1)
        good = n if bool(match.all()) else int(match.int().argmin())
        if good < n:
            self._counts["codec_decode_failures"] += 1
            why = self._why_not(half * self._batch + good)
            log.warning("kvtier: a %s chunk does not decode (%s): a miss", self.codec.name, why)
        if good:
            paged = self._paged(pages[: good * self._ppc])
            self.codec.decode_pages(blobs[:good], self._header_info, paged, threads=self._host_threads)
            self._counts["codec_chunks_decoded"] += good
        return good

    def _load_stacks(self, rounds: list[list[bytes]], pages: np.ndarray, after_stream: int) -> int:
        """GPU path, fixed-size codec: the inner tier loads each round's encoded chunks into one
        half of the GPU buffer (round r into half r % 2). Where the pool holds two rounds, round
        r + 1's load is issued before round r's is waited for (the disk or the copy engine works
        on the next blobs while the GPU checks, decodes and scatters these), else once round r
        has landed. Stops after the first round not loaded whole or holding a slot that is not
        this layout's. Returns the chunks in place, once they have landed."""
        if not rounds:
            return 0
        if self._buf_busy is not None:  # a late copy may still read the buffer
            self._wait_event(self._buf_busy, "an earlier load's copy")
            self._buf_busy = None
        ahead = _LOAD_AHEAD and 2 * max(len(k) for k in rounds) <= self._inner.capacity_chunks
        decoded: list[torch.cuda.Event | None] = [None, None]  # per half: after its last decode
        # The header check made by the decode on the device (_CHECK_IN_DECODE): gate[0] stops
        # the rounds after a slot that is not this layout's, gate[1 + r] counts round r's chunks
        # decoded, read once the load has ended.
        gate = None
        if self._segments is not None and _CHECK_IN_DECODE:
            gate = torch.zeros(1 + len(rounds), dtype=torch.int32, device=self._buf.device)
        queued: list[int] = []  # chunks whose decode each round queued
        loaded, nxt = 0, None
        op = self._load_round(rounds, 0)
        try:
            for r, keys in enumerate(rounds):
                more = r + 1 < len(rounds)
                if ahead and more:
                    nxt = self._load_round_after(rounds, r + 1, decoded)
                if op.transfer is not None:
                    op.transfer.wait(self._timeout_s)
                if not ahead and more and op.chunks == len(keys):
                    nxt = self._load_round_after(rounds, r + 1, decoded)
                gate_r = None if gate is None else (gate[1 + r : 2 + r], gate[:1])
                good = self._decode_round(op.chunks, r % 2, pages[loaded * self._ppc :], after_stream, gate_r)
                decoded[r % 2] = torch.cuda.Event()
                decoded[r % 2].record(self._stream)
                loaded += good
                queued.append(good)
                if good < len(keys) or nxt is None:
                    break
                op, nxt = nxt, None
            self._wait_stream("scatter")
            if gate is not None:
                loaded = self._decoded_in_rounds(gate, queued)
        except DeadlineExceededError:
            # A scatter out of the buffer may not have run yet: the next load waits for it before
            # the inner tier writes the buffer again, and the caller's later work on its stream
            # runs after the late scatters into its pages.
            self._late_copies([], None)
            self._buf_busy = self._late[-1][0]
            if after_stream:
                torch.cuda.ExternalStream(after_stream, device=self._device).wait_event(self._buf_busy)
            raise
        finally:
            if nxt is not None and nxt.transfer is not None:
                # A round issued ahead and not used writes the buffer: not left running. Its
                # chunks are in the pool; a failure of its own is the inner tier's (counted there).
                with contextlib.suppress(KVTierError):
                    nxt.transfer.wait(self._timeout_s)
        return loaded

    def _load_round_after(self, rounds: list[list[bytes]], r: int, decoded: list) -> object:
        """Issue round ``r``'s load once the decode of the round that last used its half ended."""
        if decoded[r % 2] is not None:
            self._wait_event(decoded[r % 2], "an earlier round's decode")
        return self._load_round(rounds, r)

    def _load_round(self, rounds: list[list[bytes]], r: int):
        """Issue the inner tier's load of round ``r``'s chunks into half ``r % 2`` of the buffer."""
        return self._load_half(rounds[r], r % 2)

    def _decode_round(self, n: int, half: int, pages: np.ndarray, after_stream: int, gate=None) -> int:
        """The ``n`` encoded chunks the inner tier loaded into ``half`` of the GPU buffer, checked
        (a slot whose header is not this layout's, another codec's blob or a damaged one, ends the
        round before it), decoded as one stack and scattered into ``pages``, queued on the
        codec's stream. Returns the chunks queued. With ``gate`` (this round's count and the
        load's stop flag, :meth:`_load_stacks`) the decode makes the check on the device and
        nothing waits: all ``n`` are queued, those decoded known once the load has ended."""
        if not n:
            return 0
        at = half * self._batch
        blobs = self._buf[at * self._slot : (at + n) * self._slot].view(n, self._slot)
        if gate is not None:
            self._ordered_after(after_stream)
            paged = self._paged(pages[: n * self._ppc])
            self.codec.decode_pages(blobs, self._header_info, paged, decoded=gate[0], stop=gate[1])
            return n
        match_host = torch.empty(n, dtype=torch.bool, pin_memory=True)
        with torch.cuda.stream(self._check_stream):  # the round has landed (its load was waited for)
            match = (blobs[:, : len(self._header)] == self._header_gpu).all(dim=1)
            match_host.copy_(match, non_blocking=True)
            checked = torch.cuda.Event()
            checked.record(self._check_stream)
        self._wait_event(checked, "header check")
        good = n if bool(match_host.all()) else int(match_host.int().argmin())
        if good < n:
            self._counts["codec_decode_failures"] += 1
            log.warning("kvtier: a %s chunk does not decode (%s): a miss", self.codec.name, self._why_not(at + good))
        if not good:
            return 0
        self._ordered_after(after_stream)
        if self._segments is not None:  # written in place: no raw chunks
            self.codec.decode_pages(blobs[:good], self._header_info, self._paged(pages[: good * self._ppc]))
        else:
            raw = self.codec.decode_many(blobs[:good], self._header_info).view(good, -1).view(torch.uint8)
            self._scatter_gpu(raw, pages, 0, wait=False)
        self._counts["codec_chunks_decoded"] += good
        return good

    def _decoded_in_rounds(self, gate: torch.Tensor, queued: list[int]) -> int:
        """The chunks a load decoded, from its rounds' counts on the device (the codec's stream
        has ended): up to the first slot that was not this layout's (a miss, counted)."""
        counts = gate[1 : 1 + len(queued)].tolist()
        loaded = 0
        for r, (n, got) in enumerate(zip(queued, counts, strict=True)):
            loaded += got
            if got < n:
                self._counts["codec_decode_failures"] += 1
                # The last round's slot is still in the buffer (a round after it would use the
                # other half); an earlier one's may have been loaded over.
                last = r == len(queued) - 1
                why = self._why_not((r % 2) * self._batch + got) if last else "not this layout's header"
                log.warning("kvtier: a %s chunk does not decode (%s): a miss", self.codec.name, why)
                break
        self._counts["codec_chunks_decoded"] += loaded
        return loaded

    def _why_not(self, i: int) -> str:
        """Why slot ``i`` of the buffer does not hold one of this layout's blobs (the buffer's
        copies have ended)."""
        start = self._buf_at + i * self._slot
        slot = self._buf[start : start + self._slot].cpu()
        try:
            header = read_header(slot)
        except CorruptionError as e:
            return str(e)
        if header.codec != self.codec.name:
            return f"written by {header.codec!r}, this reader decodes {self.codec.name!r}"
        return f"a {header.codec} v{header.codec_version} blob of {header.dtype} {header.shape}, not this layout's"


def gpu_round_chunks(chunk_bytes: int) -> int:
    """Chunks of ``chunk_bytes`` raw bytes in one round of the GPU stacked path."""
    at_least = min(_GPU_BATCH_CHUNKS, _GPU_BATCH_MAX_BYTES // chunk_bytes)
    return max(1, _GPU_BATCH_BYTES // chunk_bytes, at_least)


def chunk_ranges(layout: Layout, pages: np.ndarray, base: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The byte ranges between the pages of chunks and their raw blobs laid one after another at
    address ``base`` (chunk ``i`` at ``base + i * chunk_bytes``, segment-major as the copy engine
    gathers it): ``(page addresses, blob addresses, bytes)``, uint64 arrays of one range per page
    of each segment. ``pages`` holds ``pages_per_chunk`` page ids per chunk."""
    ppc = layout.pages_per_chunk
    n = len(pages) // ppc
    grid = np.asarray(pages[: n * ppc], dtype=np.uint64).reshape(n, ppc)
    chunk_at = np.uint64(base) + np.arange(n, dtype=np.uint64)[:, None] * np.uint64(layout.chunk_bytes)
    src, dst, size = [], [], []
    for s, seg in enumerate(layout.segments):
        page_at = np.arange(ppc, dtype=np.uint64)[None, :] * np.uint64(seg.page_bytes)
        src.append(np.uint64(seg.base_ptr) + grid * np.uint64(seg.page_stride))
        dst.append(chunk_at + np.uint64(layout.segment_offset_in_blob(s)) + page_at)
        size.append(np.full((n, ppc), seg.page_bytes, dtype=np.uint64))
    return tuple(np.stack(a, axis=1).reshape(-1) for a in (src, dst, size))


def _split_keys(keys: bytes) -> list[bytes]:
    if len(keys) % 16:
        raise InvalidArgumentError(f"keys must be a multiple of 16 bytes, got {len(keys)}")
    return [keys[i : i + 16] for i in range(0, len(keys), 16)]
