"""The simulated peers of one instance: the other instances' CPU tiers (and disks) that it looks
chunks up in and pulls them from, as kvtier.p2p does for a PagedKVPool."""

from __future__ import annotations

from kvtier.sim.cpu_tier import SimCpuTier

__all__ = ["SimPeers"]


class SimPeers:
    """Peers of one instance (kvtier.p2p as PagedKVPool uses it): the other instances' CPU tiers
    (and disks, with ``serve_disk``, as `kvtier peer` nodes serve theirs).

    ``lookup`` counts the leading chunks some peer holds (any peer per chunk, as the engine's
    plan assembles confirmations from several), or the local tiers hold after all (the plan's
    LOCAL entries: a chunk the local run missed because one before it was gone). ``pull`` is
    PeerService.load after its local run: it plans the chunks (local, or the first peer that
    holds one), puts each peer's chunk into the local CPU tier (BeginPut / CommitPut; a read
    there, a hit), and loads them in prefix order as the engine's LoadFrontier does: the local
    ones ahead of the first pulled chunk at once, then each pulled chunk with the local ones
    after it as soon as it lands (each load refreshes those chunks' LRU order).

    ``same_host``: those of ``others`` on this instance's host. They are asked first (the cheaper
    path), and ``last_same_host`` says, per chunk the last ``pull`` loaded, whether it came from
    one of them, so that the cost model prices each path on its own link; ``last_pulled``, per
    chunk, whether a peer sent it (False: it was local)."""

    def __init__(self, local: SimCpuTier, others: list, serve_disk: bool = False, same_host=()) -> None:
        self.local = local
        near = {id(o) for o in same_host}
        others = [o for o in others if o is not None and o is not local]
        self.others = [o for o in others if id(o) in near] + [o for o in others if id(o) not in near]
        self._near = near
        self.serve_disk = serve_disk
        self.chunks_pulled = 0
        self.last_same_host: list[bool] = []
        self.last_pulled: list[bool] = []
        self._plan = None  # (keys, start, plan) of the last ``plan``, for the pull after it

    def _local(self, key) -> bool:
        local = self.local
        return local.contains(key) or (local.disk is not None and key in local.disk)

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
        while n < len(keys) and (self._local(keys[n]) or self._source(keys[n]) is not None):
            n += 1
        return n - start

    def _make_plan(self, keys, start: int, n: int) -> list:
        """Per leading chunk of keys[start:start+n]: None (held locally) or the peer that holds it."""
        plan = []
        for i in range(start, start + n):
            src = None
            if not self._local(keys[i]):
                src = self._source(keys[i])
                if src is None:
                    break
            plan.append(src)
        return plan

    def plan(self, keys, start: int) -> int:
        """PeerService.lookup from ``begin``: plan keys[start:] and keep the plan for a pull of
        exactly those chunks (what the engine's load takes when its local run is unchanged);
        returns its length."""
        plan = self._make_plan(keys, start, len(keys) - start)
        self._plan = (keys, start, plan) if plan else None
        return len(plan)

    def pull(self, keys, start: int, n: int) -> tuple[int, int]:
        """PeerService.load after the local run (which ends at ``start``): pull and load
        keys[start:start+n] by the kept plan when it covers exactly them (planned before the
        pool's evictions), else by a new one; returns (leading chunks loaded, of which
        promoted from the local disk)."""
        kept, self._plan = self._plan, None
        if kept is not None and kept[0] is keys and kept[1] == start and len(kept[2]) == n:
            plan = kept[2]
        else:
            plan = self._make_plan(keys, start, n)
        ready = [src is None for src in plan]
        paths = self.last_same_host = []
        from_peer = self.last_pulled = []
        sent = [False] * len(plan)
        nxt = loaded = promoted = 0
        stopped = False

        def advance() -> None:
            nonlocal nxt, loaded, promoted, stopped
            while not stopped and nxt < len(plan) and ready[nxt]:
                end = nxt
                while end < len(plan) and ready[end]:
                    end += 1
                got, more = self.local.load(keys[start + nxt : start + end])
                for j in range(nxt, nxt + got):
                    from_peer.append(sent[j])
                    paths.append(sent[j] and id(plan[j]) in self._near)
                loaded += got
                promoted += more
                stopped = got < end - nxt  # gone between plan and load: the prefix ends there
                nxt += got

        advance()
        pulled = 0
        for j, src in enumerate(plan):
            if src is None:
                continue
            key = keys[start + j]
            if src.contains(key):
                src._acquire(keys, start + j, start + j + 1)
                src._release(keys[start + j : start + j + 1], 1)
            elif self.serve_disk and src.disk is not None and key in src.disk:
                src.disk.read(key)
            else:
                continue  # gone from the peer since the plan: a miss there, the load stops
            if self.local.put(key):
                sent[j] = True
                pulled += 1
            elif not self.local.contains(key):
                continue  # no block for it: the load stops there, later pulls still land
            ready[j] = True  # landed (or arrived meanwhile: a local chunk)
            advance()
        self.chunks_pulled += pulled
        return loaded, promoted
