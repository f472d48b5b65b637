"""KV events: which chunks an instance stored or dropped, and in which medium.

A cache (``KVCache``, ``PagedKVPool``) records an event each time a chunk becomes findable in a
medium (``stored``) or stops being findable there (``removed``); ``cleared`` says an instance
dropped everything in a medium (a reset cache directory, a restart). Routers keep a picture of
where the KV is from these events alone: kvtier's reference router (``kvtier route``), and, through
vLLM's KV-event stream, routers such as llm-d's and Dynamo's.

Keys are kvtier's chunk keys (:mod:`kvtier.keys`): whoever consumes the events names a request's
chunks with the same :class:`~kvtier.keys.ChunkKeyer` (model, layout fingerprint, chunk size) as
the instances that produced them. ``stored`` keys come in prefix order when they belong to one
prefix.

Example::

    >>> ev = KVEvent(STORED, CPU, (b"\\x01" * 16,), ts=0.0)
    >>> ev.kind, ev.medium, len(ev.keys)
    ('stored', 'cpu', 1)
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass

import numpy as np

from kvtier.errors import InvalidArgumentError
from kvtier.keys import KEY_BYTES

__all__ = [
    "CLEARED",
    "CPU",
    "DISK",
    "GPU",
    "KINDS",
    "MEDIA",
    "RECORD_BYTES",
    "REMOVED",
    "STORED",
    "EventQueue",
    "KVEvent",
    "events_from_records",
]

STORED = "stored"
REMOVED = "removed"
CLEARED = "cleared"
KINDS = (STORED, REMOVED, CLEARED)
"""What happened: chunks became findable, stopped being findable, or the whole medium emptied."""

GPU = "gpu"
CPU = "cpu"
DISK = "disk"
MEDIA = (GPU, CPU, DISK)
"""Where: an instance's GPU pages, its pinned CPU tier, its disk tier."""


@dataclass(frozen=True)
class KVEvent:
    """One event: ``kind`` of the chunks ``keys`` in ``medium``, at wall-clock time ``ts``.

    A ``cleared`` event has no keys.
    """

    kind: str
    medium: str
    keys: tuple[bytes, ...]
    ts: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidArgumentError(f"KVEvent.kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.medium not in MEDIA:
            raise InvalidArgumentError(f"KVEvent.medium: {self.medium!r} is not one of {', '.join(MEDIA)}")
        if self.kind == CLEARED and self.keys:
            raise InvalidArgumentError(f"KVEvent.keys: a cleared event has no keys, got {len(self.keys)}")
        for k in self.keys:
            if not isinstance(k, bytes) or len(k) != KEY_BYTES:
                raise InvalidArgumentError(f"KVEvent.keys: each key is {KEY_BYTES} bytes, got {k!r}")


RECORD_BYTES = 2 + KEY_BYTES
"""One event as the core packs it (``CpuTier.take_events``): kind (its index in KINDS), medium
(its index in MEDIA), then the 16-byte key (zeros for ``cleared``)."""


def events_from_records(records: bytes, ts: float | None = None) -> list[KVEvent]:
    """Events from packed records (:data:`RECORD_BYTES` each, oldest first): a run of records of
    one kind and medium becomes one event, keys in order; a ``cleared`` record one event of its
    own. ``ts`` defaults to now."""
    n, rest = divmod(len(records), RECORD_BYTES)
    if rest:
        raise InvalidArgumentError(
            f"records: {len(records)} bytes is not a whole number of {RECORD_BYTES}-byte records"
        )
    ts = time.time() if ts is None else ts
    if n < _VECTORIZE_FROM:
        codes = [(records[off], records[off + 1]) for off in range(0, len(records), RECORD_BYTES)]
        for i, (kind, medium) in enumerate(codes):
            if kind >= len(KINDS) or medium >= len(MEDIA):
                raise InvalidArgumentError(f"records: record {i} has kind {kind}, medium {medium}")
        keys = [records[off + 2 : off + RECORD_BYTES] for off in range(0, len(records), RECORD_BYTES)]
        bounds = [i for i in range(n) if i == 0 or codes[i] != codes[i - 1] or codes[i][0] == _CLEARED_CODE]
    else:  # a long drain: the same in numpy
        table = np.frombuffer(records, dtype=np.uint8).reshape(n, RECORD_BYTES)
        kinds, media = table[:, 0], table[:, 1]
        bad = np.flatnonzero((kinds >= len(KINDS)) | (media >= len(MEDIA)))
        if bad.size:
            i = int(bad[0])
            raise InvalidArgumentError(f"records: record {i} has kind {kinds[i]}, medium {media[i]}")
        starts = np.ones(n, dtype=bool)  # a run begins at another kind or medium, or a cleared record
        starts[1:] = (kinds[1:] != kinds[:-1]) | (media[1:] != media[:-1]) | (kinds[1:] == _CLEARED_CODE)
        bounds = np.flatnonzero(starts).tolist()
        codes = list(zip(kinds.tolist(), media.tolist()))
        flat = table[:, 2:].tobytes()
        keys = [flat[i : i + KEY_BYTES] for i in range(0, n * KEY_BYTES, KEY_BYTES)]
    out = []
    for s, e in itertools.pairwise([*bounds, n]):
        kind, medium = codes[s]
        event_keys = () if kind == _CLEARED_CODE else tuple(keys[s:e])
        out.append(_checked_event(KINDS[kind], MEDIA[medium], event_keys, ts))
    return out


_CLEARED_CODE = KINDS.index(CLEARED)
_VECTORIZE_FROM = 64  # records; below it numpy's fixed cost exceeds the loop's


def _checked_event(kind: str, medium: str, keys: tuple[bytes, ...], ts: float) -> KVEvent:
    """A KVEvent of values checked already (records whose codes were checked above, keys cut to
    KEY_BYTES each): built without __post_init__, whose per-key checks cost more than the rest of
    taking an event."""
    ev = object.__new__(KVEvent)
    object.__setattr__(ev, "kind", kind)
    object.__setattr__(ev, "medium", medium)
    object.__setattr__(ev, "keys", keys)
    object.__setattr__(ev, "ts", ts)
    return ev


class EventQueue:
    """A bounded queue of events recorded in Python (a ``PagedKVPool``'s GPU medium), packed as
    the core packs its own: past ``capacity`` records the oldest are dropped and counted
    (``dropped``); capacity 0 records nothing. Thread-safe."""

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise InvalidArgumentError(f"capacity must be an int >= 0 (0: no events), got {capacity!r}")
        self.capacity = capacity
        self.recorded = 0
        self.dropped = 0
        self._records: collections.deque[bytes] = collections.deque()
        self._lock = threading.Lock()

    def record(self, kind: str, medium: str, keys) -> None:
        """Append one record per key (one ``cleared`` record for CLEARED)."""
        if not self.capacity:
            return
        head = bytes((KINDS.index(kind), MEDIA.index(medium)))
        records = [head + bytes(KEY_BYTES)] if kind == CLEARED else [head + k for k in keys]
        with self._lock:
            for r in records:
                if len(self._records) >= self.capacity:
                    self._records.popleft()
                    self.dropped += 1
                self._records.append(r)
            self.recorded += len(records)

    def take(self, max_records: int = 0) -> bytes:
        """Remove and return the oldest ``max_records`` records (all with 0), packed."""
        with self._lock:
            n = len(self._records) if max_records <= 0 else min(max_records, len(self._records))
            return b"".join(self._records.popleft() for _ in range(n))

    def pending(self) -> int:
        with self._lock:
            return len(self._records)
