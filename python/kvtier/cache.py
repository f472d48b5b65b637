"""KVCache: the public store / lookup / load API over the CPU tier (pinned pool + copy engine)
and, when configured, the disk tier below it.

Example (a vLLM-style paged KV on the GPU, 16-token pages, 256-token chunks)::

    kv = [torch.zeros(2, 1024, 16, 8, 128, dtype=torch.bfloat16, device="cuda") for _ in range(32)]
    layout = kvtier.Layout.from_vllm(kv, chunk_tokens=256)
    cache = kvtier.KVCache(layout, cpu_bytes=8 << 30, model_id="llama-3-8b")
    cache.store(tokens, page_ids).wait()          # offload every full chunk not cached yet
    hit = cache.lookup(tokens)                    # leading tokens cached (a multiple of 256)
    h = cache.load(tokens, new_page_ids)          # copy them back into other pages
    h.wait_layer(0)                               # layer 0 landed: its attention may start
    h.wait()
"""

from __future__ import annotations

import collections
import functools
import gc
import logging
import os
import threading
import time

import numpy as np

from kvtier import _core
from kvtier.config import CacheConfig
from kvtier.errors import InvalidArgumentError
from kvtier.events import KVEvent, events_from_records
from kvtier.keys import ChunkKeyer
from kvtier.layout import Layout
from kvtier.sources import ChunkSource, start_source

log = logging.getLogger(__name__)

# Layouts (and, from close(), tiers) of caches dropped while copies into their memory were still
# running past the deadline: kept for the life of the process, so those copies never write into
# freed memory.
_LAYOUTS_KEPT_ALIVE: list = []


def _timed(op: str):
    """Record the call's latency in ``self.metrics`` (kvtier.metrics.Metrics) when one is
    attached (kvtier.open_cache attaches it). store and load return once their copies are
    submitted: this is the time the caller spends in the call, not the copy's duration."""

    def wrap(fn):
        @functools.wraps(fn)
        def timed(self, *args, **kwargs):
            metrics = self.metrics
            if metrics is None:
                return fn(self, *args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(self, *args, **kwargs)
            finally:
                self._bookkeeping("metrics", metrics.observe_latency, op, time.perf_counter() - t0)

        return timed

    return wrap


def _check_skip(skip_chunks) -> int:
    if isinstance(skip_chunks, bool) or not isinstance(skip_chunks, int) or skip_chunks < 0:
        raise InvalidArgumentError(f"skip_chunks must be a non-negative int, got {skip_chunks!r}")
    return skip_chunks


def _as_page_ids(page_ids) -> np.ndarray:
    """Page ids as a 1-D int64 numpy array (from a list, numpy array or torch tensor on any device)."""
    if type(page_ids).__module__.startswith("torch"):
        if page_ids.is_floating_point() or page_ids.is_complex() or str(page_ids.dtype) == "torch.bool":
            raise InvalidArgumentError(f"page_ids must be an integer tensor, got {page_ids.dtype}")
        if page_ids.device.type == "meta":
            raise InvalidArgumentError(
                "page_ids must hold page ids, got a torch tensor on the meta device (it has no data)"
            )
        page_ids = page_ids.detach().to("cpu").numpy()
    arr = np.asarray(page_ids)
    if arr.ndim != 1:
        raise InvalidArgumentError(f"page_ids must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise InvalidArgumentError(f"page_ids must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _stream_handle(stream) -> int:
    """A cudaStream_t as an int, from a torch.cuda.Stream, an int, or None (no ordering)."""
    if stream is None:
        return 0
    if isinstance(stream, int):
        return stream
    handle = getattr(stream, "cuda_stream", None)
    if handle is None:
        raise InvalidArgumentError(f"stream must be a torch.cuda.Stream or an int handle, got {type(stream).__name__}")
    return int(handle)


class StoreFuture:
    """An offload in flight. ``wait()`` returns the number of chunks newly stored."""

    def __init__(self, op, timeout_s: float, verifier: _StoreVerifier | None = None) -> None:
        self._op = op
        self._timeout_s = timeout_s
        self._verifier = verifier
        self.chunks = op.chunks if op is not None else 0
        self.already_cached = op.already_cached if op is not None else 0
        self.skipped_full = op.skipped_full if op is not None else 0

    def wait(self, timeout_s: float | None = None) -> int:
        if self._op is not None and self._op.transfer is not None:
            self._op.transfer.wait(self._timeout_s if timeout_s is None else timeout_s)
        if self._verifier is not None:
            self._verifier.settle(self._op)
        return self.chunks

    def done(self) -> bool:
        done = self._op is None or self._op.transfer is None or self._op.transfer.done
        if done and self._verifier is not None:
            self._verifier.settle(self._op)
        return done


class _StoreVerifier:
    """``verify_stores``: once a store's copy has landed, copies each chunk it stored from its
    pages again (into a one-chunk scratch tier over the same layout) and compares the two blobs.

    A store is checked when its future is first seen complete (``wait``/``done``), by the next
    ``store`` once its copy landed, or by ``drain``/``close``; so a caller that keeps the page
    contract (pages unchanged until the future completes) never has its pages read after it
    reused them. Counts chunks checked, mismatches, and chunks evicted before their check.
    """

    _MAX_PENDING = 64  # unchecked stores kept; past it the oldest is waited for and checked

    def __init__(self, main_tier, scratch_tier, timeout_s: float, ppc: int) -> None:
        self._main, self._scratch = main_tier, scratch_tier
        self._timeout_s, self._ppc = timeout_s, ppc
        self._pending: collections.OrderedDict = collections.OrderedDict()  # id(op) -> (op, items)
        self._lock = threading.Lock()  # one check at a time: the scratch tier holds one chunk
        self.counts = {"store_verify_chunks": 0, "store_verify_mismatches": 0, "store_verify_evicted": 0}

    def add(self, op, items: list[tuple[bytes, np.ndarray]]) -> None:
        if op is None or not items:
            return
        self.settle_landed()  # earlier stores only: this one's caller may not have seen it land
        with self._lock:
            self._pending[id(op)] = (op, items)
            overflow = len(self._pending) > self._MAX_PENDING
        if overflow:
            with self._lock:
                oldest = next(iter(self._pending.values()))[0] if self._pending else None
            if oldest is not None:
                self.settle(oldest, wait=True)

    def settle(self, op, wait: bool = False) -> None:
        with self._lock:
            entry = self._pending.get(id(op))
            if entry is None or entry[0] is not op:
                return
            if op.transfer is not None and not op.transfer.done:
                if not wait:
                    return
                op.transfer.wait(self._timeout_s)
            del self._pending[id(op)]
            for key, pages in entry[1]:
                self._check(key, pages)

    def settle_landed(self) -> None:
        with self._lock:
            ops = [op for op, _ in self._pending.values() if op.transfer is None or op.transfer.done]
        for op in ops:
            self.settle(op)

    def settle_all(self) -> None:
        with self._lock:
            ops = [op for op, _ in self._pending.values()]
        for op in ops:
            self.settle(op, wait=True)

    def _check(self, key: bytes, pages: np.ndarray) -> None:
        scratch_key = os.urandom(16)  # fresh each time: the scratch tier never answers "cached"
        op = self._scratch.store(scratch_key, pages, 0)
        if op.transfer is not None:
            op.transfer.wait(self._timeout_s)
        stored = self._main.acquire_blobs(key)
        if not stored:
            self.counts["store_verify_evicted"] += 1
            return
        try:
            again = self._scratch.acquire_blobs(scratch_key)
            try:
                self.counts["store_verify_chunks"] += 1
                if not again or bytes(stored[0]) != bytes(again[0]):
                    self.counts["store_verify_mismatches"] += 1
                    log.error(
                        "kvtier: a stored chunk differs from its pages once its copy landed: "
                        "the pages changed before the store's future completed"
                    )
            finally:
                self._scratch.release_blobs(scratch_key)
        finally:
            self._main.release_blobs(key)


class LoadHandle:
    """A load in flight: ``num_tokens`` are being copied into the first pages given to ``load``."""

    def __init__(self, op, num_tokens: int, num_layers: int, timeout_s: float) -> None:
        self._op = op
        self.num_tokens = num_tokens
        self.num_layers = num_layers
        self._timeout_s = timeout_s
        # What a successful wait proved: once landed, waits return without calling into the
        # core (a decode step asks every layer of every loaded chunk, thousands of times a step).
        self._landed = self._transfer is None
        self._layers_landed = 0  # layers [0, n) proved landed by wait_layer, in order

    @property
    def _transfer(self):
        return None if self._op is None else self._op.transfer

    def wait(self, timeout_s: float | None = None) -> int:
        """Block until every loaded byte has landed; returns ``num_tokens``."""
        if not self._landed:
            self._transfer.wait(self._timeout_s if timeout_s is None else timeout_s)
            self._landed = True
        return self.num_tokens

    def wait_layer(self, layer: int, timeout_s: float | None = None) -> None:
        """Block until layer ``layer``'s pages have landed (its attention may start)."""
        if not 0 <= layer < self.num_layers:
            raise InvalidArgumentError(f"layer must be in [0, {self.num_layers}), got {layer}")
        if self._landed or layer < self._layers_landed:
            return
        self._transfer.wait_layer(layer, self._timeout_s if timeout_s is None else timeout_s)
        if layer == self._layers_landed:
            self._layers_landed = layer + 1

    def stream_wait_layer(self, layer: int, stream) -> None:
        """Make ``stream`` wait on the GPU (not the host) for layer ``layer``."""
        if not 0 <= layer < self.num_layers:
            raise InvalidArgumentError(f"layer must be in [0, {self.num_layers}), got {layer}")
        if not (self._landed or layer < self._layers_landed):
            self._transfer.stream_wait_layer(layer, _stream_handle(stream))

    def landed(self) -> bool:
        """True once a successful ``wait`` (or ``wait_layer`` of every layer, in order) proved
        that every byte landed; never for a copy that failed."""
        return self._landed or self._layers_landed == self.num_layers

    def done(self) -> bool:
        """True once every byte has landed (or the copy ended in an error ``wait`` will raise)."""
        return self._landed or self._layers_landed == self.num_layers or self._transfer.done


class KVCache:
    """Keeps the KV of full chunks of prompts in a pinned CPU pool and copies it back on a hit.

    ``layout`` describes the engine's KV tensors (:class:`kvtier.Layout`); pages are addressed
    by page id in that layout. Thread-safe; every call that copies releases the GIL.

    ``admission_policy`` (kvtier.policies.AdmissionPolicy) replaces the built-in rule deciding
    which chunks evicted from the CPU tier are written to disk; ``prefetch_policy``
    (kvtier.policies.PrefetchPolicy, default: all of them) decides how many disk chunks a
    ``lookup`` starts reading into the CPU tier before the ``load`` that usually follows.

    ``peers``: a source of chunks beyond this cache's own tiers (:class:`kvtier.sources.ChunkSource`):
    a kvtier.p2p ``PeerConfig`` (or a dict of its fields) starts a peer service sharing chunks
    with other instances (docs/p2p.md); a callable ``factory(cache) -> ChunkSource`` makes any
    other source. ``lookup`` asks it for what the tiers miss, ``load`` brings its chunks, every
    ``store`` tells it the keys; ``close`` closes it first.

    Read-only views for the layers built on the cache (PagedKVPool, planners, kvtier.p2p):
    ``tier`` (the ``_core.CpuTier``), ``peers`` (the source, or None), ``keyer``,
    ``bookkeeping_errors`` and :meth:`stream_handle`.
    """

    def __init__(
        self,
        layout: Layout,
        config: CacheConfig | None = None,
        *,
        peers=None,
        admission_policy=None,
        prefetch_policy=None,
        **overrides,
    ) -> None:
        if not isinstance(layout, Layout):
            raise InvalidArgumentError(f"layout must be a kvtier.Layout, got {type(layout).__name__}")
        if config is None:
            config = CacheConfig(**overrides)
        elif overrides:
            config = CacheConfig(**{**config.__dict__, **overrides})
        self.layout = layout
        self.config = config
        self._keyer = ChunkKeyer.from_layout(config.model_id, layout, config.tenant_salt)
        device = -1 if layout.device == "cpu" else int(layout.device.split(":")[1] if ":" in layout.device else 0)
        self._on_gpu = device >= 0
        disk_options = dict(
            disk_dir=str(config.disk_dir) if config.disk_dir is not None else "",
            disk_bytes=config.disk_bytes,
            disk_backend=config.disk_backend,
            disk_admit_min_seen=config.disk_admit_min_seen,
            disk_queue_depth=config.disk_queue_depth,
            disk_io_timeout_s=float(config.disk_io_timeout_s),
            eviction_policy=config.eviction_policy,
            deterministic_writeback=config.deterministic_writeback,
            disk_max_writebacks_in_flight=config.disk_max_writebacks_in_flight,
            disk_reset_on_mismatch=config.disk_reset_on_mismatch,
            disk_persist_interval_s=float(config.disk_persist_interval_s),
            event_capacity=config.events_capacity,
            disk_write_through=config.disk_write_through,
        )
        self._codec = None
        if config.codec_name != "none":
            # Encoded chunks below the GPU (docs/codecs.md); torch is needed only here.
            from kvtier.codec_tier import CodecTier, codec_fingerprint
            from kvtier.codecs import codec_from_settings

            self._codec = codec_from_settings(
                config.codec_name, fp8_scale_dtype=config.codec_fp8_scale_dtype, zstd_level=config.codec_zstd_level
            )
            self._tier = CodecTier(
                layout,
                self._codec,
                device=device,
                capacity_bytes=config.cpu_bytes,
                method=config.method,
                staging_bytes=config.staging_bytes,
                cpu_threads=config.cpu_threads,
                timeout_s=config.timeout_s,
                codec_device=config.codec_device,
                slot_fraction=float(config.codec_slot_fraction),
                **disk_options,
            )
            self._blob_fingerprint = codec_fingerprint(layout, self._codec, float(config.codec_slot_fraction))
        else:
            if config.cpu_bytes < layout.chunk_bytes:
                raise InvalidArgumentError(
                    f"config.cpu_bytes={config.cpu_bytes} is smaller than one chunk ({layout.chunk_bytes} bytes)"
                )
            self._tier = _core.CpuTier(
                layout.to_core_segments(),
                device,
                layout.pages_per_chunk,
                [list(layout.layer_segments(i)) for i in range(layout.num_layers)],
                config.cpu_bytes,
                config.method,
                config.staging_bytes,
                config.cpu_threads,
                layout_fingerprint=layout.fingerprint,
                # Not the model: chunk keys scope it, and models of one layout share a directory.
                disk_geometry_label=layout.geometry_label,
                **disk_options,
            )
            self._blob_fingerprint = layout.fingerprint
        self._verifier = None
        if config.verify_stores:
            scratch = _core.CpuTier(
                layout.to_core_segments(),
                device,
                layout.pages_per_chunk,
                [list(layout.layer_segments(i)) for i in range(layout.num_layers)],
                2 * layout.chunk_bytes,
                config.method,
                config.staging_bytes,
                config.cpu_threads,
                layout_fingerprint=layout.fingerprint,
            )
            self._verifier = _StoreVerifier(self._tier, scratch, config.timeout_s, layout.pages_per_chunk)
        if admission_policy is not None:
            self._tier.set_admission_hook(admission_policy.admit)
        if prefetch_policy is None and config.disk_dir is not None:
            from kvtier.policies import PrefetchAll

            prefetch_policy = PrefetchAll()
        self._prefetch_policy = prefetch_policy
        self.metrics = None  # a kvtier.metrics.Metrics, when attached (see kvtier.open_cache)
        self._closed = False
        self._bookkeeping_errors = 0
        self._lock = threading.Lock()
        self._prefaulter = None
        # Chunks beyond the tiers (kvtier.sources): built last, it may use this cache's tier.
        self._peers: ChunkSource | None = start_source(self, peers) if peers is not None else None
        # Once nothing above can fail: the thread must not outlive a cache that never opened.
        if config.cpu_prefault:
            self._prefaulter = self._start_prefault()

    def _start_prefault(self):
        """``cpu.prefault``: a kvtier.prefault.Prefaulter over the tier's arena where it is plain
        host memory that fits in half of what the kernel says is available, else None."""
        from kvtier.prefault import Prefaulter, mem_available_bytes

        if self._tier.arena_kind != "host":
            return None  # pinned (resident once registered) or device memory
        address, nbytes = self._tier.arena_region
        available = mem_available_bytes()
        if available is not None and nbytes > available // 2:
            log.info(
                "kvtier: cpu.prefault skipped: the tier's %d bytes are more than half of MemAvailable (%d)",
                nbytes,
                available,
            )
            return None
        return Prefaulter(address, nbytes)

    # -- views for the layers built on the cache -----------------------------------------------
    @property
    def tier(self):
        """The ``kvtier._core.CpuTier`` under this cache (CPU and disk tiers, by chunk key);
        None once closed. For callers that address chunks by key (PagedKVPool, planners, a
        ChunkSource): the cache's own calls add key derivation, metrics and the source."""
        return self._tier

    @property
    def codec(self):
        """The :class:`kvtier.codecs.Codec` of the chunks below the GPU, or None (``none``: raw
        chunks)."""
        return self._codec

    @property
    def blob_fingerprint(self) -> bytes:
        """The fingerprint of the blobs the tiers hold: the layout's, or with a codec, the
        layout's and the codec's (kvtier.codec_tier.codec_fingerprint). Disk files and peers
        check it."""
        return self._blob_fingerprint

    @property
    def peers(self) -> ChunkSource | None:
        """The source of chunks beyond the tiers (``peers=``; a PeerService for PeerConfig
        settings), or None."""
        return self._peers

    @property
    def keyer(self) -> ChunkKeyer:
        """The :class:`ChunkKeyer` giving this cache's chunk keys of a token sequence."""
        return self._keyer

    @property
    def bookkeeping_errors(self) -> int:
        """Failures of side bookkeeping counted so far (``stats()["bookkeeping_errors"]``);
        readable after close."""
        return self._bookkeeping_errors

    # -- helpers -----------------------------------------------------------------------------
    def _bookkeeping(self, what: str, fn, *args) -> None:
        """Run side bookkeeping (metrics, the peer digest and its journal) of an operation whose
        copies are already submitted: a failure is counted in ``stats()["bookkeeping_errors"]``
        and logged, never raised, so the caller always gets the operation's future."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - whatever it is, the submitted copy stands
            self._bookkeeping_errors += 1
            log.warning(
                "kvtier: %s bookkeeping failed (%s: %s); counted in bookkeeping_errors", what, type(e).__name__, e
            )

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidArgumentError("this KVCache is closed")

    def _keys_and_pages(self, tokens, page_ids, what: str, skip_chunks: int = 0) -> tuple[list[bytes], np.ndarray]:
        keys = self._keyer.keys(tokens)[skip_chunks:]
        pages = _as_page_ids(page_ids)
        needed = len(keys) * self.layout.pages_per_chunk
        if len(pages) < needed:
            raise InvalidArgumentError(
                f"{what}: page_ids has {len(pages)} pages, but the {len(keys)} full chunks of the tokens "
                f"need {needed} ({self.layout.chunk_tokens} tokens = {self.layout.pages_per_chunk} pages each)"
            )
        return keys, pages

    def stream_handle(self, stream=None) -> int:
        """The cudaStream_t (an int) this cache's copies are ordered after for ``stream`` (a
        torch.cuda.Stream, an int handle, or None: torch's current stream on a GPU layout, 0
        on a CPU one)."""
        if stream is not None or not self._on_gpu:
            return _stream_handle(stream)
        import torch  # only GPU layouts get here, and they came from torch tensors

        return int(torch.cuda.current_stream(self.layout.tensors[0].device).cuda_stream)

    # -- API -----------------------------------------------------------------------------------
    @_timed("store")
    def store(self, tokens, page_ids, *, stream=None, skip_chunks: int = 0) -> StoreFuture:
        """Offload every full chunk of ``tokens`` not cached yet from its pages.

        Args:
            tokens: token ids (list, numpy or torch int array) of the sequence, from its start.
            page_ids: the sequence's pages in order (chunk i = pages [i*ppc, (i+1)*ppc)).
            stream: on a GPU, the copy starts after the work queued on this stream (default:
                torch's current stream), so KV still being computed is never copied early.
            skip_chunks: leading chunks not to store (their pages are gone: a sliding window
                left them behind); ``page_ids`` then starts at chunk ``skip_chunks``. The keys
                still chain from the sequence's start.
        Returns:
            A :class:`StoreFuture`; the chunks become visible to lookups when it completes.

        The pages are read while the copy runs: they must not change until the future
        completes (``wait()`` returned or ``done()`` is true), or the cache keeps the new bytes
        under these tokens. ``cpu.verify_stores`` (env ``KVTIER_CPU_VERIFY_STORES=1``) checks it: each
        newly stored chunk is copied from its pages a second time once the first copy landed,
        and a difference is counted in ``stats()["store_verify_mismatches"]``.

        Raises before anything is submitted (nothing becomes visible), or returns the future:
        failures of bookkeeping after the submit are counted, never raised.
        """
        self._check_open()
        keys, pages = self._keys_and_pages(tokens, page_ids, "store", _check_skip(skip_chunks))
        if not keys:
            return StoreFuture(None, self.config.timeout_s)
        ppc = self.layout.pages_per_chunk
        fresh = None
        if self._verifier is not None:  # the chunks this store will copy: those not cached yet
            fresh = [i for i, k in enumerate(keys) if not len(self._tier.lookup_tiers(k))]
        op = self._tier.store(b"".join(keys), pages[: len(keys) * ppc], self.stream_handle(stream))
        # From here on the copy is submitted: what follows is bookkeeping and never raises.
        if self._peers is not None:  # the chunks join the source's view (a peer digest)
            self._bookkeeping("peer digest", self._peers.note_stored, keys)
        if fresh:
            items = [(keys[i], pages[i * ppc : (i + 1) * ppc].copy()) for i in fresh]
            self._bookkeeping("store verify", self._verifier.add, op, items)
        return StoreFuture(op, self.config.timeout_s, self._verifier)

    @_timed("lookup")
    def lookup(self, tokens) -> int:
        """Number of leading tokens of ``tokens`` whose KV is cached (a multiple of chunk_tokens)."""
        self._check_open()
        keys = self._keyer.keys(tokens)
        if not keys:
            return 0
        hits = self._tier.lookup(b"".join(keys))
        if hits and self._prefetch_policy is not None:
            self._prefetch(keys[:hits])
        if self._peers is not None and hits < len(keys):  # then what the source brings
            hits += self._peers.lookup(keys[hits:])
        return hits * self.layout.chunk_tokens

    def lookup_window(self, tokens, window_tokens: int, max_tokens: int | None = None) -> int:
        """The longest prefix of ``tokens`` (at most ``max_tokens``, a multiple of chunk_tokens)
        whose chunks a sliding-window layer needs to go on from it are cached locally: the
        chunks holding its last ``window_tokens - 1`` tokens (vLLM's window for the next
        token), here or, for those not here, at a peer. Earlier chunks may be gone. No prefetch
        starts."""
        self._check_open()
        if isinstance(window_tokens, bool) or not isinstance(window_tokens, int) or window_tokens <= 0:
            raise InvalidArgumentError(f"window_tokens must be a positive int, got {window_tokens!r}")
        ct = self.layout.chunk_tokens
        keys = self._keyer.keys(tokens)
        last = len(keys) if max_tokens is None else min(len(keys), max_tokens // ct)
        for end in range(last, 0, -1):
            first = max(0, (end * ct - window_tokens + 1) // ct)
            held = self._tier.lookup(b"".join(keys[first:end]))
            if held < end - first and self._peers is not None:  # then what the source brings
                held += self._peers.lookup(keys[first + held : end])
            if held == end - first:
                return end * ct
        return 0

    def _prefetch(self, keys: list[bytes]) -> None:
        """Start reading the disk chunks of a hit into the CPU tier, as the prefetch policy says."""
        codes = self._tier.lookup_tiers(b"".join(keys))
        tiers = ["cpu" if c == 1 else "disk" for c in codes]
        want = int(self._prefetch_policy.prefetch(len(keys), tiers))
        if want <= 0 or "disk" not in tiers:
            return
        # Cover the first `want` disk chunks; pool chunks among them are skipped by the tier.
        end, seen = 0, 0
        for end, t in enumerate(tiers, start=1):  # noqa: B007 - read after the loop
            seen += t == "disk"
            if seen >= want:
                break
        self._tier.prefetch(b"".join(keys[:end]))

    def lookup_tiers(self, tokens) -> list[str]:
        """Where each leading locally cached chunk of ``tokens`` is: ``"cpu"`` or ``"disk"``
        (stops at the first chunk held by neither; peers are not asked). Starts no prefetch."""
        self._check_open()
        keys = self._keyer.keys(tokens)
        if not keys:
            return []
        return ["cpu" if c == 1 else "disk" for c in bytes(self._tier.lookup_tiers(b"".join(keys)))]

    @_timed("load")
    def load(self, tokens, page_ids, *, stream=None, skip_chunks: int = 0) -> LoadHandle:
        """Copy the cached leading chunks of ``tokens`` into ``page_ids`` (in order).

        Only as many chunks as ``page_ids`` covers are loaded. The handle's ``num_tokens`` says
        how many leading tokens will be in place once ``wait()`` returns. ``skip_chunks``: the
        caller already holds that many leading chunks; loading starts after them (``page_ids``
        then receives chunks ``skip_chunks``, ``skip_chunks + 1``, ...; ``num_tokens`` counts
        from there).
        """
        self._check_open()
        keys = self._keyer.keys(tokens)[_check_skip(skip_chunks) :]
        pages = _as_page_ids(page_ids)
        if not keys:
            return LoadHandle(None, 0, self.layout.num_layers, self.config.timeout_s)
        if self._peers is not None:  # the tier's chunks, then the source's
            op = self._peers.load(keys, pages, self.stream_handle(stream))
        else:
            op = self._tier.load(b"".join(keys), pages, self.stream_handle(stream))
        return LoadHandle(op, op.chunks * self.layout.chunk_tokens, self.layout.num_layers, self.config.timeout_s)

    def take_events(self, max_records: int = 0) -> list[KVEvent]:
        """The KV events recorded since the last call, oldest first (kvtier.events): chunks that
        became findable (``stored``) or stopped being findable (``removed``) in the CPU tier
        (``cpu``) and the disk tier (``disk``); a new cache starts with ``cleared`` for each
        medium, then ``stored disk`` for what its disk recovered. Records of one kind and medium
        in a row come as one event, keys in order.

        ``max_records``: take at most this many chunk records (0: all). Recording is bounded by
        ``events_capacity`` (the oldest are dropped past it, counted in
        ``stats()["events_dropped"]``); 0 records nothing and this returns [].
        """
        if isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 0:
            raise InvalidArgumentError(f"max_records must be an int >= 0 (0: all), got {max_records!r}")
        tier = self._tier
        if tier is None or self._closed:
            raise InvalidArgumentError("this KVCache is closed")
        return events_from_records(tier.take_events(max_records))

    def stats(self) -> dict:
        """Counters of the CPU tier: index, blocks, chunks stored/loaded, bytes, method."""
        self._check_open()
        s = self._tier.stats()
        s["bookkeeping_errors"] = self._bookkeeping_errors
        if self._verifier is not None:
            s.update(self._verifier.counts)
        s["method"] = self._tier.method
        s["pinned"] = self._tier.pinned
        s["capacity_chunks"] = self._tier.capacity_chunks
        s["chunk_bytes"] = self._tier.blob_bytes
        if self._prefaulter is not None:
            s.update(self._prefaulter.stats())
        if self._peers is not None:
            s["peers"] = self._peers.stats()
        return s

    def persist(self, timeout_s: float | None = None) -> dict:
        """Write the CPU tier's chunks that the disk tier does not hold yet to disk, so that a
        restart on the same ``disk_dir`` finds them (the disk otherwise receives only chunks
        evicted from the CPU tier). Every such chunk is written, most-requested first, whatever
        ``disk_admit_min_seen`` or the admission policy say (those decide write-back at
        eviction); chunks already on disk are not written again. close() calls it
        (``disk_persist_on_close``), and a timer every ``disk_persist_interval_s``.

        Returns by ``timeout_s`` (default ``config.timeout_s``) with counts: ``written``,
        ``skipped`` (on disk already), ``failed``, ``not_started`` (deadline, or more chunks than
        the disk holds), ``still_running`` (writes that end on their own) and
        ``deadline_exceeded``. FailedPreconditionError without a disk tier.
        """
        self._check_open()
        if timeout_s is None:
            timeout_s = self.config.timeout_s
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s >= 0:
            raise InvalidArgumentError(f"timeout_s must be a number >= 0, got {timeout_s!r}")
        return self._tier.persist(float(timeout_s))

    def _persist_at_close(self) -> None:
        r = self._tier.persist(float(self.config.timeout_s))
        if r["failed"] or r["deadline_exceeded"]:
            log.warning(
                "kvtier: persist at close wrote %d chunks; %d failed, %d not started (deadline: %s)",
                r["written"],
                r["failed"],
                r["not_started"],
                r["deadline_exceeded"],
            )

    def drain(self, timeout_s: float | None = None) -> None:
        """Wait until no copy is in flight (and, with ``verify_stores``, every store is checked)."""
        self._check_open()
        self._tier.drain(self.config.timeout_s if timeout_s is None else timeout_s)
        if self._verifier is not None:
            self._bookkeeping("store verify", self._verifier.settle_all)

    def __del__(self) -> None:
        # A cache dropped without close(): its copies write into the layout's tensors, which go
        # with this object's attributes right after (the layout before the tier), so they must end
        # first. Finalizers run before a reference cycle is torn down, so the tensors are alive.
        tier = getattr(self, "_tier", None)
        if tier is None:
            return
        try:
            tier.drain(self.config.timeout_s)
        except Exception:  # noqa: BLE001 - past the deadline (or at interpreter exit): never free what may be written
            _LAYOUTS_KEPT_ALIVE.append(self.layout)

    def close(self) -> None:
        """Stop the peers, persist the CPU tier to disk (``disk_persist_on_close``; a failure is
        counted and logged, never raised), drain every copy and release the tiers. Every step runs whatever
        an earlier one raised; a drain past the deadline keeps the layout's tensors alive for
        the life of the process (copies may still write into them) and is raised at the end,
        after everything else was released."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        error = None
        if self._prefaulter is not None:  # the arena goes with the tier: stop populating it first
            self._prefaulter.close()
        if self._peers is not None:  # the source stops using the tier before it goes
            self._bookkeeping("peers close", self._peers.close)
        if self.config.disk_dir is not None and self.config.disk_persist_on_close:
            self._bookkeeping("persist", self._persist_at_close)  # counted, never raised
        try:
            self._tier.drain(self.config.timeout_s)
        except Exception as e:  # noqa: BLE001 - raised below, once the rest is released
            error = e
            _LAYOUTS_KEPT_ALIVE.append((self.layout, self._tier))
        if self._verifier is not None and error is None:
            self._bookkeeping("store verify", self._verifier.settle_all)
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            self._bookkeeping("metrics close", metrics.close)
        # The source holds the tier too, and its parts refer to one another (bound methods of a
        # peer service): dropped and collected here, so the tier (its disk file's lock with it)
        # goes when close returns, not at some later collection.
        had_source, self._peers = self._peers is not None, None
        self._tier = None
        if had_source:
            gc.collect()
        if error is not None:
            raise error

    def __enter__(self) -> KVCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
