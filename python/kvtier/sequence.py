"""A request's view of a PagedKVPool (Sequence) and the pool's record of one cached chunk's
pages (GpuChunk). The pool makes both; a Sequence waits on the loads that fill its pages (and,
begun ``layerwise``, on the offloads still reading pages it was given) and tells the pool,
through the callback it was given, about a load that failed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from kvtier.cache import LoadHandle, _stream_handle
from kvtier.errors import DeadlineExceededError, KVTierError

__all__ = ["GpuChunk", "Sequence"]


@dataclass
class GpuChunk:
    """Pages holding one full chunk in the pool."""

    key: bytes
    pages: tuple[int, ...]
    refs: int = 0
    loading: LoadHandle | None = None  # set while the pages are filled from a lower tier
    offload: object | None = None  # a write-through copy to the CPU tier that may be in flight
    last_use: int = 0
    uses: int = 1
    failed: bool = False  # its load failed: out of the index, its pages freed at the last unref


@dataclass
class Sequence:
    """One request's view of the pool.

    Attributes:
        page_table: page ids holding the sequence's tokens, in order (page_tokens tokens each).
        cached_tokens: leading tokens whose KV is in place (or being loaded) at ``begin``.
        gpu_hit_tokens / lower_hit_tokens: how many of those came from GPU pages / CPU or disk.
        planned_recompute_tokens: cached tokens the load planner chose to recompute instead.
    """

    seq_id: int
    num_tokens: int
    page_table: list[int]
    cached_tokens: int = 0
    gpu_hit_tokens: int = 0
    lower_hit_tokens: int = 0
    planned_recompute_tokens: int = 0
    _chunks: list[GpuChunk] = field(default_factory=list, repr=False)  # referenced chunks, in order
    tail_start: int | None = None  # a split plan: where the tail being loaded starts (tokens)
    _loads: list[tuple[int, LoadHandle]] = field(default_factory=list, repr=False)  # (first token, load)
    _pending: list[tuple[int, LoadHandle]] | None = field(default=None, repr=False)  # see _pending_loads
    _tail: tuple | None = field(default=None, repr=False)  # the tail load in flight: (Future, plan...)
    _released: bool = False
    layerwise: bool = False  # begun layerwise: the caller waits before writing each layer
    # Offloads of evicted chunks still reading pages this sequence was given: (transfer, deadline s)
    _page_readers: list[tuple[object, float]] = field(default_factory=list, repr=False)
    _on_load_failed: Callable[[LoadHandle], None] | None = field(default=None, repr=False)  # the pool's

    def _pending_loads(self) -> list[tuple[int, LoadHandle]]:
        """The distinct loads this sequence's pages wait on (many chunks share one load), each
        with the first token it fills. Listed once: chunks the sequence gains later (commit) were
        computed here, never loaded; a split plan's tail relists them when it lands."""
        if self._pending is None:
            handles = {id(h): (start, h) for start, h in self._loads}
            for c in self._chunks:
                if c.loading is not None and id(c.loading) not in handles:
                    handles[id(c.loading)] = (0, c.loading)  # shared from another request's load
            self._pending = list(handles.values())
        return self._pending

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until every page loaded from a lower tier (for this or a sharing sequence) landed,
        and every offload still reading the sequence's pages ended. A load that failed raises
        (its chunks have left the pool's index): release the sequence."""
        for _start, h in self._pending_loads():
            self._checked(h.wait, h, timeout_s)
        self._pending = []
        for transfer, deadline in self._page_readers:
            self._reader_ended(transfer.wait, deadline if timeout_s is None else timeout_s)
        self._page_readers = []

    def wait_writable(self, layer: int, timeout_s: float | None = None) -> None:
        """Block until the offloads still reading the sequence's pages (a ``layerwise`` sequence's)
        have copied layer ``layer``: the caller may write it then."""
        for transfer, deadline in self._page_readers:
            self._reader_ended(transfer.wait_layer, layer, deadline if timeout_s is None else timeout_s)

    def stream_wait_writable(self, layer: int, stream) -> None:
        """Make ``stream`` wait on the GPU, not the host, until the offloads still reading the
        sequence's pages have copied layer ``layer``: the writes of that layer queued on it after
        this call run after the copies. Offloads that ended drop out at layer 0."""
        if layer == 0:
            self._page_readers = [(t, d) for t, d in self._page_readers if not t.done]
        for transfer, _deadline in self._page_readers:
            transfer.stream_wait_layer(layer, _stream_handle(stream))

    @staticmethod
    def _reader_ended(wait, *args) -> None:
        """Wait for an offload reading the sequence's pages: one that failed has ended all the
        same (its chunks are not stored, the pages are free); past the deadline it raises."""
        try:
            wait(*args)
        except DeadlineExceededError:
            raise
        except KVTierError:
            pass

    def _checked(self, wait, h: LoadHandle, *args) -> None:
        try:
            wait(*args)
        except KVTierError:
            if self._on_load_failed is not None:
                self._on_load_failed(h)
            raise

    def wait_layer(self, layer: int, timeout_s: float | None = None, *, upto: int | None = None) -> None:
        """Block until layer ``layer`` of the loaded pages landed (only of loads that start before
        token ``upto``, when given: the head of a split plan computes while its tail loads)."""
        pending = self._pending_loads()
        for start, h in pending:
            if upto is None or start < upto:
                self._checked(h.wait_layer, h, layer, timeout_s)
        if pending and layer == pending[0][1].num_layers - 1 and all(h.landed() for _s, h in pending):
            self._pending = []  # every layer of every load proved landed: later steps skip the checks

    def stream_wait_layer(self, layer: int, stream, *, upto: int | None = None) -> None:
        """Make ``stream`` wait on the GPU, not the host, for layer ``layer`` of the loaded pages
        (of loads that start before token ``upto``, when given): the host goes on queueing the
        next layers' kernels while the copies run. Errors surface at the next host :meth:`wait`,
        which the caller must make before it trusts what the stream computed."""
        for start, h in self._pending_loads():
            if upto is None or start < upto:
                h.stream_wait_layer(layer, stream)
