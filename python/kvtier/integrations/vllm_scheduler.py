"""The scheduler side of the vLLM connector: per request, how many leading prompt tokens to load
(asked of the worker) and which new full chunks to save, packed into each step's metadata."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvtier.integrations.vllm_events import KVTierKVEvents, RankAgreement
from kvtier.integrations.vllm_lookup import _lookup_client
from kvtier.integrations.vllm_metadata import (
    KVTierConnectorMetadata,
    _LoadSpec,
    _SaveSpec,
    _tokens_bytes,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

_TIER_CODES = {1: CacheHitSource.HOST, 2: CacheHitSource.DISK, 3: CacheHitSource.P2P}


@dataclass
class _RequestState:
    tokens: np.ndarray
    groups: list[list[int]]  # the request's vLLM block ids, per KV cache group
    saved_upto: int = 0  # tokens whose chunks a save already covers (or a load brought)
    saves_issued: bool = False
    rollbacks: int = 0  # times vLLM rolled the request back to recompute (a failed load)

    @property
    def block_ids(self) -> list[int]:
        """The first KV cache group's block ids (the only group, but for a hybrid model)."""
        return self.groups[0]


class _SchedulerSide(KVConnectorBase_V1):
    """The scheduler-role methods of :class:`kvtier.integrations.vllm.KVTierConnector`, whose
    ``__init__`` sets the shared fields (``_settings``, ``_block_size``, ``_chunk_tokens``,
    ``_engine_id``, ``_do_load``, ``_do_save``) and then calls :meth:`_init_scheduler`."""

    def _init_scheduler(self, timeout_s: float) -> None:
        ktc = self._kv_transfer_config
        if self._do_load and ktc.kv_load_failure_policy != "recompute":
            log.warning(
                "kvtier: kv_load_failure_policy=%r: a prefix that cannot be loaded (evicted "
                "since the lookup, a peer gone) fails its request; set "
                "kv_load_failure_policy='recompute' to recompute it instead",
                ktc.kv_load_failure_policy,
            )
        # With tensor / pipeline parallel, every rank holds its shard in a cache of its own:
        # each lookup asks them all at once and a chunk hits only where every rank has it.
        self._client = _lookup_client(self._engine_id, timeout_s, self._world_size)
        self._lookup_timeout_s = timeout_s
        self._inflight: dict[str, tuple[int, float]] = {}  # req -> (lookup ticket, deadline)
        self._requests: dict[str, _RequestState] = {}
        self._pending_loads: dict[str, tuple[int, int]] = {}  # req -> (start, end) tokens
        # load_async: loads issued with the next step's metadata, and the end of each request's
        # load (its chunks need no save once it is scheduled).
        self._async_specs: list[tuple[_LoadSpec, list[int]]] = []  # (load, its blocks)
        self._async_loaded: dict[str, int] = {}
        self._lookups: dict[str, tuple[int, bytes]] = {}  # req -> (hit, tier codes)
        self._kv_events: KVTierKVEvents | None = None  # the workers' events not yet taken
        self._agreement = RankAgreement(self._world_size)  # chunks not yet reported by every rank
        # req -> (vLLM's Request, first and end token of its latest load, the load's blocks):
        # a failed load takes its tokens back out of what vLLM reports as cached.
        self._loads_issued: dict[str, tuple[Any, int, int, list[int]]] = {}
        self._requests_seen: dict[str, Any] = {}  # req -> vLLM's Request, between alloc and load
        self.uncounted_failed_tokens = 0  # failed-load tokens taken out of vLLM's cached count

    def _close_scheduler(self) -> None:
        self._client.close()

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a save that is dropped is a later miss

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if not self._do_load or not request.prompt_token_ids or request.mm_features:
            return 0, False
        ct = self._chunk_tokens
        tokens = np.asarray(request.prompt_token_ids, dtype=np.int64)
        # The last prompt token is always computed (its logits are the first output).
        limit = (len(tokens) - 1) // ct * ct
        if limit <= num_computed_tokens or num_computed_tokens % ct:
            self._forget_lookup(request.request_id)
            return 0, False
        result = self._lookup(request.request_id, tokens[:limit])
        if result is None:
            return None, False  # still in flight: vLLM asks again next step
        hit, codes = result
        hit = min(hit, limit)
        if hit <= num_computed_tokens:
            return 0, False
        self._lookups[request.request_id] = (hit, codes)
        return hit - num_computed_tokens, self._settings.load_async

    def _lookup(self, req_id: str, tokens: np.ndarray) -> tuple[int, bytes] | None:
        """The worker's answer for ``tokens``; None while it is in flight (at most
        ``lookup_wait_s`` waited here); a miss (0) when the lookup failed or passed its deadline."""
        pending = self._inflight.get(req_id)
        try:
            if pending is None:
                ticket = self._client.submit_lookup(tokens)
                pending = self._inflight[req_id] = (ticket, time.monotonic() + self._lookup_timeout_s)
            ticket, deadline = pending
            result = self._client.lookup_result(ticket, self._settings.lookup_wait_s)
        except (OSError, EOFError) as e:
            self._inflight.pop(req_id, None)
            log.warning("kvtier: lookup of request %s failed, computing it: %s", req_id, e)
            return 0, b""
        if result is not None:
            del self._inflight[req_id]
            return result
        if time.monotonic() < deadline:
            return None
        del self._inflight[req_id]
        self._client.abandon(ticket)
        log.warning(
            "kvtier: lookup of request %s passed its %s s deadline, computing it", req_id, self._lookup_timeout_s
        )
        return 0, b""

    def _forget_lookup(self, req_id: str) -> None:
        inflight = self._inflight.pop(req_id, None)
        if inflight is not None:
            self._client.abandon(inflight[0])

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if num_external_tokens <= 0:
            self._lookups.pop(request.request_id, None)
            return
        req_id = request.request_id
        hit, _ = self._lookups[req_id]
        start = hit - num_external_tokens
        if not self._settings.load_async:
            self._pending_loads[req_id] = (start, hit)
            self._requests_seen[req_id] = request
            return
        # The request waits (WAITING_FOR_REMOTE_KVS) until the worker reports the load done;
        # vLLM schedules it only then, so its load goes out with this step's metadata.
        bs = self._block_size
        tokens = np.asarray(request.prompt_token_ids, dtype=np.int64)
        groups = [list(g) for g in blocks.get_block_ids()]
        spec = _LoadSpec(
            req_id, _tokens_bytes(tokens[:hit]), start // self._chunk_tokens, [g[: hit // bs] for g in groups]
        )
        self._async_specs.append((spec, groups[0][start // bs : hit // bs]))
        self._loads_issued[req_id] = (request, start, hit, groups[0][start // bs : hit // bs])
        self._async_loaded[req_id] = hit

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict:
        if num_external_tokens == 0:
            return {}
        entry = self._lookups.pop(request.request_id, None)
        if entry is None:
            return {CacheHitSource.EXTERNAL_UNSPECIFIED: num_external_tokens}
        hit, codes = entry
        first = (hit - num_external_tokens) // self._chunk_tokens
        out: dict = {}
        for code in codes[first : hit // self._chunk_tokens]:
            source = _TIER_CODES.get(code, CacheHitSource.EXTERNAL_UNSPECIFIED)
            out[source] = out.get(source, 0) + self._chunk_tokens
        return out

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KVTierConnectorMetadata(preempted=set(scheduler_output.preempted_req_ids or ()))
        for spec, loaded_blocks in self._async_specs:
            meta.async_loads.append(spec)
            meta.rewritten.extend(loaded_blocks)
        self._async_specs = []
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            if new.prompt_token_ids is None:
                continue
            state = _RequestState(np.asarray(new.prompt_token_ids, dtype=np.int64), [list(g) for g in new.block_ids])
            loaded = self._async_loaded.pop(new.req_id, None)
            if loaded is not None:  # what loaded (vLLM took a failed load's tokens back) is stored
                state.saved_upto = min(loaded, new.num_computed_tokens) // self._chunk_tokens * self._chunk_tokens
            self._requests[new.req_id] = state
            self._refresh_blocks(new.req_id, state)
            self._add_rewritten(meta, new.req_id, state, new.num_computed_tokens)
            self._add_load(meta, new.req_id, state)
            self._add_save(meta, new.req_id, state, new.num_computed_tokens + scheduled.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                state.groups = [list(g) for g in new_blocks] if new_blocks else [[] for _ in state.groups]
            elif new_blocks:
                for group, ids in zip(state.groups, new_blocks):
                    group.extend(ids)
            computed = cached.num_computed_tokens[i]
            if computed < state.saved_upto:
                # vLLM rolled the request back (a load failed) or preempted it: the chunks from
                # `computed` on are computed again, and saved again once they are.
                state.saved_upto = computed // self._chunk_tokens * self._chunk_tokens
                state.rollbacks += 1
            self._refresh_blocks(req_id, state)
            self._add_rewritten(meta, req_id, state, computed)
            self._add_load(meta, req_id, state)
            self._add_save(meta, req_id, state, cached.num_computed_tokens[i] + scheduled.get(req_id, 0))
        return meta

    def _refresh_blocks(self, req_id: str, state: _RequestState) -> None:
        """Hook: a hybrid model's connector reads the blocks vLLM holds now (a window group's
        freed blocks are the null block, which the scheduler output does not say)."""

    def _add_rewritten(self, meta: KVTierConnectorMetadata, req_id: str, state: _RequestState, computed: int) -> None:
        # The request's blocks past what it held before this step are written from scratch by
        # this step or a later one (a load, or the forward): vLLM never shares such blocks.
        load = self._pending_loads.get(req_id)
        start = load[0] if load is not None else computed
        meta.rewritten.extend(state.block_ids[start // self._block_size :])

    def _add_load(self, meta: KVTierConnectorMetadata, req_id: str, state: _RequestState) -> None:
        load = self._pending_loads.pop(req_id, None)
        if load is None:
            return
        start, end = load
        ct = self._chunk_tokens
        bs = self._block_size
        request = self._requests_seen.pop(req_id, None)
        if request is not None:
            self._loads_issued[req_id] = (request, start, end, state.block_ids[start // bs : end // bs])
        meta.loads.append(
            _LoadSpec(
                req_id,
                _tokens_bytes(state.tokens[:end]),
                start // ct,
                [g[: end // bs] for g in state.groups],
            )
        )
        state.saved_upto = max(state.saved_upto, end)

    def _add_save(self, meta: KVTierConnectorMetadata, req_id: str, state: _RequestState, computed: int) -> None:
        if not self._do_save:
            return
        ct = self._chunk_tokens
        end = min(computed, len(state.tokens)) // ct * ct
        if end <= state.saved_upto or len(state.block_ids) * self._block_size < end:
            return
        meta.saves.append(
            _SaveSpec(
                req_id,
                _tokens_bytes(state.tokens[:end]),
                [g[: end // self._block_size] for g in state.groups],
            )
        )
        state.saved_upto = end
        state.saves_issued = True

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        invalid = getattr(connector_output, "invalid_block_ids", None)
        if invalid and self._loads_issued:
            self._uncount_failed_loads(invalid)
        failed = getattr(connector_output, "failed_recving", None)
        if failed and self._loads_issued:  # whole requests (a hybrid model's loads)
            self._uncount_failed_loads(set(), failed)
        events = getattr(connector_output, "kv_cache_events", None)
        if not isinstance(events, KVTierKVEvents):
            return
        if self._kv_events is None:
            self._kv_events = events
        else:
            self._kv_events.add_events(events.get_all_events())
            self._kv_events.increment_workers(events.get_number_of_workers())

    def _uncount_failed_loads(self, invalid: set[int], failed_requests: set[str] = frozenset()) -> None:
        """vLLM counts a request's connector tokens as cached when it schedules the load
        (``Request.prefill_stats``, what ``RequestOutput.num_cached_tokens`` and the usage's
        ``cached_tokens`` report); a load that then fails is recomputed from its first failed
        block, as vLLM's own rollback does, and those tokens are taken back out of the count
        while the stats are still the request's (before its first output)."""
        bs = self._block_size
        for req_id, (request, start, end, blocks) in list(self._loads_issued.items()):
            failed = [0] if req_id in failed_requests else [i for i, b in enumerate(blocks) if b in invalid]
            if not failed:
                continue
            del self._loads_issued[req_id]
            lost = end - (start + failed[0] * bs)
            stats = getattr(request, "prefill_stats", None)
            if stats is None or lost <= 0:
                continue
            lost = min(lost, stats.num_external_cached_tokens)
            stats.num_external_cached_tokens -= lost
            stats.num_cached_tokens -= lost
            stats.num_computed_tokens += lost
            self.uncounted_failed_tokens += lost

    def take_events(self) -> Iterable[KVCacheEvent]:
        """kvtier's tiers' events since the last call (vllm_events), for vLLM to publish."""
        events, self._kv_events = self._kv_events, None
        if events is None:
            return ()
        return self._agreement.feed(events.get_all_events())

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        req_id = request.request_id
        self._pending_loads.pop(req_id, None)
        self._lookups.pop(req_id, None)
        self._loads_issued.pop(req_id, None)
        self._requests_seen.pop(req_id, None)
        self._async_loaded.pop(req_id, None)
        self._forget_lookup(req_id)
        state = self._requests.pop(req_id, None)
        # Blocks with a store in flight stay allocated until get_finished reports the request.
        return bool(state is not None and state.saves_issued), None
