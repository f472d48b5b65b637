"""What a load from peers into pages is made of: the frontier that scatters pulled chunks into the
pages in prefix order as they land, and the ChainedOp the caller waits on."""

from __future__ import annotations

import threading
import time

from kvtier.p2p.peer_pull import LOCAL
from kvtier.p2p.transport import Deadline


class LoadFrontier:
    """Starts the scatter of pulled chunks in prefix order, as soon as each one and all before it
    are committed; freezes when the load returns so late commits touch no page."""

    def __init__(self, tier, keys, pages, ppc, stream, plan) -> None:
        self.tier, self.keys, self.pages, self.ppc, self.stream = tier, keys, pages, ppc, stream
        self.ready = [src == LOCAL for src in plan]
        self.direct = [False] * len(plan)  # copied into its pages already (same-host sharing)
        self.next = 0
        self.ops = []
        self.stopped = False
        self.copying = 0  # same-host copies writing into self.pages right now
        self.lock = threading.Condition()
        self.advance()

    def begin_direct(self) -> bool:
        """A same-host copy is about to write pages; False once frozen (the pages are the
        caller's again)."""
        with self.lock:
            if self.stopped:
                return False
            self.copying += 1
            return True

    def end_direct(self, indices, ok: bool) -> None:
        with self.lock:
            self.copying -= 1
            if ok:
                for i in indices:
                    self.ready[i] = self.direct[i] = True
                self.advance()
            self.lock.notify_all()

    def commit(self, i: int) -> None:
        with self.lock:
            self.ready[i] = True
            self.advance()

    def advance(self) -> None:
        n = len(self.ready)
        while not self.stopped and self.next < n and self.ready[self.next]:
            if self.direct[self.next]:
                self.next += 1
                continue
            end = self.next
            while end < n and self.ready[end] and not self.direct[end]:
                end += 1
            ppc, want = self.ppc, end - self.next
            op = self.tier.load(
                b"".join(self.keys[self.next : end]), self.pages[self.next * ppc : end * ppc], self.stream
            )
            if op.chunks:
                self.ops.append(op)
            self.next += op.chunks
            if op.chunks < want:
                self.stopped = True  # evicted between commit and scatter: the prefix ends here

    def freeze(self, timeout_s: float = 5.0) -> int:
        """Stop: later commits touch no page. Waits (to ``timeout_s``) for same-host copies
        already writing pages to end."""
        with self.lock:
            self.stopped = True
            self.lock.wait_for(lambda: self.copying == 0, timeout_s)
            return self.next


class ChainedTransfer:
    """Several TierOp transfers seen as one (the LoadHandle API: wait, wait_layer, ...)."""

    def __init__(self, transfers) -> None:
        self._transfers = [t for t in transfers if t is not None]

    def wait(self, timeout_s: float) -> None:
        d = Deadline(timeout_s)
        for t in self._transfers:
            t.wait(max(d.at - time.monotonic(), 0.0))

    def wait_layer(self, layer: int, timeout_s: float) -> None:
        d = Deadline(timeout_s)
        for t in self._transfers:
            t.wait_layer(layer, max(d.at - time.monotonic(), 0.0))

    def stream_wait_layer(self, layer: int, stream: int) -> None:
        for t in self._transfers:
            t.stream_wait_layer(layer, stream)

    @property
    def done(self) -> bool:
        return all(t.done for t in self._transfers)


class ChainedOp:
    """What ``PeerService.load`` started: ``chunks`` leading chunks, landing through ``transfer``."""

    def __init__(self, chunks: int, ops) -> None:
        self.chunks = chunks
        transfers = [op.transfer for op in ops if op.transfer is not None]
        self.transfer = ChainedTransfer(transfers) if transfers else None
