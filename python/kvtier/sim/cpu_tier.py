"""The simulated CPU tier: csrc/engine/cpu_tier + csrc/index/chunk_index decision for decision
(entries, pins, eviction, admission and write-back to the disk tier, promotion, prefetch, puts).

Timing: the simulator advances tier state one request at a time (begin, commit, release). The
engine's write-backs are asynchronous; the simulator finishes them all before the next call into
the tier. Within a call, an operation that must wait for write-backs to get a block follows the
engine's WaitForBlock loop step for step (retry; start the staged write-backs; give up if none
is in flight; wait one poll; retry), and ``writebacks_per_wait`` of them (oldest first) end per
poll, as many as the disk finishes in the engine's 200 us sleep. With ``deterministic_writeback``
it mirrors the engine's mode of that name exactly: the same loop, every poll ends all of them,
and a promotion's write-backs end before its reads. Those an operation waited for are counted
(``critical_writebacks``): the cost model puts them on that request's critical path.

With ``disk_write_through`` (the engine's ``disk.write_through``) a chunk the admission rule
admits is written to disk when it lands in the pool (a store, a put, or a hit or repeated store
that brings its count to the rule) and ends before the next call, as write-backs do; its eviction then finds it on disk
and frees its block at once (counted as not admitted, as the engine's index counts it). A chunk
is written through at most once while it is in the pool: one the disk evicted since is written
back at its eviction from the pool (if admitted), not again on each hit.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from kvtier.sim.cpu_orders import make_cpu_order
from kvtier.sim.disk_tier import SimDisk

__all__ = ["SimCpuTier", "TierCounters"]

_WRITING, _READY, _DEMOTING, _DROPPING = 0, 1, 2, 3
_OK, _EXISTS, _EXHAUSTED = 0, 1, 2


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
    write_through_written: int = 0  # chunks written on arrival (disk_write_through)


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
        disk_write_through: the engine's ``disk.write_through`` (off with
            ``deterministic_writeback``, as in the engine; off with an admission policy, whose
            chunks are written at eviction). False by default here, as in the C++ tier's options;
            ``SimConfig`` turns it on by default, as kvtier's configuration does.
    """

    def __init__(
        self,
        capacity_chunks: int,
        *,
        eviction_policy: str = "lru",
        disk_slots: int = 0,
        disk_admit_min_seen: int = 2,
        admission_policy=None,
        max_demotions_in_flight: int = 64,
        writebacks_per_wait: int = 1,
        deterministic_writeback: bool = False,
        disk_write_through: bool = False,
    ) -> None:
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
        self.write_through = (
            bool(disk_write_through)
            and disk_slots > 0
            and not self.deterministic_writeback
            and admission_policy is None
        )
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
                if self.write_through and victim in self.disk:
                    c.demotions_not_admitted += 1  # written through: the block frees at once
                elif not (self.admission_policy is not None or e[2] >= self.admit_min_seen):
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
        entries[key] = [_WRITING, 0, 1, False]  # state, readers, seen, written through once
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

    def _write_through(self, keys) -> None:
        """The engine's write-through thread for ``keys`` (READY, admitted, not on disk, not
        written through before while in the tier): each is written, and ends with the call (as
        write-backs end before the next one)."""
        if not self.write_through:
            return
        entries, disk, c = self._entries, self.disk, self.counters
        for k in keys:
            e = entries.get(k)
            if e is None or k in disk or e[0] != _READY or e[2] < self.admit_min_seen or e[3]:
                continue
            e[3] = True
            if disk.begin_write(k):
                disk.complete_write(k)
                c.disk_writes += 1
                c.write_through_written += 1

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
        fresh, seen_again = [], []
        n = len(keys)
        for i, k in enumerate(keys):
            r = self._begin_insert(k)
            if r == _EXHAUSTED and self.disk is not None:
                r = self._wait_for_block(k)
            if r == _EXISTS:
                c.chunks_already_cached += 1
                seen_again.append(k)  # a sighting: may have reached the admission count
                continue
            if r == _EXHAUSTED:
                c.chunks_skipped_full += n - i
                break
            fresh.append(k)
        self._pump()
        self._write_through(seen_again)
        for k in fresh:
            self._commit(k)
        c.chunks_stored += len(fresh)
        self._write_through(fresh)
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
        self._write_through((key,))
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
        self._write_through(keys[:hits])  # a hit may have brought a chunk to the rule
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
