"""PagedKVPool: the GPU tier. A model's paged KV tensors, pages handed to sequences, full chunks
shared between sequences by reference count, and the tiers below it (a KVCache) behind it.

A request calls ``begin(tokens)``: the longest cached prefix is mapped into its page table, from
GPU pages already holding it (shared, no copy) and then from the CPU / disk tiers (copied into
fresh pages, asynchronously; ``seq.wait()`` or ``seq.wait_layer(i)`` before attention reads
them). The model computes the rest into the sequence's own pages, then ``commit(seq, tokens)``
registers the new full chunks so later requests share them, and ``release(seq)`` drops the
sequence's references. Pages of finished sequences stay cached, addressed by chunk key, until
the pool needs pages: then the least recently used unreferenced chunks are evicted, offloaded to
the CPU tier first if they are not there yet.

An eviction's offload may still be reading the pages it frees when they are handed out again.
By default ``begin`` and ``extend`` wait for it. ``begin(tokens, layerwise=True)`` hands the
pages out at once instead: the caller then writes layer ``i`` of its pages only after
``seq.stream_wait_writable(i, stream)`` (GPU: the stream waits, not the host) or
``seq.wait_writable(i)``, so a new request computes layer 0 while the offload copies the later
layers (kvtier's example engine does; ``seq.wait()`` waits for the rest).

A load that fails (``seq.wait()`` / ``seq.wait_layer(i)`` raise) leaves its pages holding stale
bytes: its chunks leave the pool's index at once, so no later request shares them and no
eviction stores them into a lower tier; their pages are freed with the last sequence using them.
The request is then released, and begun again to recompute what the load did not bring.

Example (CPU tensors here; ``device="cuda"`` on a GPU)::

    pool = PagedKVPool(num_layers=2, kv_heads=2, head_dim=64, num_pages=256,
                       page_tokens=16, chunk_tokens=64, cpu_bytes=64 << 20)
    seq = pool.begin(prompt)          # seq.cached_tokens leading tokens are already in place
    seq.wait()
    ... compute KV of prompt[seq.cached_tokens:] into pool.kv at seq.page_table ...
    pool.commit(seq, prompt)
    pool.release(seq)
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import OrderedDict

import numpy as np

from kvtier import _core
from kvtier.cache import CacheConfig, KVCache, LoadHandle
from kvtier.config import config_keys
from kvtier.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    KVTierError,
    ResourceExhaustedError,
)
from kvtier.events import CLEARED, GPU, REMOVED, STORED, EventQueue, KVEvent, events_from_records
from kvtier.keys import ChunkKeyer
from kvtier.layout import Layout
from kvtier.policies import pick_victims
from kvtier.sequence import GpuChunk, Sequence
from kvtier.sources import pool_share

__all__ = ["PagedKVPool", "Sequence"]


class PagedKVPool:
    """Paged KV tensors for one model, with prefix sharing and the CPU / disk tiers below.

    Args:
        num_layers, kv_heads, head_dim: the model's KV geometry.
        num_pages: pages in the pool (its hard capacity: num_pages * page_tokens tokens).
        page_tokens: tokens per page; chunk_tokens: tokens per chunk (a multiple of it).
        dtype, device: of the KV tensors (torch dtype, "cpu" or "cuda:N").
        kv_layout: "cross_layer" (default: ``[num_pages, layers, 2, page_tokens, heads, dim]``,
            one page = every layer's K and V, so a chunk moves as a few large DMAs) or "vllm"
            (per layer ``[2, num_pages, page_tokens, heads, dim]``).
        cache_config: a CacheConfig for the lower tiers (a KVCache over this pool's layout),
            or keyword arguments of one (``cpu_bytes=...``, ``disk_dir=...``); ``cpu_bytes=0``
            means no lower tier.
        planner: optional load-or-recompute planner (kvtier.planner.LoadPlanner protocol).
        eviction_policy: optional kvtier.policies.EvictionPolicy choosing which unreferenced
            chunks leave the pool (default: least recently used).
        write_through: store each chunk in the CPU tier as soon as ``commit`` registers it (an
            asynchronous copy on the offload stream, after the KV's compute) instead of when it
            is evicted. Peers can then pull it while it is still in GPU pages, and an eviction
            frees its pages without waiting for a copy. Costs PCIe traffic for chunks that would
            never have been evicted.

        peers: a kvtier.p2p.PeerConfig (or dict of its fields) to share the CPU / disk tiers
            with other instances: ``begin`` then also pulls chunks this instance lacks from the
            peers that hold them, after its own CPU / disk hits (see docs/p2p.md). Passed to
            the KVCache (``KVCache(peers=...)``), so a ``factory(cache) -> ChunkSource`` works
            too; ``peers.share_pool`` also shares this pool's pages with peers on this host.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        num_pages: int,
        page_tokens: int = 16,
        chunk_tokens: int = 256,
        dtype=None,
        device="cpu",
        kv_layout: str = "cross_layer",
        cache_config: CacheConfig | None = None,
        planner=None,
        eviction_policy=None,
        write_through: bool = False,
        peers=None,
        **cache_overrides,
    ) -> None:
        import torch

        for name, v in (
            ("num_layers", num_layers),
            ("kv_heads", kv_heads),
            ("head_dim", head_dim),
            ("num_pages", num_pages),
            ("page_tokens", page_tokens),
            ("chunk_tokens", chunk_tokens),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise InvalidArgumentError(f"{name} must be a positive int, got {v!r}")
        if chunk_tokens % page_tokens:
            raise InvalidArgumentError(f"chunk_tokens={chunk_tokens} must be a multiple of page_tokens={page_tokens}")
        dtype = dtype if dtype is not None else torch.bfloat16
        if kv_layout not in ("cross_layer", "vllm"):
            raise InvalidArgumentError(f"kv_layout must be 'cross_layer' or 'vllm', got {kv_layout!r}")
        self._share = pool_share(peers, torch.device(device))  # pages shared with peers on this host
        alloc = self._share.allocate if self._share is not None else None  # shared memory files
        if alloc is None:

            def alloc(shape, dtype):
                return torch.zeros(*shape, dtype=dtype, device=device)

        if kv_layout == "cross_layer":
            self.kv = alloc((num_pages, num_layers, 2, page_tokens, kv_heads, head_dim), dtype)
            self.layout = Layout.from_cross_layer(self.kv, chunk_tokens=chunk_tokens)
        else:
            self.kv = [alloc((2, num_pages, page_tokens, kv_heads, head_dim), dtype) for _ in range(num_layers)]
            self.layout = Layout.from_vllm(self.kv, chunk_tokens=chunk_tokens)
        self.kv_layout = kv_layout
        self.num_layers, self.page_tokens, self.chunk_tokens = num_layers, page_tokens, chunk_tokens
        self.pages_per_chunk = chunk_tokens // page_tokens
        self.num_pages = num_pages
        if cache_config is not None:
            config = cache_config
        elif cache_overrides.get("cpu_bytes", 1) == 0:
            config = None  # GPU tier only
        else:
            config = CacheConfig(**cache_overrides)
        if peers is not None and config is None:
            raise InvalidArgumentError("peers need a CPU tier to pull into: set cpu_bytes > 0")
        self.cache: KVCache | None = KVCache(self.layout, config, peers=peers) if config is not None else None
        model_id = config.model_id if config is not None else cache_overrides.get("model_id", "default")
        salt = config.tenant_salt if config is not None else cache_overrides.get("tenant_salt")
        self.keyer = ChunkKeyer.from_layout(model_id, self.layout, salt)
        self.planner = planner
        self.eviction_policy = eviction_policy
        if not isinstance(write_through, bool):
            raise InvalidArgumentError(f"write_through must be a bool, got {write_through!r}")
        self.write_through = write_through and self.cache is not None
        self._clock = 0
        self._free = _core.BlockAllocator(num_pages, 1)  # page ids only: O(1), thread-safe
        # Offloads of evicted chunks that may still read the pages they freed: (transfer, pages).
        self._page_readers: list[tuple[object, frozenset[int]]] = []
        self._chunks: OrderedDict[bytes, GpuChunk] = OrderedDict()  # LRU order of unreferenced use
        self._lock = threading.RLock()
        self._next_seq = 0
        self._tail_loader = None  # a thread, made on the first split plan
        # GPU events (kvtier.events): chunks registered in or dropped from the pool's index.
        capacity = config.events_capacity if config is not None else cache_overrides.get("events_capacity")
        if capacity is None:
            capacity = config_keys()["events.capacity"]["default"]
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise InvalidArgumentError(f"events_capacity must be an int >= 0 (0: no events), got {capacity!r}")
        self._events = EventQueue(capacity)
        self._events.record(CLEARED, GPU, ())
        self._stats = dict(
            begins=0,
            gpu_hit_chunks=0,
            lower_hit_chunks=0,
            miss_chunks=0,
            planned_recompute_chunks=0,
            evicted_chunks=0,
            offloaded_chunks=0,
            offload_skipped_chunks=0,
            committed_chunks=0,
            shared_pinned_chunks=0,
            failed_load_chunks_dropped=0,
            failed_load_pages_kept=0,
        )
        if self._share is not None:
            tensors = [self.kv] if kv_layout == "cross_layer" else list(self.kv)
            self._share.attach(self.cache.peers, self, tensors, 0 if kv_layout == "cross_layer" else 1)

    # -- sharing pages with peers on this host (kvtier.sources.PoolShare) ------------------------
    def share_has(self, key: bytes) -> bool:
        return key in self._chunks

    def share_pin(self, keys: list[bytes]) -> list[tuple[int, ...]]:
        """Pin the leading chunks of ``keys`` held in complete pages (a reference each, so no
        eviction reuses the pages) and return their pages; the KV in them is complete when this
        returns (work queued on the device is waited for)."""
        out = []
        with self._lock:
            for k in keys:
                c = self._chunks.get(k)
                if c is None or (c.loading is not None and not c.loading.landed()):
                    break  # not here, or still being filled from a lower tier
                c.refs += 1
                out.append(c.pages)
            self._stats["shared_pinned_chunks"] += len(out)
        if out and self.layout.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(torch.device(self.layout.device))  # commit registers chunks whose compute is queued
        return out

    def share_unpin(self, keys: list[bytes]) -> None:
        with self._lock:
            for k in keys:
                c = self._chunks.get(k)
                if c is not None:
                    self._unref(c)

    # -- pages ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def scratch_pages(self, n: int):
        """``n`` free pages for the caller's own use while the ``with`` block runs (evicting
        unreferenced chunks if needed, as a request would), freed at its end: a planner
        measures loads into them. Yields the page ids."""
        pages = self._allocate(n)
        try:
            yield pages
        finally:
            self._free.free_batch(pages)

    def _allocate(self, n: int, seq: Sequence | None = None) -> list[int]:
        """``n`` free pages, evicting chunks for them if needed. An offload still reading some
        of them is waited for here, or with ``seq.layerwise`` handed to ``seq`` to wait on layer
        by layer before it writes them."""
        if n == 0:
            return []
        free = self._free.stats()["free_blocks"]
        if free < n:
            self._evict(n - free)
        try:
            pages = self._free.allocate_batch(n)
        except ResourceExhaustedError:
            raise ResourceExhaustedError(
                f"the pool needs {n} pages but only {self._free.stats()['free_blocks']} are free and every "
                f"cached chunk is referenced by a live sequence ({self.num_pages} pages in all)"
            ) from None
        try:
            self._order_writes(pages, seq)
        except BaseException:
            self._free.free_batch(pages)  # still read by an offload: listed in _page_readers
            raise
        return pages

    def _order_writes(self, pages: list[int], seq: Sequence | None) -> None:
        """Offloads still reading any of ``pages`` end before anyone writes them: waited for
        here (bounded by the cache's deadline), or handed to a layerwise ``seq``."""
        self._page_readers = [(t, held) for t, held in self._page_readers if not t.done]
        mine = set(pages)
        for transfer, held in self._page_readers:
            if held.isdisjoint(mine):
                continue
            if seq is not None and seq.layerwise:
                seq._page_readers.append((transfer, self.cache.config.timeout_s))
                continue
            try:
                transfer.wait(self.cache.config.timeout_s)
            except DeadlineExceededError:
                raise  # still reading: the pages cannot be written yet
            except KVTierError:
                pass  # the copy failed and ended: the chunks are not in the tier, the pages are free

    def _evict(self, pages_needed: int) -> None:
        """Free at least ``pages_needed`` pages by evicting unreferenced chunks, LRU first, after
        offloading those the lower tier lacks (one batched store, waited for: the pages are
        reused right after)."""
        victims = pick_victims(
            (c for c in self._chunks.values() if c.refs == 0),
            pages_needed,
            lambda c: len(c.pages),
            self.eviction_policy,
        )
        if not victims:
            return
        for c in list(victims):
            if c.loading is not None:
                try:
                    c.loading.wait()  # its pages are still being written
                except KVTierError:
                    self._load_failed(c.loading)  # stale pages: dropped (and freed), never stored
                    victims.remove(c)
                    continue
            if c.offload is not None:  # a write-through copy may still be reading its pages
                try:
                    c.offload.wait(self.cache.config.timeout_s)
                except DeadlineExceededError:
                    raise  # still reading: the pages cannot be reused
                except KVTierError:
                    pass  # the copy failed and ended: the store below copies the chunk again
                c.offload = None
        if self.cache is not None and victims:
            # Offload the victims as one store; chunks already below are skipped by the tier. Its
            # copies may still read the pages: whoever is given them waits (_order_writes).
            op = self._store(victims)
            if op.transfer is not None:
                self._page_readers.append((op.transfer, frozenset(p for c in victims for p in c.pages)))
        for c in victims:
            del self._chunks[c.key]
            self._free.free_batch(list(c.pages))
        self._events.record(REMOVED, GPU, [c.key for c in victims])
        self._stats["evicted_chunks"] += len(victims)

    # -- requests --------------------------------------------------------------------------------
    def begin(self, tokens, *, stream=None, layerwise: bool = False) -> Sequence:
        """Start a request: map its longest cached prefix and give it pages for all its tokens.

        Args:
            stream: the CUDA stream the loads are ordered after (default: the current one).
            layerwise: the caller calls ``seq.stream_wait_writable(i, stream)`` (or
                ``seq.wait_writable(i)``) before it writes layer ``i`` of the sequence's pages,
                so pages an eviction's offload still reads are handed out without waiting (see
                the module doc). Pages a load fills are always waited for here.
        """
        keys = self.keyer.keys(tokens)
        num_tokens = len(tokens)
        ct, ppc = self.chunk_tokens, self.pages_per_chunk
        total_pages = math.ceil(num_tokens / self.page_tokens)
        with self._lock:
            self._stats["begins"] += 1
            seq = Sequence(self._next_seq, num_tokens, [], layerwise=layerwise, _on_load_failed=self._load_failed)
            self._next_seq += 1
            for k in keys:  # GPU hits: share the pages, no copy
                c = self._chunks.get(k)
                if c is None:
                    break
                c.refs += 1
                c.uses += 1
                self._clock += 1
                c.last_use = self._clock
                self._chunks.move_to_end(k)
                seq._chunks.append(c)
                seq.page_table.extend(c.pages)
            gpu_hits = len(seq._chunks)
            lower = head = 0
            peers = self.cache.peers if self.cache is not None else None
            if self.cache is not None and gpu_hits < len(keys):
                lower = self.cache.tier.lookup(b"".join(keys[gpu_hits:]))
                if peers is not None and gpu_hits + lower < len(keys):  # digests, then confirm
                    lower += peers.lookup(keys[gpu_hits + lower :])
                if lower and self.planner is not None:
                    tiers = self._tiers_of(keys[gpu_hits : gpu_hits + lower])
                    split = getattr(self.planner, "plan_split", None)
                    if split is not None:  # recompute a head while the tail after it loads
                        head, keep = (int(x) for x in split(self, gpu_hits, tiers))
                        head = max(0, min(lower, head))
                        keep = max(0, min(lower - head, keep))
                    else:
                        keep = max(0, min(lower, int(self.planner.plan(self, gpu_hits, tiers))))
                    seq.planned_recompute_tokens = (lower - keep) * ct
                    self._stats["planned_recompute_chunks"] += lower - keep
                    lower = keep
            try:
                # Loads write pages on the tier's streams: an offload still reading them ends first.
                pages = self._allocate(total_pages - len(seq.page_table), None if lower else seq)
            except KVTierError:
                self._drop_refs(seq)
                raise
            loaded = 0
            if lower and head:  # split: the tail loads in the background while the head computes
                first = gpu_hits + head
                tail_keys, tail_pages = keys[first : first + lower], pages[head * ppc : (head + lower) * ppc]
                fut = self._loader().submit(
                    self._load, tail_keys, np.asarray(tail_pages, dtype=np.int64), self.cache.stream_handle(stream)
                )
                seq._tail = (fut, first, lower, tail_keys, tail_pages)
                seq.tail_start = first * ct
                lower = 0  # counted when it lands (finish_tail)
            if lower:
                op = self._load(
                    keys[gpu_hits : gpu_hits + lower],
                    np.asarray(pages[: lower * ppc], dtype=np.int64),
                    self.cache.stream_handle(stream),
                )
                loaded = op.chunks
                if loaded:
                    self._register_loaded(seq, op, gpu_hits * ct, keys[gpu_hits : gpu_hits + loaded], pages)
            seq.page_table.extend(pages)
            seq.gpu_hit_tokens = gpu_hits * ct
            seq.lower_hit_tokens = loaded * ct
            seq.cached_tokens = (gpu_hits + loaded) * ct
            self._stats["gpu_hit_chunks"] += gpu_hits
            self._stats["lower_hit_chunks"] += loaded
            self._stats["miss_chunks"] += len(keys) - gpu_hits - loaded - (seq._tail[2] if seq._tail else 0)
            return seq

    def _register_loaded(self, seq: Sequence, op, first_token: int, keys: list[bytes], pages: list[int]) -> None:
        """Chunks ``keys`` are landing in ``pages`` (``ppc`` a chunk) through ``op``: the
        sequence waits on it from ``first_token`` on, and later requests share the chunks."""
        ppc = self.pages_per_chunk
        handle = LoadHandle(op, len(keys) * self.chunk_tokens, self.num_layers, self.cache.config.timeout_s)
        seq._loads.append((first_token, handle))
        seq._pending = None
        registered = []
        for i, k in enumerate(keys):
            c = GpuChunk(k, tuple(pages[i * ppc : (i + 1) * ppc]), refs=1, loading=handle)
            if k in self._chunks:  # registered meanwhile by another request: keep ours private
                continue
            self._chunks[k] = c
            seq._chunks.append(c)
            registered.append(k)
        self._events.record(STORED, GPU, registered)

    def _loader(self):
        """The thread that runs split plans' tail loads (a disk read blocks until it is done)."""
        if self._tail_loader is None:
            from concurrent.futures import ThreadPoolExecutor

            self._tail_loader = ThreadPoolExecutor(1, thread_name_prefix="kvtier-tail-load")
        return self._tail_loader

    def _load(self, keys: list[bytes], pages: np.ndarray, stream: int):
        """Start loading ``keys`` into ``pages`` (CPU / disk tiers, then peers); returns the op."""
        peers = self.cache.peers
        if peers is not None:
            return peers.load(keys, pages, stream)
        return self.cache.tier.load(b"".join(keys), pages, stream)

    def finish_tail(self, seq: Sequence, timeout_s: float | None = None) -> int:
        """A split plan's head is computed: wait until the tail's load has started (its disk
        reads done; the copy into pages may still run, waited per layer like any load) and
        return how many tokens from ``seq.tail_start`` it holds (fewer than planned when a chunk
        vanished meanwhile: compute those). 0 without a split plan, or when the load failed."""
        if seq._tail is None:
            return 0
        fut, first, planned, keys, pages = seq._tail
        try:
            op = fut.result(timeout=self.cache.config.timeout_s if timeout_s is None else timeout_s)
        except KVTierError:
            op = None  # a miss: the tail is recomputed
        with self._lock:
            seq._tail = None
            loaded = op.chunks if op is not None else 0
            if loaded:
                self._register_loaded(seq, op, first * self.chunk_tokens, keys[:loaded], pages)
            seq.lower_hit_tokens += loaded * self.chunk_tokens
            self._stats["lower_hit_chunks"] += loaded
            self._stats["miss_chunks"] += planned - loaded
        return loaded * self.chunk_tokens

    def extend(self, seq: Sequence, num_tokens: int) -> list[int]:
        """Grow ``seq`` to ``num_tokens`` tokens (decode); returns its new pages."""
        self._check_live(seq)
        need = math.ceil(num_tokens / self.page_tokens) - len(seq.page_table)
        with self._lock:
            pages = self._allocate(max(0, need), seq)
            seq.page_table.extend(pages)
            seq.num_tokens = max(seq.num_tokens, num_tokens)
            return pages

    def commit(self, seq: Sequence, tokens) -> int:
        """Register the full chunks of ``tokens`` (the sequence's tokens so far, whose KV is now
        computed into its pages) so later requests share them. Returns chunks newly registered."""
        self._check_live(seq)
        self.finish_tail(seq)
        keys = self.keyer.keys(tokens)
        ppc = self.pages_per_chunk
        if len(keys) * ppc > len(seq.page_table):
            raise InvalidArgumentError(
                f"tokens hold {len(keys)} full chunks but the sequence has only {len(seq.page_table)} pages"
            )
        added = 0
        with self._lock:
            have = {id(c) for c in seq._chunks}
            # Ours (hits, loads, earlier commits) lead, except after a split plan: then the head
            # computed before the loaded tail is registered too.
            for i in range(0 if seq.tail_start is not None else len(seq._chunks), len(keys)):
                k = keys[i]
                if k in self._chunks:
                    existing = self._chunks[k]
                    if id(existing) in have:
                        continue
                    break  # someone else holds these tokens in other pages; ours stay private
                pages = tuple(seq.page_table[i * ppc : (i + 1) * ppc])
                self._clock += 1
                c = GpuChunk(k, pages, refs=1, last_use=self._clock)
                self._chunks[k] = c
                seq._chunks.append(c)
                added += 1
            self._stats["committed_chunks"] += added
            if added:
                self._events.record(STORED, GPU, [c.key for c in seq._chunks[len(seq._chunks) - added :]])
            if added and self.write_through:
                self._write_through(seq._chunks[len(seq._chunks) - added :])
            elif added and self._share is not None:  # peers on this host can map them: in the digest
                self.cache.peers.note_stored([c.key for c in seq._chunks[len(seq._chunks) - added :]])
        return added

    def _write_through(self, chunks: list[GpuChunk]) -> None:
        """Start storing ``chunks`` in the CPU tier; each remembers the copy, which ``_evict``
        waits for before reusing its pages."""
        op = self._store(chunks)
        if op.transfer is not None:
            for c in chunks:
                c.offload = op.transfer

    def _store(self, chunks: list[GpuChunk]):
        """Start one store of ``chunks`` into the CPU tier, ordered after the work queued on the
        compute stream (chunks it already holds are skipped); counts it, and tells the peers.
        Returns the tier's op (its ``transfer`` may still be running)."""
        keys = [c.key for c in chunks]
        pages = np.fromiter((p for c in chunks for p in c.pages), dtype=np.int64)
        op = self.cache.tier.store(b"".join(keys), pages, self.cache.stream_handle(None))
        self._stats["offloaded_chunks"] += op.chunks
        self._stats["offload_skipped_chunks"] += op.skipped_full
        if op.chunks and self.cache.peers is not None:
            self.cache.peers.note_stored(keys)
        return op

    def release(self, seq: Sequence) -> None:
        """The request is over: drop its references; pages not in a registered chunk are freed."""
        self.finish_tail(seq)  # its pages may be in the middle of a load
        with self._lock:
            if seq._released:
                return
            seq._released = True
            owned = set()
            for c in seq._chunks:
                owned.update(c.pages)
            self._drop_refs(seq)
            private = [p for p in seq.page_table if p not in owned]
            if private:
                self._free.free_batch(private)
            seq.page_table = []

    def _drop_refs(self, seq: Sequence) -> None:
        for c in seq._chunks:
            self._unref(c)

    def _unref(self, c: GpuChunk) -> None:
        c.refs -= 1
        if c.refs == 0 and c.failed:
            self._free_failed(c)
        elif c.refs == 0 and self._chunks.get(c.key) is c:
            self._chunks.move_to_end(c.key)  # most recently used among the evictable

    def _load_failed(self, handle: LoadHandle) -> None:
        """``handle``'s load failed: its chunks' pages hold stale bytes. They leave the index (no
        request shares them, no eviction stores them) and their pages are freed once unused."""
        with self._lock:
            dropped = [c for c in self._chunks.values() if c.loading is handle]
            self._events.record(REMOVED, GPU, [c.key for c in dropped])
            for c in dropped:
                del self._chunks[c.key]
                c.failed = True
                self._stats["failed_load_chunks_dropped"] += 1
                if c.refs == 0:
                    self._free_failed(c)

    def _free_failed(self, c: GpuChunk) -> None:
        # A copy may still write into the pages after an error on one layer: wait for its end
        # (bounded); pages it may still write are never reused.
        if not c.loading.done():
            try:
                c.loading.wait(self.cache.config.timeout_s)
            except KVTierError:
                pass
        if c.loading.done():
            self._free.free_batch(list(c.pages))
        else:
            self._stats["failed_load_pages_kept"] += len(c.pages)
        c.pages = ()

    def _tiers_of(self, keys: list[bytes]) -> list[str]:
        """Where each chunk is below the GPU: "cpu", "disk" or "peer" (beyond the local ones)."""
        codes = self.cache.tier.lookup_tiers(b"".join(keys))
        tiers = ["cpu" if c == 1 else "disk" for c in codes]
        return tiers + ["peer"] * (len(keys) - len(tiers))  # the rest: held by peers

    def _check_live(self, seq: Sequence) -> None:
        if seq._released:
            raise InvalidArgumentError(f"sequence {seq.seq_id} was released")

    # -- events ----------------------------------------------------------------------------------
    def take_events(self, max_records: int = 0) -> list[KVEvent]:
        """The KV events since the last call (kvtier.events): the GPU medium's first (``stored
        gpu`` when ``commit`` registers a chunk or a load from a lower tier lands it in pages
        other requests share, ``removed gpu`` when it is evicted or dropped after a failed load;
        a new pool starts with ``cleared gpu``), then its cache's CPU and disk events
        (:meth:`KVCache.take_events`). ``max_records`` bounds the records taken from each
        (0: all)."""
        if isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 0:
            raise InvalidArgumentError(f"max_records must be an int >= 0 (0: all), got {max_records!r}")
        out = events_from_records(self._events.take(max_records))
        if self.cache is not None:
            out.extend(self.cache.take_events(max_records))
        return out

    # -- views -----------------------------------------------------------------------------------
    def cached_chunks(self) -> int:
        return len(self._chunks)

    def stats(self) -> dict:
        with self._lock:
            s = dict(self._stats)
            alloc = self._free.stats()
            s.update(
                pages_total=self.num_pages,
                pages_free=alloc["free_blocks"],
                gpu_cached_chunks=len(self._chunks),
                gpu_referenced_chunks=sum(1 for c in self._chunks.values() if c.refs),
                gpu_events_recorded=self._events.recorded,
                gpu_events_dropped=self._events.dropped,
                gpu_events_pending=self._events.pending(),
            )
        if self.cache is not None:
            s["lower"] = self.cache.stats()
        if self.planner is not None:  # the latest decision and its inputs
            s["planner"] = getattr(self.planner, "last_plan", None)
        return s

    def close(self) -> None:
        if self._tail_loader is not None:
            self._tail_loader.shutdown(wait=True)
        if self.cache is not None:
            self.cache.close()
        if self._share is not None:
            self._share.close()  # shared memory: remove the pool's files
