"""The vLLM connector's KV events: what kvtier's tiers gained and lost, in vLLM's event types, so
vLLM publishes them on its KV-event stream (``--kv-events-config``) beside its own GPU blocks.

The worker side takes its cache's events (:meth:`kvtier.KVCache.take_events`) each step and
hands them to vLLM as :class:`KVTierKVEvents`; vLLM gathers them from every worker into the
scheduler side, which publishes a chunk's event once every worker reported it (vLLM's rule for
connector events: with several workers, an event one of them lacks is not published), counted
per chunk across steps by :class:`RankAgreement` (ranks store and evict their shards at their
own pace), and yields them from ``take_events``. Ranks key a chunk alike
(:attr:`kvtier.layout.Layout.key_fingerprint`), so their events name the same chunks.
``block_hashes`` are kvtier's chunk keys (16 bytes, ``kvtier.keys``): a consumer names a
prompt's chunks with the same keyer (``kvtier route`` does); ``token_ids`` are not carried.
Media: ``CPU`` (the pinned CPU tier), ``STORAGE`` (the disk tier).
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

__all__ = ["VLLM_MEDIA", "KVTierKVEvents", "RankAgreement", "to_vllm_events"]

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


class RankAgreement:
    """The chunk events every one of ``world_size`` workers reported, counted per chunk across
    steps: a chunk's ``BlockStored`` on a medium is published when the last rank stored its
    shard there (only then does a load of it find every shard), its ``BlockRemoved`` when the
    last rank removed it. With one worker every event passes at once.

    Counts wait at most ``capacity`` (chunk, medium, kind) entries; past that the oldest are
    dropped and counted in :attr:`dropped` (a rank that never reports a chunk, e.g. one whose
    cache refused it, must not hold memory forever)."""

    def __init__(self, world_size: int, capacity: int = 1 << 18) -> None:
        self.world_size = world_size
        self.capacity = capacity
        self.dropped = 0
        self._counts: dict[tuple, int] = {}

    def feed(self, events: list[KVCacheEvent]) -> list[KVCacheEvent]:
        """The events of ``events`` (every worker's, in any order) that are now agreed."""
        if self.world_size == 1:
            return list(events)
        out: list[KVCacheEvent] = []
        for e in events:
            stored = isinstance(e, BlockStored)
            if not stored and not isinstance(e, BlockRemoved):
                continue
            agreed = []
            for key in e.block_hashes:
                ident = (stored, e.medium, key)
                n = self._counts.pop(ident, 0) + 1
                if n == self.world_size:
                    agreed.append(key)
                else:
                    self._counts[ident] = n  # re-inserted: the newest entry
            if agreed and stored:
                out.append(
                    BlockStored(
                        block_hashes=agreed,
                        parent_block_hash=None,
                        token_ids=[],
                        block_size=e.block_size,
                        lora_id=None,
                        medium=e.medium,
                        lora_name=None,
                    )
                )
            elif agreed:
                out.append(BlockRemoved(block_hashes=agreed, medium=e.medium))
        while len(self._counts) > self.capacity:
            del self._counts[next(iter(self._counts))]
            self.dropped += 1
        return out
