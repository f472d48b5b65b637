"""Python mirrors of the CPU tier's C++ eviction orders (csrc/index: lru, s3fifo, lfu).

The engine's CPU tier picks its victims in C++ (a Python call per eviction would run under the
index lock); the simulator needs the same order in Python. Each class here follows its C++
counterpart step by step -- same queues, same tie-breaks, same aging and ghost rules -- so that a
simulated tier evicts exactly the chunks the real one would. tests/test_sim_engine.py proves it by
replaying one trace through the real engine and through the simulator with each name.

Protocol (as csrc/index/eviction_policy.h): ``on_insert(key)`` when an entry becomes READY,
``on_access(key)`` on a hit, ``on_remove(key)`` when it leaves the policy's charge, and
``pick_victim(evictable) -> key | None``. Keys are any hashable (the simulator uses ints).
``OrderedDict`` stands for the C++ intrusive lists: its first item is the list's back (least
recent / oldest), its last item the front.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable

__all__ = ["CPU_ORDER_NAMES", "LfuOrder", "LruOrder", "S3FifoOrder", "make_cpu_order"]

CPU_ORDER_NAMES = ("lru", "s3fifo", "lfu")
Evictable = Callable[[Hashable], bool]


class LruOrder:
    """csrc/index/lru_policy.cc: one recency list; a hit moves the entry to the front."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict = OrderedDict()  # first = least recently used

    def __len__(self) -> int:
        return len(self._order)

    def on_insert(self, key) -> None:
        if key not in self._order:
            self._order[key] = None

    def on_access(self, key) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def on_remove(self, key) -> None:
        self._order.pop(key, None)

    def pick_victim(self, evictable: Evictable):
        for k in self._order:
            if evictable(k):
                return k
        return None


_SMALL, _MAIN, _GHOST = 0, 1, 2
_MAX_FREQ = 3


class _S3Node:
    __slots__ = ("freq", "ghost_seq", "queue")

    def __init__(self, queue: int) -> None:
        self.freq = 0
        self.queue = queue
        self.ghost_seq = 0


class S3FifoOrder:
    """csrc/index/s3fifo_policy.cc: small FIFO (10%), main FIFO with 2-bit counts, ghost FIFO."""

    name = "s3fifo"

    def __init__(self) -> None:
        self._nodes: dict = {}
        self._small: OrderedDict = OrderedDict()  # first = tail (next to leave)
        self._main: OrderedDict = OrderedDict()
        self._ghost_fifo: deque = deque()  # (key, ghost_seq), oldest first
        self._ghost_live = 0
        self._ghost_capacity = 1
        self._ghost_seq = 0
        self._peak = 0
        self._small_victim = False
        self._last_victim = None

    def __len__(self) -> int:
        return len(self._small) + len(self._main)

    def on_insert(self, key) -> None:
        n = self._nodes.get(key)
        if n is None:
            n = self._nodes[key] = _S3Node(_SMALL)
            self._small[key] = None
        elif n.queue == _GHOST:  # evicted unread from small, yet back: a reuse; into main
            self._ghost_live -= 1
            n.queue = _MAIN
            self._main[key] = None
        else:
            return
        n.freq = 0
        size = len(self)
        if size > self._peak:
            self._peak = size
            self._ghost_capacity = max(1, size - size // 10)

    def on_access(self, key) -> None:
        n = self._nodes.get(key)
        if n is not None and n.queue != _GHOST and n.freq < _MAX_FREQ:
            n.freq += 1

    def on_remove(self, key) -> None:
        n = self._nodes.get(key)
        if n is None or n.queue == _GHOST:
            return
        to_ghost = self._small_victim and key == self._last_victim
        self._small_victim = False
        (self._main if n.queue == _MAIN else self._small).pop(key)
        if not to_ghost:
            del self._nodes[key]
            return
        n.queue = _GHOST
        self._ghost_seq += 1
        n.ghost_seq = self._ghost_seq
        self._ghost_fifo.append((key, n.ghost_seq))
        self._ghost_live += 1
        self._trim_ghost()

    def pick_victim(self, evictable: Evictable):
        self._small_victim = False
        small_scanned = False
        if self._small and 10 * len(self._small) >= len(self):
            small_scanned = True
            v = self._evict_from_small(evictable)
            if v is not None:
                return v
        v = self._evict_from_main(evictable)
        if v is not None:
            return v
        if small_scanned or not self._small:
            return None
        v = self._evict_from_small(evictable)
        if v is not None:
            return v
        return self._evict_from_main(evictable)

    def _promote(self, key, n: _S3Node) -> None:
        del self._small[key]
        n.freq = 0
        n.queue = _MAIN
        self._main[key] = None

    def _evict_from_small(self, evictable: Evictable):
        small, nodes = self._small, self._nodes
        while small:  # fast path: the tail leaves or moves to main until a victim shows
            k = next(iter(small))
            n = nodes[k]
            if n.freq >= 1:
                self._promote(k, n)
            elif evictable(k):
                self._last_victim = k
                self._small_victim = True
                return k
            else:  # a pinned unread entry stays put and the scan goes past it
                return self._evict_from_small_past_pinned(evictable)
        return None

    def _evict_from_small_past_pinned(self, evictable: Evictable):
        for k in list(self._small):  # oldest first, as the C++ walk from back() via prev
            n = self._nodes[k]
            if n.freq >= 1:
                self._promote(k, n)
            elif evictable(k):
                self._last_victim = k
                self._small_victim = True
                return k
        return None

    def _evict_from_main(self, evictable: Evictable):
        main, nodes = self._main, self._nodes
        for _ in range((_MAX_FREQ + 1) * len(main)):
            k = next(iter(main))
            n = nodes[k]
            if n.freq > 0:
                n.freq -= 1
            elif evictable(k):
                return k
            main.move_to_end(k)
        return None

    def _trim_ghost(self) -> None:
        fifo, nodes = self._ghost_fifo, self._nodes
        while self._ghost_live > self._ghost_capacity:
            k, seq = fifo.popleft()
            n = nodes.get(k)
            if n is not None and n.queue == _GHOST and n.ghost_seq == seq:
                del nodes[k]
                self._ghost_live -= 1
        if len(fifo) > 2 * self._ghost_live + 64:  # compaction: stale slots only
            self._ghost_fifo = deque(
                (k, s) for k, s in fifo if (n := nodes.get(k)) is not None and n.queue == _GHOST and n.ghost_seq == s
            )


_MAX_COUNT = 1 << 30


class LfuOrder:
    """csrc/index/lfu_policy.cc: fewest uses first, LRU among equals, counts halved every
    max(160, 10 x tracked) events."""

    name = "lfu"

    def __init__(self) -> None:
        self._counts: list[int] = []  # ascending bucket counts
        self._buckets: dict[int, OrderedDict] = {}  # count -> keys, first = least recently used
        self._count_of: dict = {}
        self._events = 0

    def __len__(self) -> int:
        return len(self._count_of)

    def _bucket(self, count: int) -> OrderedDict:
        b = self._buckets.get(count)
        if b is None:
            b = self._buckets[count] = OrderedDict()
            self._counts.insert(bisect_left(self._counts, count), count)
        return b

    def _drop_if_empty(self, count: int) -> None:
        if not self._buckets[count]:
            del self._buckets[count]
            self._counts.pop(bisect_left(self._counts, count))

    def on_insert(self, key) -> None:
        if key in self._count_of:
            return
        self._bucket(1)[key] = None
        self._count_of[key] = 1
        self._tick()

    def on_access(self, key) -> None:
        c = self._count_of.get(key)
        if c is None:
            return
        if c >= _MAX_COUNT:
            self._buckets[c].move_to_end(key)
        else:
            del self._buckets[c][key]
            self._bucket(c + 1)[key] = None
            self._count_of[key] = c + 1
            self._drop_if_empty(c)
        self._tick()

    def on_remove(self, key) -> None:
        c = self._count_of.pop(key, None)
        if c is None:
            return
        del self._buckets[c][key]
        self._drop_if_empty(c)

    def pick_victim(self, evictable: Evictable):
        for c in self._counts:
            for k in self._buckets[c]:
                if evictable(k):
                    return k
        return None

    def _tick(self) -> None:
        period = max(160, 10 * len(self._count_of))
        self._events += 1
        if self._events >= period:
            self._age()

    def _age(self) -> None:
        self._events = 0
        new_counts: list[int] = []
        new_buckets: dict[int, OrderedDict] = {}
        for c in self._counts:
            h = c // 2
            keys = self._buckets[c]
            if new_counts and new_counts[-1] == h:
                into = new_buckets[h]  # the lower old count keeps the least recently used side
                for k in keys:
                    into[k] = None
            else:
                new_counts.append(h)
                new_buckets[h] = keys
            for k in keys:
                self._count_of[k] = h
        self._counts, self._buckets = new_counts, new_buckets


def make_cpu_order(name: str):
    """The mirror of the C++ built-in ``name`` ("lru", "s3fifo" or "lfu")."""
    if name == "lru":
        return LruOrder()
    if name == "s3fifo":
        return S3FifoOrder()
    if name == "lfu":
        return LfuOrder()
    raise ValueError(f"cpu eviction policy must be one of {CPU_ORDER_NAMES}, got {name!r}")
