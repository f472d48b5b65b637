"""The simulated tiers: a GPU pool, a CPU tier and a disk tier with the engine's exact semantics.

Each class mirrors one engine component decision for decision, on integer chunk ids instead of
16-byte keys and without moving bytes:

- :class:`SimDisk` -- csrc/storage/disk_store: fixed slots, LRU among READY slots; a write takes
  its slot when submitted (evicting the least recently used READY one) and becomes READY, most
  recent, when it completes; a read refreshes recency.
- :class:`SimCpuTier` -- csrc/engine/cpu_tier + csrc/index/chunk_index: blocks, WRITING / READY /
  DEMOTING / DROPPING entries, reader pins, the ``seen`` counter, the eviction order (a Python
  mirror of the C++ built-in, kvtier.sim.cpu_orders), write-back to disk of evicted chunks the
  admission rule (``seen >= disk_admit_min_seen``, or a Python AdmissionPolicy) accepts, the
  write-back bound, promotion of disk chunks on load, prefetch, peer puts.
- :class:`SimGpuPool` -- python/kvtier/pool.py's PagedKVPool: pages, chunks shared by reference,
  LRU (or a Python EvictionPolicy) among unreferenced chunks, offload of victims to the CPU tier
  in one store, the load planner, write-through, pulls from peers (:class:`SimPeers`).

Timing: the simulator advances tier state one request at a time (begin, commit, release). The
engine's write-backs are asynchronous; the simulator finishes them all before the next call into
the tier. Within a call, an operation that must wait for write-backs to get a block follows the
engine's WaitForBlock loop step for step (retry; start the staged write-backs; give up if none
is in flight; wait one poll; retry), and ``writebacks_per_wait`` of them (oldest first) end per
poll, as many as the disk finishes in the engine's 200 us sleep. With ``deterministic_writeback``
it mirrors the engine's mode of that name exactly: the same loop, every poll ends all of them,
and a promotion's write-backs end before its reads. Those an operation waited for are counted
(``critical_writebacks``): the cost model puts them on that request's critical path.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from kvtier.sim.cpu_orders import make_cpu_order

__all__ = ["BeginResult", "SimCpuTier", "SimDisk", "SimGpuPool", "SimPeers", "TierCounters"]

_WRITING, _READY, _DEMOTING, _DROPPING = 0, 1, 2, 3
_OK, _EXISTS, _EXHAUSTED = 0, 1, 2


class SimDisk:
    """The disk tier: ``slots`` chunk slots, LRU among READY slots (DiskStore).

    A write takes its slot when submitted (evicting the least recently used READY slot if none is
    free) and becomes READY -- visible, most recently used -- when it completes; a read
    refreshes recency when submitted."""

    def __init__(self, slots: int) -> None:
        if slots <= 0:
            raise ValueError(f"disk slots must be positive, got {slots}")
        self.slots = slots
        self._lru: OrderedDict = OrderedDict()  # READY slots, first = least recently used
        self._writing: set = set()
        self.writes = 0
        self.reads = 0
        self.evictions = 0
        self.writes_rejected_busy = 0

    def __contains__(self, key) -> bool:
        return key in self._lru

    def __len__(self) -> int:
        return len(self._lru)

    def begin_write(self, key) -> bool:
        """Submit a write of ``key``; False if it is on disk or being written (AlreadyExists) or
        every slot is being written (ResourceExhausted)."""
        lru = self._lru
        if key in lru or key in self._writing:
            return False
        if len(lru) + len(self._writing) >= self.slots:
            if not lru:
                self.writes_rejected_busy += 1
                return False
            lru.popitem(last=False)
            self.evictions += 1
        self._writing.add(key)
        return True

    def complete_write(self, key) -> None:
        """The write of ``key`` ended: it is READY and most recently used."""
        self._writing.discard(key)
        self._lru[key] = None
        self.writes += 1

    def write(self, key) -> bool:
        """Submit and complete a write at once."""
        if not self.begin_write(key):
            return False
        self.complete_write(key)
        return True

    def read(self, key) -> bool:
        """Read ``key`` (refreshing its recency); False if it is not READY on disk."""
        if key not in self._lru:
            return False
        self._lru.move_to_end(key)
        self.reads += 1
        return True


@dataclass
class TierCounters:
    """What a CPU tier did (the engine's CpuTierStats, in chunks)."""

    store_calls: int = 0
    chunks_stored: int = 0
    chunks_already_cached: int = 0
    chunks_skipped_full: int = 0
    chunks_loaded: int = 0
    chunks_promoted: int = 0
    promotion_failures: int = 0
    chunks_prefetched: int = 0
    evictions: int = 0
    demotions: int = 0
    demotions_written: int = 0  # reached the disk (or were there already)
    disk_writes: int = 0  # actually written (SSD write volume)
    demotions_rejected: int = 0  # staged for an admission hook that said no
    demotions_not_admitted: int = 0  # dropped by the built-in rule
    insert_rejected: int = 0
    backpressure_waits: int = 0  # an operation waited for write-backs to get a block
    critical_writebacks: int = 0  # write-backs some operation had to wait for


class SimCpuTier:
    """The CPU tier (pinned pool) and, optionally, the disk tier below it.

    Args:
        capacity_chunks: blocks in the pool (floor(cpu_bytes / block_bytes) in the engine).
        eviction_policy: "lru", "s3fifo" or "lfu" (the C++ built-in the engine would use).
        disk_slots: slots of the disk tier (0: no disk tier).
        disk_admit_min_seen: the built-in admission rule.
        admission_policy: optional kvtier.policies.AdmissionPolicy (replaces the rule; as in the
            engine, every evicted chunk is then staged and the policy decides per batch).
        max_demotions_in_flight: the write-back bound (64 in the engine).
        writebacks_per_wait: how many write-backs end while an operation that needs a block waits
            once (the engine polls every 200 us: about ``200e-6 * disk write bandwidth / slot
            bytes``, at least 1). Small chunks on a fast disk: many; 32 MiB chunks: one.
        deterministic_writeback: the engine's mode of that name (CacheConfig): each poll of a
            wait for write-backs ends all of them (``writebacks_per_wait`` is then unused), and a
            promotion's write-backs end before its disk reads start.
    """

    def __init__(self, capacity_chunks: int, *, eviction_policy: str = "lru", disk_slots: int = 0,
                 disk_admit_min_seen: int = 2, admission_policy=None, max_demotions_in_flight: int = 64,
                 writebacks_per_wait: int = 1, deterministic_writeback: bool = False) -> None:
        if capacity_chunks <= 0:
            raise ValueError(f"CPU tier capacity must be at least one chunk, got {capacity_chunks}")
        self.capacity = capacity_chunks
        self.policy = make_cpu_order(eviction_policy)
        self.disk = SimDisk(disk_slots) if disk_slots else None
        self.admit_min_seen = disk_admit_min_seen
        self.admission_policy = admission_policy
        self.max_demotions = max(1, max_demotions_in_flight)
        self.writebacks_per_wait = max(1, writebacks_per_wait)
        self.deterministic_writeback = bool(deterministic_writeback)
        # key -> [state, pins, seen]
        self._entries: dict = {}
        self._demoting = 0
        self._new_demotions: list = []
        self._pending: deque = deque()  # write-backs submitted, not yet completed (oldest first)
        self.counters = TierCounters()

    # -- the index (ChunkIndex) ---------------------------------------------------------------
    def _evictable(self, key) -> bool:
        return self._entries[key][1] == 0

    def _evict_one(self) -> bool:
        """EvictOneLocked: free one block, demoting admitted victims on the way."""
        entries, policy, c = self._entries, self.policy, self.counters
        has_disk = self.disk is not None
        while True:
            if has_disk and self._demoting >= self.max_demotions:
                return False  # backpressure: wait for write-backs
            victim = policy.pick_victim(self._evictable)
            if victim is None:
                return False
            policy.on_remove(victim)
            e = entries[victim]
            if has_disk:
                if not (self.admission_policy is not None or e[2] >= self.admit_min_seen):
                    c.demotions_not_admitted += 1
                else:
                    e[0] = _DEMOTING
                    self._demoting += 1
                    c.demotions += 1
                    self._new_demotions.append((victim, e[2]))
                    continue
            del entries[victim]
            c.evictions += 1
            return True

    def _begin_insert(self, key) -> int:
        entries = self._entries
        e = entries.get(key)
        if e is not None:
            e[2] += 1  # another request carried this chunk: it counts for admission
            return _EXISTS
        while len(entries) >= self.capacity:
            if not self._evict_one():
                self.counters.insert_rejected += 1
                return _EXHAUSTED
        entries[key] = [_WRITING, 0, 1]
        return _OK

    def _wait_for_block(self, key) -> int:
        """WaitForBlock, step for step: retry; while that fails, start the staged write-backs
        (PumpDemotions: the retries may have staged more), return a last retry if none is in
        flight, else wait one poll and retry. A poll ends ``writebacks_per_wait`` write-backs,
        oldest first (the engine's 200 us sleep); in deterministic mode it ends all of them."""
        self.counters.backpressure_waits += 1
        pending = self._pending
        r = self._begin_insert(key)
        while r == _EXHAUSTED:
            self._pump()
            if not pending:
                return self._begin_insert(key)  # nothing in flight frees a block
            n = len(pending)
            if not self.deterministic_writeback:
                n = min(n, self.writebacks_per_wait)
            for _ in range(n):
                self._complete_one(critical=True)
            r = self._begin_insert(key)
        return r

    def _commit(self, key) -> None:
        self._entries[key][0] = _READY
        self.policy.on_insert(key)

    def _finish_demotion(self, key) -> None:
        e = self._entries[key]
        self._demoting -= 1
        if e[1]:
            e[0] = _DROPPING  # readers hold the block: freed at their release
        else:
            del self._entries[key]
            self.counters.evictions += 1

    def _complete_one(self, critical: bool) -> None:
        k = self._pending.popleft()
        self.disk.complete_write(k)
        self._finish_demotion(k)
        if critical:
            self.counters.critical_writebacks += 1

    def _complete_all(self) -> None:
        while self._pending:
            self._complete_one(False)

    def _pump(self) -> None:
        """PumpDemotions: submit the staged write-backs (admission hook first). Rejected ones
        and chunks already on disk give their block back at once; the others when written."""
        if not self._new_demotions:
            return
        batch, self._new_demotions = self._new_demotions, []
        c, disk = self.counters, self.disk
        if self.admission_policy is not None:
            verdict = list(self.admission_policy.admit([k for k, _ in batch], [s for _, s in batch]))
            admit = [i < len(verdict) and bool(verdict[i]) for i in range(len(batch))]
        else:
            admit = [True] * len(batch)
        for (k, _seen), ok in zip(batch, admit):
            if not ok:
                c.demotions_rejected += 1
            else:
                c.demotions_written += 1
                if disk.begin_write(k):
                    c.disk_writes += 1
                    self._pending.append(k)
                    continue
            self._finish_demotion(k)

    def _acquire(self, keys, start: int, end: int) -> int:
        """Pin the leading visible keys of keys[start:end]; hits refresh the order tail first."""
        entries = self._entries
        i = start
        ready = []
        while i < end:
            e = entries.get(keys[i])
            if e is None or not (e[0] == _READY or e[0] == _DEMOTING):
                break
            e[1] += 1
            e[2] += 1
            ready.append(e[0] == _READY)
            i += 1
        on_access = self.policy.on_access
        for j in range(i - 1, start - 1, -1):
            if ready[j - start]:
                on_access(keys[j])
        return i - start

    def _release(self, keys, n: int) -> None:
        entries = self._entries
        for j in range(n):
            k = keys[j]
            e = entries[k]
            e[1] -= 1
            if e[1] == 0 and e[0] == _DROPPING:
                del entries[k]
                self.counters.evictions += 1

    def contains(self, key) -> bool:
        """READY or DEMOTING in the pool."""
        e = self._entries.get(key)
        return e is not None and (e[0] == _READY or e[0] == _DEMOTING)

    # -- the tier (CpuTier) -----------------------------------------------------------------------
    def new_call(self) -> None:
        """Between calls every write-back has ended (the engine's writes are asynchronous; the
        simulator lets them finish before the next call)."""
        self._complete_all()

    def drain(self) -> None:
        """Finish every write-back (CpuTier.drain)."""
        self._complete_all()

    def store(self, keys) -> int:
        """Store: reserve a block for each key not cached (stop at the first that gets none),
        then commit them all. Returns the number of chunks newly stored."""
        self.new_call()
        c = self.counters
        c.store_calls += 1
        fresh = []
        n = len(keys)
        for i, k in enumerate(keys):
            r = self._begin_insert(k)
            if r == _EXHAUSTED and self.disk is not None:
                r = self._wait_for_block(k)
            if r == _EXISTS:
                c.chunks_already_cached += 1
                continue
            if r == _EXHAUSTED:
                c.chunks_skipped_full += n - i
                break
            fresh.append(k)
        self._pump()
        for k in fresh:
            self._commit(k)
        c.chunks_stored += len(fresh)
        return len(fresh)

    def put(self, key) -> bool:
        """BeginPut + CommitPut (a chunk pulled from a peer). False if cached already or no block."""
        self._complete_all()
        r = self._begin_insert(key)
        self._pump()
        if r != _OK:
            return False
        self._commit(key)
        self.counters.chunks_stored += 1
        return True

    def lookup(self, keys, start: int = 0) -> int:
        """Leading chunks of keys[start:] in the pool or (interleaved) on disk."""
        self._complete_all()
        entries, disk = self._entries, self.disk
        i, n = start, len(keys)
        while i < n:
            e = entries.get(keys[i])
            if e is not None and (e[0] == _READY or e[0] == _DEMOTING):
                i += 1
                continue
            if disk is None or keys[i] not in disk:
                break
            i += 1
        return i - start

    def lookup_tiers(self, keys) -> list[str]:
        """Where each leading chunk is: "cpu" or "disk"."""
        self._complete_all()
        out = []
        for k in keys:
            if self.contains(k):
                out.append("cpu")
            elif self.disk is not None and k in self.disk:
                out.append("disk")
            else:
                break
        return out

    def load(self, keys) -> tuple[int, int]:
        """Load the leading cached chunks of ``keys`` (promoting disk-only ones into the pool).

        Returns (chunks loaded, of which promoted from disk)."""
        self.new_call()
        wanted = len(keys)
        hits = self._acquire(keys, 0, wanted)
        promoted = 0
        disk = self.disk
        while disk is not None and hits < wanted:
            run = 0
            while hits + run < wanted:
                k = keys[hits + run]
                if self.contains(k) or k not in disk:
                    break
                run += 1
            if run == 0:
                break
            promoted += self._promote(keys, hits, run)
            got = self._acquire(keys, hits, wanted)
            if got == 0:
                break
            hits += got
        self._release(keys, hits)
        self.counters.chunks_loaded += hits
        return hits, promoted

    def _promote(self, keys, start: int, n: int) -> int:
        """PromoteFromDisk: reserve blocks, read, commit; returns the leading chunks that arrived."""
        c = self.counters
        reserved = []
        for i in range(start, start + n):
            r = self._begin_insert(keys[i])
            if r == _EXHAUSTED:
                r = self._wait_for_block(keys[i])
            if r != _OK:
                break
            reserved.append(keys[i])
        self._pump()
        if self.deterministic_writeback:  # the engine waits for them before it reads
            while self._pending:
                self._complete_one(critical=True)
        ok = 0
        failed = False
        for k in reserved:
            if self.disk.read(k):  # evicted from disk by the write-backs just made: a miss
                self._commit(k)
                c.chunks_promoted += 1
                if not failed:
                    ok += 1
            else:
                del self._entries[k]
                c.promotion_failures += 1
                failed = True
        self._complete_all()  # write-backs submitted before the reads end while they run
        return ok

    def prefetch(self, keys) -> int:
        """Prefetch: reserve blocks for the leading disk-only chunks of ``keys``, then read them."""
        if self.disk is None:
            return 0
        self.new_call()
        reserved = []
        for k in keys:
            e = self._entries.get(k)
            if e is not None and e[0] in (_READY, _DEMOTING, _WRITING):
                continue
            if k not in self.disk:
                break
            r = self._begin_insert(k)
            if r == _EXHAUSTED:
                r = self._wait_for_block(k)
            if r != _OK:
                break
            reserved.append(k)
        self._pump()
        if self.deterministic_writeback:  # the engine waits for them before it reads
            while self._pending:
                self._complete_one(critical=True)
        started = 0
        for k in reserved:
            if self.disk.read(k):
                self._commit(k)
                self.counters.chunks_prefetched += 1
                started += 1
            else:  # evicted from disk by the write-backs just made
                del self._entries[k]
                self.counters.promotion_failures += 1
        return started

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class _Chunk:
    """One GPU-resident chunk (pool.py's _GpuChunk)."""

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
    written_through: int = 0  # committed chunks stored in the CPU tier at once (write_through)
    planned_recompute: int = 0
    offloaded: int = 0  # GPU victims stored into the CPU tier by this request
    evicted: int = 0  # GPU victims
    critical_writebacks: int = 0  # write-backs this request waited for
    load_writebacks: int = 0  # of critical_writebacks, those its load waited for (not the eviction)
    load_disk_writes: int = 0  # write-backs its load started (waited for or not): they share the disk with its reads
    split_head: int = 0  # a split plan: lower-tier chunks recomputed while the lower_hits after them load
    rejected: bool = False  # the pool could not hold the request
    chunks: list = field(default_factory=list, repr=False)  # the request's referenced chunks
    pages: int = 0  # pages the request holds (shared hits included)


class SimPeers:
    """Peers of one instance (kvtier.p2p as PagedKVPool uses it): the other instances' CPU tiers
    (and disks, with ``serve_disk``, as `kvtier peer` nodes serve theirs).

    ``lookup`` counts the leading chunks some peer holds (any peer per chunk, as the engine's
    plan assembles confirmations from several); ``pull`` puts them into the local CPU tier
    (BeginPut / CommitPut), each read from the first peer that holds it (a hit there)."""

    def __init__(self, local: SimCpuTier, others: list, serve_disk: bool = False) -> None:
        self.local = local
        self.others = [o for o in others if o is not None and o is not local]
        self.serve_disk = serve_disk
        self.chunks_pulled = 0

    def _source(self, key):
        for o in self.others:
            if o.deterministic_writeback:
                o.new_call()  # the peer's tier waits for its write-backs before it answers
            if o.contains(key):
                return o
            if self.serve_disk and o.disk is not None and key in o.disk:
                return o
        return None

    def lookup(self, keys, start: int) -> int:
        """Leading chunks of keys[start:] that some peer holds."""
        n = start
        while n < len(keys) and self._source(keys[n]) is not None:
            n += 1
        return n - start

    def pull(self, keys, start: int, n: int) -> int:
        """Pull keys[start:start+n] into the local CPU tier; returns how many landed."""
        pulled = 0
        for i in range(start, start + n):
            src = self._source(keys[i])
            if src is None:
                break
            if src.contains(keys[i]):
                src._acquire(keys, i, i + 1)
                src._release(keys[i:i + 1], 1)
            else:
                src.disk.read(keys[i])
            if not self.local.put(keys[i]) and not self.local.contains(keys[i]):
                break  # no block for it (a chunk that arrived meanwhile counts as landed)
            pulled += 1
        self.chunks_pulled += pulled
        return pulled


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

    def __init__(self, num_pages: int, *, page_tokens: int, chunk_tokens: int, cpu: SimCpuTier | None = None,
                 eviction_policy=None, planner=None, chunk_bytes: int = 0, write_through: bool = False,
                 peers=None) -> None:
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

    def cached_chunks(self) -> int:
        """Chunks registered in GPU pages."""
        return len(self._chunks)

    def _evict(self, pages_needed: int, res: BeginResult) -> None:
        chunks = self._chunks
        ppc = self.ppc
        victims: list[_Chunk] = []
        if self.eviction_policy is None:
            freed = 0
            for c in chunks.values():
                if freed >= pages_needed:
                    break
                if c.refs == 0:
                    victims.append(c)
                    freed += ppc
        else:
            from kvtier.policies import ChunkInfo

            candidates = [c for c in chunks.values() if c.refs == 0]
            by_key = {c.key: c for c in candidates}
            chosen = self.eviction_policy.choose_victims(
                [ChunkInfo(c.key, ppc, c.last_use, c.uses) for c in candidates], pages_needed)
            freed, taken = 0, set()
            for k in chosen:
                c = by_key.get(k)
                if c is None or k in taken or freed >= pages_needed:
                    continue
                taken.add(k)
                victims.append(c)
                freed += ppc
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
                lower += peers.lookup(keys, gpu + lower)
            if lower and self.planner is not None:
                tiers = cpu.lookup_tiers(keys[gpu:gpu + lower])
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
            writes = cpu.counters.disk_writes
            loaded, promoted = cpu.load(keys[first:first + lower])
            if peers is not None and loaded < lower:  # local chunks first, then pulls of the rest
                pulled = peers.pull(keys, first + loaded, lower - loaded)
                if pulled:
                    got, _ = cpu.load(keys[first + loaded:first + loaded + pulled])  # scattered from the pool
                    res.peer_hits = got
                    loaded += got
            res.load_writebacks = cpu.counters.critical_writebacks - before
            res.load_disk_writes = cpu.counters.disk_writes - writes
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
