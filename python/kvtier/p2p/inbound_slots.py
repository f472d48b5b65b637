"""InboundSlots: the accounting of a peer service's inbound connections (pending handshakes, one
fair share of the slots per peer identity, idle expiry)."""

from __future__ import annotations


class InboundSlots:
    """Who holds the inbound connections: at most ``capacity`` authenticated ones, each peer
    identity a fair share of them, and at most ``pending_max`` still in their handshake.

    A connection is *pending* from accept to the end of its handshake, then *admitted* under the
    node id it proved the secret with. When all ``capacity`` slots are taken, a login of an
    identity holding fewer connections than the largest holder (by two or more) takes a slot
    from that holder: its least recently active connection, an idle one if it has any, is handed
    back to be closed. Any other login is refused. So one identity cannot keep another out as
    long as it holds more than its share. Idle admitted connections expire after
    ``idle_timeout_s``, or after ``scarce_idle_timeout_s`` once half the slots are taken.

    Every structure here holds at most ``capacity + pending_max`` entries, whatever connects.
    Not thread-safe: the service calls it under its lock. ``conn`` is any hashable.
    """

    def __init__(self, capacity: int, pending_max: int, idle_timeout_s: float, scarce_idle_timeout_s: float) -> None:
        self.capacity, self.pending_max = capacity, pending_max
        self.idle_timeout_s = idle_timeout_s
        self.scarce_idle_timeout_s = min(scarce_idle_timeout_s, idle_timeout_s)
        self._pending: set = set()
        self._peer_of: dict = {}  # admitted conn -> identity
        self._by_peer: dict[str, dict] = {}  # identity -> {conn: last active (monotonic s)}
        self._busy: set = set()  # admitted conns serving a request now

    def accept(self, conn) -> bool:
        """A new connection starts its handshake; False: too many handshakes already."""
        if len(self._pending) >= self.pending_max:
            return False
        self._pending.add(conn)
        return True

    def admit(self, conn, peer: str, now: float):
        """(refusal reason or None, connection that gave up its slot or None) for ``conn``,
        which proved the secret as ``peer``."""
        self._pending.discard(conn)
        mine = len(self._by_peer.get(peer, ()))
        victim = None
        if len(self._peer_of) >= self.capacity:
            largest = max(self._by_peer, key=lambda p: len(self._by_peer[p]))
            held = self._by_peer[largest]
            if len(held) < mine + 2:
                return (
                    f"busy: all {self.capacity} peer connection slots are taken and "
                    f"{peer!r} already holds {mine}, a fair share"
                ), None
            idle = [c for c in held if c not in self._busy]
            victim = min(idle or held, key=held.get)
            self.release(victim)
        self._by_peer.setdefault(peer, {})[conn] = now
        self._peer_of[conn] = peer
        return None, victim

    def release(self, conn) -> None:
        """``conn`` is gone (or lost its slot); unknown connections are ignored."""
        self._pending.discard(conn)
        self._busy.discard(conn)
        peer = self._peer_of.pop(conn, None)
        if peer is not None:
            held = self._by_peer[peer]
            del held[conn]
            if not held:
                del self._by_peer[peer]

    def begin(self, conn, now: float) -> bool:
        """A request arrived on ``conn``; False if it no longer holds a slot."""
        peer = self._peer_of.get(conn)
        if peer is None:
            return False
        self._busy.add(conn)
        self._by_peer[peer][conn] = now
        return True

    def end(self, conn, now: float) -> None:
        peer = self._peer_of.get(conn)
        if peer is not None:
            self._busy.discard(conn)
            self._by_peer[peer][conn] = now

    def idle_limit(self) -> float:
        return self.scarce_idle_timeout_s if 2 * len(self._peer_of) >= self.capacity else self.idle_timeout_s

    def expire(self, now: float) -> list:
        """Release and return the admitted connections idle for longer than :meth:`idle_limit`."""
        limit = self.idle_limit()
        old = [c for held in self._by_peer.values() for c, t in held.items() if c not in self._busy and now - t > limit]
        for c in old:
            self.release(c)
        return old

    def sizes(self) -> dict[str, int]:
        return {
            "pending": len(self._pending),
            "admitted": len(self._peer_of),
            "identities": len(self._by_peer),
            "busy": len(self._busy),
        }
