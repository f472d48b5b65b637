"""The simulated disk tier: csrc/storage/disk_store's fixed slots and LRU among READY slots, on
integer chunk ids (kvtier.sim.tiers re-exports it)."""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["SimDisk"]


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
