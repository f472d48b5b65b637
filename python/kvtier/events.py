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

from dataclasses import dataclass

from kvtier.errors import InvalidArgumentError
from kvtier.keys import KEY_BYTES

__all__ = ["CLEARED", "CPU", "DISK", "GPU", "KINDS", "MEDIA", "REMOVED", "STORED", "KVEvent"]

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
