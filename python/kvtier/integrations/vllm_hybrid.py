"""The vLLM connector for hybrid models under vLLM's hybrid KV cache allocator (``SupportsHMA``):
full-attention and sliding-window KV cache groups, each with its own block ids.

Each KV cache group gets a :class:`kvtier.KVCache` of its own over its layers (its own disk
subdirectory, ``<disk_dir>/g<group>``; the CPU and disk budgets split by the groups' bytes per
chunk). A prefix is a hit only where every group holds what it needs of it.

- **Sliding-window groups.** vLLM gives a window group's blocks below the window as its shared
  null block (id 0), and frees them (``remove_skipped_blocks``) at the next step that schedules
  the request. A save stores the group's chunks that still have their blocks; those a step
  computed are stored before the next step starts (``wait_for_save`` waits for the window
  groups' copies), so every chunk a request computes is stored once. A load fills only the
  chunks vLLM gives blocks for (the window), starting after the leading null ones.
- **Loads are asynchronous.** With several groups vLLM takes load failures per request only
  (``failed_recving``: the request is recomputed from its start), never per block, so every load
  is asynchronous (``load_async`` on): the request waits while every group's chunks land.
- **KV events** are one group's: the first full-attention group's (the first group's when all
  are windowed). Each group's layout names the group, so their chunk keys differ; the groups
  store a prefix's chunks in the same step, and a full-attention group holds every chunk a hit
  needs.
- **Peers.** Each group's cache has a peer service of its own: every configured peer port plus
  ``rank * groups + group`` (group g of one instance peers with group g of the others).
- **Not built yet:** chunks longer than one block with a sliding-window group (refused at
  start), and Mamba / chunked-local groups (refused at start, by ``_check_hybrid``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults, SupportsHMA

from kvtier.errors import InvalidArgumentError, KVTierError
from kvtier.integrations.vllm_layout import describe_kv_caches
from kvtier.integrations.vllm_metadata import KVTierConnectorMetadata, _tokens_array

if TYPE_CHECKING:
    import torch
    from vllm.forward_context import ForwardContext
    from vllm.v1.request import Request

    from kvtier.cache import KVCache, LoadHandle, StoreFuture

log = logging.getLogger(__name__)

NULL_BLOCK = 0  # vLLM's shared null block (the block pool's first): a window group's gone blocks


@dataclass
class _Group:
    """One KV cache group: its layers' cache and, for a sliding-window group, the window."""

    index: int
    window_tokens: int | None  # None: full attention
    cache: KVCache


@dataclass
class _HybridLoad:
    """One request's asynchronous load: a handle per group that had chunks to load."""

    handles: list[LoadHandle]
    tokens: int  # the tokens it brings (after those vLLM holds)
    deadline: float
    failed: bool = False  # a group came back short or failed: vLLM recomputes the request
    late: bool = False


class _HybridSide(SupportsHMA):
    """The methods :class:`kvtier.integrations.vllm.KVTierHybridConnector` overrides or adds
    over :class:`~kvtier.integrations.vllm.KVTierConnector`."""

    def _init_hybrid(self) -> None:
        kv_cache_config = self._kv_cache_config
        groups = kv_cache_config.kv_cache_groups if kv_cache_config is not None else []
        from vllm.v1.kv_cache_interface import SlidingWindowSpec

        # A FullAttentionSpec may record a window too (the allocator off: every block kept).
        self._windows: list[int | None] = [
            g.kv_cache_spec.sliding_window if isinstance(g.kv_cache_spec, SlidingWindowSpec) else None for g in groups
        ]
        if any(w is not None for w in self._windows) and self._chunk_tokens != self._block_size:
            raise InvalidArgumentError(
                f"kv_connector_extra_config.chunk_tokens={self._chunk_tokens}: with a sliding-window "
                f"KV cache group kvtier's chunk must be one vLLM block ({self._block_size} tokens)"
            )
        # The group whose KV events are published: the first full-attention one, if any.
        self._events_group = next((i for i, w in enumerate(self._windows) if w is None), 0)
        # Every load is asynchronous: vLLM takes several groups' load failures per request only.
        self._settings = dataclasses.replace(self._settings, load_async=True)
        self._groups: list[_Group] = []
        self._hybrid_loads: dict[str, _HybridLoad] = {}
        self._failed_recving: set[str] = set()
        if getattr(self, "_counters", None) is not None:  # the worker's
            self._counters.update(loaded_requests=0, load_failed_requests=0)

    # -- scheduler side ---------------------------------------------------------------------
    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self.request_finished(request, block_ids[0] if block_ids else [])

    def _refresh_blocks(self, req_id: str, state) -> None:
        # vLLM frees a window group's blocks below the window (remove_skipped_blocks) and may
        # hand them back to the same request as new blocks: the scheduler output only lists the
        # new ones, so the block ids come from vLLM's KV cache manager (bound at start).
        # Only while the request has prompt chunks left to save: a decoding request's block
        # lists are not copied every step.
        ct = self._chunk_tokens
        manager = getattr(self, "_kv_cache_manager", None)
        if manager is not None and state.saved_upto < len(state.tokens) // ct * ct:
            state.groups = [list(g) for g in manager.get_block_ids(req_id)]

    # -- worker side ------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        kv_cache_config = self._kv_cache_config
        if kv_cache_config is None:  # vLLM always hands it to a worker (>= 0.32)
            raise InvalidArgumentError("KVTierHybridConnector needs vLLM's KVCacheConfig at start")
        self._shard_spec = shard = self._shard()
        groups = kv_cache_config.kv_cache_groups
        self._settings = self._settings.for_shard(shard, ports_per_rank=len(groups))
        cfg = self._settings.config
        layouts = {}
        for i, group in enumerate(groups):
            names = [n for n in group.layer_names if n in kv_caches]
            if not names:  # a pipeline stage without layers of this group: other ranks hold it
                continue
            window = self._windows[i]
            tag = f"g{i}" + (f"w{window}" if window is not None else "")
            layouts[i] = describe_kv_caches(
                {n: kv_caches[n] for n in names}, self._block_size, self._chunk_tokens, shard, group=tag
            )[0]
        if not layouts:
            raise InvalidArgumentError("kv_caches has no layer of any KV cache group")
        total = sum(lay.chunk_bytes for lay in layouts.values())
        for i, layout in layouts.items():
            over: dict[str, Any] = {"cpu_bytes": cfg.cpu.bytes * layout.chunk_bytes // total}
            if cfg.disk.dir is not None:
                path = os.path.join(str(cfg.disk.dir), f"g{i}")
                os.makedirs(path, exist_ok=True)
                over["disk_dir"] = path
                over["disk_bytes"] = cfg.disk.bytes * layout.chunk_bytes // total
            if i != self._events_group:
                over["events_capacity"] = 0  # only one group's events are published
            cache = self._open_cache(layout, cfg, self._settings.for_group(i), metrics=not self._groups, **over)
            self._groups.append(_Group(i, self._windows[i], cache))
        self._cache = self._groups[0].cache
        first = layouts[self._groups[0].index]
        self._pages_per_block = self._block_size // first.page_tokens
        self._on_gpu = first.device != "cpu"
        self._start_server()
        log.info(
            "kvtier: hybrid connector ready%s: %d KV cache groups (%s), disk %s",
            f" (shard {shard.label})" if shard is not None else "",
            len(self._groups),
            ", ".join(
                f"g{g.index}: window {g.window_tokens}" if g.window_tokens else f"g{g.index}: full"
                for g in self._groups
            ),
            cfg.disk.dir,
        )

    def _events_cache(self) -> KVCache | None:
        return next((g.cache for g in self._groups if g.index == self._events_group), None)

    def _caches(self) -> list[KVCache]:
        return [g.cache for g in self._groups] if self._cache is not None else []

    def _leading_null_chunks(self, blocks: list[int]) -> int:
        """Leading chunks with a null block among theirs (a window group's gone chunks)."""
        bpc = self._chunk_tokens // self._block_size
        n = 0
        while (n + 1) * bpc <= len(blocks) and NULL_BLOCK in blocks[n * bpc : (n + 1) * bpc]:
            n += 1
        return n

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, KVTierConnectorMetadata):
            return
        ct, bpc = self._chunk_tokens, self._chunk_tokens // self._block_size
        for spec in [*meta.loads, *meta.async_loads]:  # every load is asynchronous here
            tokens = _tokens_array(spec.tokens)
            self._counters["async_loads"] += 1
            self._counters["load_requests"] += 1
            wanted = (len(tokens) // ct - spec.skip_chunks) * ct
            self._counters["load_requested_tokens"] += wanted
            load = _HybridLoad([], wanted, time.monotonic() + self._settings.config.timeout_s)
            for group in self._groups:
                blocks = spec.block_ids[group.index] if group.index < len(spec.block_ids) else []
                skip = max(spec.skip_chunks, self._leading_null_chunks(blocks))
                want = len(tokens) // ct - skip
                if want <= 0:
                    continue
                try:
                    handle = group.cache.load(tokens, self._pages(blocks[skip * bpc :]), skip_chunks=skip)
                except Exception as e:  # noqa: BLE001 - any failure is a recompute, never a crash
                    log.warning("kvtier: load of request %s (group %d) failed: %r", spec.req_id, group.index, e)
                    self._counters["load_errors"] += 1
                    load.failed = True
                    continue
                load.handles.append(handle)
                if handle.num_tokens < want * ct:  # evicted since the lookup
                    load.failed = True
            self._hybrid_loads[spec.req_id] = load

    def _poll_async_loads(self) -> set[str]:
        done: set[str] = set()
        now = time.monotonic()
        for req_id, load in list(self._hybrid_loads.items()):
            if not all(h.done() for h in load.handles):
                self._note_late(req_id, load, now)
                continue
            for handle in load.handles:
                try:
                    handle.wait()  # ended: returns at once, or raises the copy's error
                except (KVTierError, TimeoutError) as e:
                    log.warning("kvtier: load of request %s failed: %s", req_id, e)
                    self._counters["load_errors"] += 1
                    load.failed = True
            del self._hybrid_loads[req_id]
            done.add(req_id)
            if load.failed:
                self._failed_recving.add(req_id)
                self._counters["load_failed_requests"] += 1
                self._counters["load_failed_tokens"] += load.tokens
            else:
                self._counters["loaded_requests"] += 1
                self._counters["loaded_tokens"] += load.tokens
        return done

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        sending, _ = super().get_finished(finished_req_ids)
        recving = self._poll_async_loads() if self._hybrid_loads else set()
        return sending, (recving or None)

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        sending, recving = self.get_finished(finished_req_ids)
        failed, self._failed_recving = self._failed_recving, set()
        return KVConnectorTransferResults(
            finished_sending=set(sending or ()), finished_recving=set(recving or ()), failed_recving=failed
        )

    def get_block_ids_with_load_errors(self) -> set[int]:
        return set()  # failures go per request (failed_recving)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are asynchronous: a request runs once its load ended

    def wait_for_save(self) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, KVTierConnectorMetadata) or self._cache is None:
            return
        bpc = self._chunk_tokens // self._block_size
        window_stores: list[StoreFuture] = []
        for spec in meta.saves:
            tokens = _tokens_array(spec.tokens)
            futures = self._stores.setdefault(spec.req_id, [])
            self._counters["save_requests"] += 1
            for group in self._groups:
                blocks = spec.block_ids[group.index] if group.index < len(spec.block_ids) else []
                skip = self._leading_null_chunks(blocks)
                if skip * bpc >= len(blocks):
                    continue
                try:
                    fut = group.cache.store(tokens, self._pages(blocks[skip * bpc :]), skip_chunks=skip)
                except Exception as e:  # noqa: BLE001 - a store that fails is a later miss
                    log.warning("kvtier: store of request %s (group %d) failed: %r", spec.req_id, group.index, e)
                    self._counters["store_errors"] += 1
                    continue
                if group is self._groups[0]:  # chunks counted once, as the first group's
                    self._counters["saved_chunks"] += fut.chunks
                (window_stores if group.window_tokens is not None else futures).append(fut)
        # vLLM frees a window group's blocks below the window when it next schedules the
        # request, and may hand them to another request: the copies must have read them by then.
        self._wait_stores(window_stores)

    def _lookup_hit(self, tokens: np.ndarray) -> int:
        # Full-attention groups need every chunk of the hit; a window group only the chunks its
        # window needs at the hit's end (its earlier chunks are never loaded, and may be gone).
        hit = min((g.cache.lookup(tokens) for g in self._groups if g.window_tokens is None), default=len(tokens))
        for g in self._groups:
            if g.window_tokens is not None:
                hit = g.cache.lookup_window(tokens, g.window_tokens, hit)
        return hit

    def _end_async_loads(self) -> None:
        for load in self._hybrid_loads.values():
            for handle in load.handles:
                try:
                    handle.wait()
                except (KVTierError, TimeoutError) as e:
                    log.warning("kvtier: a load failed at shutdown: %s", e)
        self._hybrid_loads.clear()

    def stats(self) -> dict:
        out = super().stats()
        out["groups"] = [
            {"group": g.index, "window_tokens": g.window_tokens, "cache": g.cache.stats()} for g in self._groups
        ]
        return out
