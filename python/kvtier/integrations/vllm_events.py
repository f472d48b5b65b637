"""The vLLM connector's KV events: what kvtier's tiers gained and lost, in vLLM's event types, so
vLLM publishes them on its KV-event stream (``--kv-events-config``) beside its own GPU blocks.

The worker side takes its cache's events (:meth:`kvtier.KVCache.take_events`) each step and
hands them to vLLM as :class:`KVTierKVEvents`; vLLM gathers them from every worker into the
scheduler side, which keeps the events every worker reported (vLLM's rule for connector events:
with several workers, an event one of them lacks is not published) and yields them from
``take_events``. ``block_hashes`` are kvtier's chunk keys (16 bytes, ``kvtier.keys``):
a consumer names a prompt's chunks with the same keyer (``kvtier route`` does); ``token_ids`` are
not carried. Media: ``CPU`` (the pinned CPU tier), ``STORAGE`` (the disk tier).
"""

from __future__ import annotations

from vllm.distributed.kv_events import (
    BlockRemoved,
    BlockStored,
    KVCacheEvent,
    KVConnectorKVEvents,
    KVEventAggregator,
)

from kvtier.events import CLEARED, CPU, DISK, GPU, STORED, KVEvent

__all__ = ["VLLM_MEDIA", "KVTierKVEvents", "to_vllm_events"]

VLLM_MEDIA = {GPU: "GPU", CPU: "CPU", DISK: "STORAGE"}


def to_vllm_events(events: list[KVEvent], chunk_tokens: int) -> list[KVCacheEvent]:
    """kvtier's events as vLLM's: ``BlockStored`` / ``BlockRemoved`` per event (keys in order).

    A ``cleared`` medium is left out: a cache clears its media only when it opens, before any
    store (a router meets a new instance empty), and vLLM's event aggregation cannot carry
    ``AllBlocksCleared`` (it counts events by hash, which that class lacks)."""
    out: list[KVCacheEvent] = []
    for e in events:
        medium = VLLM_MEDIA[e.medium]
        if e.kind == CLEARED:
            continue
        if e.kind == STORED:
            out.append(
                BlockStored(
                    block_hashes=list(e.keys),
                    parent_block_hash=None,
                    token_ids=[],
                    block_size=chunk_tokens,
                    lora_id=None,
                    medium=medium,
                    lora_name=None,
                )
            )
        else:
            out.append(BlockRemoved(block_hashes=list(e.keys), medium=medium))
    return out


class KVTierKVEvents(KVConnectorKVEvents):
    """kvtier's events of one or more workers, as vLLM carries them from the workers to the
    scheduler (``KVConnectorOutput.kv_cache_events``)."""

    def __init__(self, num_workers: int = 1) -> None:
        self._aggregator = KVEventAggregator(num_workers)

    def add_events(self, events: list[KVCacheEvent]) -> None:
        self._aggregator.add_events(events)

    def aggregate(self) -> KVTierKVEvents:
        """Keep only the events every worker reported (each rank holds its own shard)."""
        common = self._aggregator.get_common_events()
        self._aggregator.clear_events()
        self._aggregator.add_events(common)
        self._aggregator.reset_workers()
        return self

    def increment_workers(self, count: int = 1) -> None:
        self._aggregator.increment_workers(count)

    def get_all_events(self) -> list[KVCacheEvent]:
        return self._aggregator.get_all_events()

    def get_number_of_workers(self) -> int:
        return self._aggregator.get_number_of_workers()

    def clear_events(self) -> None:
        self._aggregator.clear_events()
        self._aggregator.reset_workers()
