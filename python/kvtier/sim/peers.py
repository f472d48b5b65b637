"""The simulated peers of one instance: the other instances' CPU tiers (and disks) that it looks
chunks up in and pulls them from, as kvtier.p2p does for a PagedKVPool."""

from __future__ import annotations

from kvtier.sim.cpu_tier import SimCpuTier

__all__ = ["SimPeers"]


class SimPeers:
    """Peers of one instance (kvtier.p2p as PagedKVPool uses it): the other instances' CPU tiers
    (and disks, with ``serve_disk``, as `kvtier peer` nodes serve theirs).

    ``lookup`` counts the leading chunks some peer holds (any peer per chunk, as the engine's
    plan assembles confirmations from several); ``pull`` puts them into the local CPU tier
    (BeginPut / CommitPut), each read from the first peer that holds it (a hit there).

    ``same_host``: those of ``others`` on this instance's host. They are asked first (the cheaper
    path), and ``last_same_host`` says, per chunk the last ``pull`` landed, whether it came from
    one of them, so that the cost model prices each path on its own link."""

    def __init__(self, local: SimCpuTier, others: list, serve_disk: bool = False, same_host=()) -> None:
        self.local = local
        near = {id(o) for o in same_host}
        others = [o for o in others if o is not None and o is not local]
        self.others = [o for o in others if id(o) in near] + [o for o in others if id(o) not in near]
        self._near = near
        self.serve_disk = serve_disk
        self.chunks_pulled = 0
        self.last_same_host: list[bool] = []

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
        paths = self.last_same_host = []
        for i in range(start, start + n):
            src = self._source(keys[i])
            if src is None:
                break
            if src.contains(keys[i]):
                src._acquire(keys, i, i + 1)
                src._release(keys[i : i + 1], 1)
            else:
                src.disk.read(keys[i])
            if not self.local.put(keys[i]) and not self.local.contains(keys[i]):
                break  # no block for it (a chunk that arrived meanwhile counts as landed)
            paths.append(id(src) in self._near)
            pulled += 1
        self.chunks_pulled += pulled
        return pulled
