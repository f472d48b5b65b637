"""The simulated GPU tier: python/kvtier/pool.py's PagedKVPool (pages, shared chunks, eviction
with offload to the CPU tier, the load planner, write-through, pulls from peers) on chunk ids."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

from kvtier.policies import pick_victims
from kvtier.sim.cpu_tier import SimCpuTier

__all__ = ["BeginResult", "SimGpuPool"]


@dataclass
class _Chunk:
    """One GPU-resident chunk (kvtier.sequence.GpuChunk)."""

    key: object
    refs: int = 0
    last_use: int = 0
    uses: int = 1


@dataclass
class BeginResult:
    """What ``SimGpuPool.begin`` found for one request (in chunks)."""

    gpu_hits: int = 0
    lower_hits: int = 0  # loaded from the CPU tier or the disk tier
    disk_hits: int = 0  # of lower_hits, promoted from disk
    peer_hits: int = 0  # of lower_hits, pulled from peers
    peer_same_host: int = 0  # of peer_hits, pulled from peers on this instance's host
    written_through: int = 0  # committed chunks stored in the CPU tier at once (write_through)
    planned_recompute: int = 0
    offloaded: int = 0  # GPU victims stored into the CPU tier by this request
    evicted: int = 0  # GPU victims
    critical_writebacks: int = 0  # write-backs this request waited for
    load_writebacks: int = 0  # of critical_writebacks, those its load waited for (not the eviction)
    load_disk_writes: int = 0  # write-backs its load started (waited for or not): they share the disk with its reads
    split_head: int = 0  # a split plan: lower-tier chunks recomputed while the lower_hits after them load
    disk_wait_s: float = 0.0  # its first disk operation waited this long for earlier background writes
    rejected: bool = False  # the pool could not hold the request
    chunks: list = field(default_factory=list, repr=False)  # the request's referenced chunks
    pages: int = 0  # pages the request holds (shared hits included)


class _PlannerPool:
    """What a kvtier.planner.LoadPlanner reads of a pool: chunk_tokens and layout.chunk_bytes."""

    class _Layout:
        def __init__(self, chunk_bytes: int) -> None:
            self.chunk_bytes = chunk_bytes

    def __init__(self, chunk_tokens: int, chunk_bytes: int, sim_pool) -> None:
        self.chunk_tokens = chunk_tokens
        self.layout = self._Layout(chunk_bytes)
        self.sim_pool = sim_pool


class SimGpuPool:
    """The GPU tier (PagedKVPool) over an optional :class:`SimCpuTier`.

    Args:
        num_pages: pages in the pool; pages_per_chunk: chunk_tokens // page_tokens.
        page_tokens, chunk_tokens: as the pool's.
        cpu: the tier below (None: GPU only; victims are dropped).
        eviction_policy: optional kvtier.policies.EvictionPolicy (default: LRU, built in).
        planner: optional kvtier.planner.LoadPlanner (called with a pool-like object that has
            ``chunk_tokens`` and ``layout.chunk_bytes``; tiers "cpu", "disk" or "peer"). One
            with ``plan_split`` (kvtier.planner.SplitCostModelPlanner) is asked that instead, as
            the pool does: the first ``head`` lower-tier chunks are recomputed while the ``load``
            after them load (``BeginResult.split_head``), and commit registers the head too.
        chunk_bytes: bytes of one chunk (for the planner).
        write_through: store each committed chunk in the CPU tier at once (the pool's option).
        peers: optional :class:`SimPeers`: ``begin`` then also finds and pulls chunks the local
            tiers lack, after the local CPU / disk hits (PagedKVPool with ``peers=``).
    """

    def __init__(
        self,
        num_pages: int,
        *,
        page_tokens: int,
        chunk_tokens: int,
        cpu: SimCpuTier | None = None,
        eviction_policy=None,
        planner=None,
        chunk_bytes: int = 0,
        write_through: bool = False,
        peers=None,
    ) -> None:
        if num_pages <= 0:
            raise ValueError(f"GPU pool pages must be positive, got {num_pages}")
        if chunk_tokens % page_tokens:
            raise ValueError(f"chunk_tokens={chunk_tokens} must be a multiple of page_tokens={page_tokens}")
        self.num_pages = num_pages
        self.page_tokens = page_tokens
        self.chunk_tokens = chunk_tokens
        self.ppc = chunk_tokens // page_tokens
        self.cpu = cpu
        self.eviction_policy = eviction_policy
        self.planner = planner
        self.write_through = bool(write_through) and cpu is not None
        self.peers = peers if cpu is not None else None
        self._planner_view = _PlannerPool(chunk_tokens, chunk_bytes, self)
        self._chunks: OrderedDict = OrderedDict()  # key -> _Chunk; order of unreferenced use
        self._free = num_pages
        self._clock = 0
        self.gpu_hit_chunks = 0
        self.lower_hit_chunks = 0
        self.evicted_chunks = 0
        self.offloaded_chunks = 0
        self.rejected_requests = 0

    def __contains__(self, key) -> bool:
        return key in self._chunks

    def leading_hits(self, keys) -> int:
        """How many leading ``keys`` this pool holds, without touching any state."""
        chunks, n = self._chunks, 0
        while n < len(keys) and keys[n] in chunks:
            n += 1
        return n

    def cached_chunks(self) -> int:
        """Chunks registered in GPU pages."""
        return len(self._chunks)

    def _evict(self, pages_needed: int, res: BeginResult) -> None:
        chunks = self._chunks
        ppc = self.ppc
        victims = pick_victims(
            (c for c in chunks.values() if c.refs == 0), pages_needed, lambda _c: ppc, self.eviction_policy
        )
        if not victims:
            return
        if self.cpu is not None:
            cpu = self.cpu
            before = cpu.counters.critical_writebacks
            n = cpu.store([c.key for c in victims])
            res.critical_writebacks += cpu.counters.critical_writebacks - before
            self.offloaded_chunks += n
            res.offloaded += n
        for c in victims:
            del chunks[c.key]
        self._free += len(victims) * ppc
        self.evicted_chunks += len(victims)
        res.evicted += len(victims)

    def begin(self, keys, num_tokens: int) -> BeginResult:
        """Map the longest cached prefix of a request (full-chunk ``keys``, ``num_tokens`` tokens)
        and give it pages; returns what came from where. Follow with :meth:`finish`."""
        res = BeginResult()
        chunks = self._chunks
        seq = res.chunks
        for k in keys:  # GPU hits: shared pages
            c = chunks.get(k)
            if c is None:
                break
            c.refs += 1
            c.uses += 1
            self._clock += 1
            c.last_use = self._clock
            chunks.move_to_end(k)
            seq.append(c)
        gpu = len(seq)
        lower = split_head = 0
        cpu = self.cpu
        peers = self.peers
        if cpu is not None and gpu < len(keys):
            lower = cpu.lookup(keys, gpu)
            if peers is not None and gpu + lower < len(keys):  # digests, then confirm
                lower += peers.plan(keys, gpu + lower)
            if lower and self.planner is not None:
                tiers = cpu.lookup_tiers(keys[gpu : gpu + lower])
                tiers += ["peer"] * (lower - len(tiers))  # the rest: held by peers
                split = getattr(self.planner, "plan_split", None)
                if split is not None:  # recompute a head while the tail after it loads
                    head, keep = (int(x) for x in split(self._planner_view, gpu, tiers))
                    head = max(0, min(lower, head))
                    keep = max(0, min(lower - head, keep))
                else:
                    head = 0
                    keep = max(0, min(lower, int(self.planner.plan(self._planner_view, gpu, tiers))))
                res.planned_recompute = lower - keep
                lower = keep
                if lower and head:  # a split plan: the load starts after the head
                    split_head = head
        need = math.ceil(num_tokens / self.page_tokens) - gpu * self.ppc
        if need > self._free:
            self._evict(need - self._free, res)
        if need > self._free:
            self._drop_refs(seq)
            res.rejected = True
            res.gpu_hits = gpu
            self.rejected_requests += 1
            seq.clear()
            return res
        self._free -= need
        res.split_head = split_head
        loaded = promoted = 0
        if lower:
            # A split plan's tail (after the head) loads on the pool's background thread, between
            # begin and finish_tail, when nothing else calls into the tiers: the same order.
            first = gpu + res.split_head
            before = cpu.counters.critical_writebacks
            # Write-through writes start once the load's chunks are in place (the engine queues
            # them at its completion): they do not share the disk with this load's reads.
            writes = cpu.counters.disk_writes - cpu.counters.write_through_written
            loaded, promoted = cpu.load(keys[first : first + lower])
            if peers is not None and loaded < lower:  # local chunks first, then pulls of the rest
                got, more = peers.pull(keys, first + loaded, lower - loaded)  # scattered as they land
                res.peer_hits = sum(peers.last_pulled)
                res.peer_same_host = sum(peers.last_same_host)
                loaded += got
                promoted += more
            res.load_writebacks = cpu.counters.critical_writebacks - before
            res.load_disk_writes = cpu.counters.disk_writes - cpu.counters.write_through_written - writes
            res.critical_writebacks += res.load_writebacks
            for i in range(loaded):  # _register_loaded (a split's tail: at finish_tail, before commit)
                k = keys[first + i]
                if k in chunks:
                    continue
                c = _Chunk(k, refs=1, last_use=0)
                chunks[k] = c
                seq.append(c)
        res.gpu_hits, res.lower_hits, res.disk_hits = gpu, loaded, promoted
        self.gpu_hit_chunks += gpu
        self.lower_hit_chunks += loaded
        res.pages = need + gpu * self.ppc
        return res

    def finish(self, res: BeginResult, keys) -> int:
        """commit (register the request's new full chunks) then release. Returns chunks added."""
        if res.rejected:
            return 0
        chunks, seq = self._chunks, res.chunks
        added = 0
        have = {id(c) for c in seq}
        # After a split plan the head, computed before the loaded tail, is registered too.
        for i in range(0 if res.split_head else len(seq), len(keys)):
            k = keys[i]
            existing = chunks.get(k)
            if existing is not None:
                if id(existing) in have:
                    continue
                break  # held in other pages: ours stay private
            self._clock += 1
            c = _Chunk(k, refs=1, last_use=self._clock)
            chunks[k] = c
            seq.append(c)
            added += 1
        if added and self.write_through:
            before = self.cpu.counters.critical_writebacks
            res.written_through = self.cpu.store([c.key for c in seq[-added:]])
            res.critical_writebacks += self.cpu.counters.critical_writebacks - before
        # release: registered chunks keep their pages, the others go back
        self._free += res.pages - len(seq) * self.ppc
        self._drop_refs(seq)
        return added

    def allocate_pages(self, n: int) -> BeginResult:
        """Take ``n`` pages outside any request (pool._allocate), evicting as needed."""
        res = BeginResult()
        if n > self._free:
            self._evict(n - self._free, res)
        if n > self._free:
            raise ValueError(f"the pool needs {n} pages but only {self._free} can be freed")
        self._free -= n
        return res

    def free_pages(self, n: int) -> None:
        """Give back pages taken by :meth:`allocate_pages`."""
        self._free += n

    def _drop_refs(self, seq: list[_Chunk]) -> None:
        chunks = self._chunks
        for c in seq:
            c.refs -= 1
            if c.refs == 0 and c.key in chunks:
                chunks.move_to_end(c.key)
