"""Membership by gossip (SWIM-style), with no transport and no clock of its own.

Each protocol period a member probes one peer (round-robin over a shuffled list): a PING that
must be ACKed within ``ack_timeout_s``; failing that, ``indirect_probes`` other members are asked
to probe it (PING_REQ). A peer nobody reached is SUSPECT; unless it refutes the suspicion (by
gossiping ALIVE with a higher incarnation) within ``suspicion_mult * log10(n + 1)`` periods it is
DEAD, and its record is dropped after ``dead_retention_s``. A member that restarts comes back
with a higher incarnation (the wall clock in ms at start, so it outranks its old DEAD record).

Updates ride on PING/ACK messages ("piggyback"): each is sent ``retransmit_mult * log10(n + 1)``
times, fewest-sent first, at most ``max_piggyback`` per message, so a message has a bounded size
whatever the cluster size and an update reaches everyone in O(log n) periods. Digest deltas ride
the same way. Every ``sync_interval_s`` a member swaps its full state with a random peer
(push-pull), which repairs anything the piggyback missed; joining is one such swap with a seed.

The driver (``gossip.py`` over TCP, ``sim.py`` in process) calls :meth:`tick` once a period and
delivers replies; the class only decides. Not thread-safe: the driver serialises calls.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass

from kvtier.p2p.protocol import (
    ALIVE,
    DEAD,
    MAX_PIGGYBACK,
    SUSPECT,
    DigestDelta,
    Gossip,
    Kind,
    MemberRecord,
)


@dataclass(frozen=True)
class MembershipConfig:
    period_s: float = 0.2
    ack_timeout_s: float = 0.1
    indirect_probes: int = 3
    suspicion_mult: float = 4.0
    retransmit_mult: float = 4.0
    dead_retention_s: float = 30.0
    sync_interval_s: float = 5.0
    max_piggyback: int = 16
    max_piggyback_bytes: int = 32 << 10


@dataclass
class Member:
    record: MemberRecord
    state_since: float


@dataclass
class Outgoing:
    """A request for the driver to send: ``kind`` to ``node_id`` at ``(host, port)``."""

    kind: int
    node_id: str
    host: str
    port: int
    body: Gossip
    probe_of: str = ""  # PING / PING_REQ: the member being probed


def _supersedes(new: MemberRecord, old: MemberRecord) -> bool:
    """SWIM's precedence of updates about the same member."""
    if new.incarnation != old.incarnation:
        return new.incarnation > old.incarnation
    return new.state > old.state  # same incarnation: DEAD > SUSPECT > ALIVE


class _Broadcasts:
    """Updates to piggyback, each sent a bounded number of times, fewest-sent first, membership
    updates before digest deltas (liveness must never wait behind directory traffic). Deltas
    beyond ``max_deltas`` queued are dropped, most-sent first: peers catch up by fetching."""

    def __init__(self, max_deltas: int = 512) -> None:
        # Per queue: key -> [sends, item, size], and a rotation order (fewest sends at the left:
        # new items enter there, sent ones go to the back).
        self._queues = ({}, {})  # members, deltas
        self._orders = (deque(), deque())
        self._max_deltas = max_deltas

    def clear(self) -> None:
        for q, o in zip(self._queues, self._orders):
            q.clear()
            o.clear()

    def add(self, key: tuple, item, size: int) -> None:
        i = 0 if key[0] == "m" else 1
        q, order = self._queues[i], self._orders[i]
        if key not in q:
            order.appendleft(key)
        q[key] = [0, item, size]
        if i == 1:
            while len(q) > self._max_deltas:  # the oldest, most sent, goes
                old = order.pop()
                q.pop(old, None)

    def take(self, limit_items: int, limit_bytes: int, max_sends: int) -> list:
        out: list = []
        used = 0
        for q, order in zip(self._queues, self._orders):
            resend = []
            for _ in range(len(order)):
                if len(out) >= limit_items:
                    break
                key = order.popleft()
                entry = q.get(key)
                if entry is None:
                    continue  # replaced or dropped
                if used + entry[2] > limit_bytes and out:
                    resend.append(key)
                    continue
                out.append(entry[1])
                used += entry[2]
                entry[0] += 1
                if entry[0] >= max_sends:
                    del q[key]
                else:
                    order.append(key)
            order.extendleft(reversed(resend))
        return out

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues)


class Membership:
    """The member list of one node, its failure detector and its gossip queue."""

    def __init__(
        self,
        node_id: str,
        host: str,
        port: int,
        incarnation: int,
        config: MembershipConfig | None = None,
        rng: random.Random | None = None,
        now: float = 0.0,
    ) -> None:
        self.config = config or MembershipConfig()
        self.rng = rng or random.Random()
        self.me = MemberRecord(node_id, host, port, incarnation, ALIVE)
        self.members: dict[str, Member] = {}
        self._bcast = _Broadcasts()
        self._probe_order: list[str] = []
        self._probe: dict | None = None  # target, started, acked, indirect
        self._last_sync = now
        self._not_dead = 0  # members not DEAD, kept by apply()
        self.events: list[tuple[float, str, str]] = []  # (time, node_id, "alive"/"suspect"/"dead")
        self.on_delta = None  # callable(DigestDelta) set by the owner
        self.on_record = None  # callable(MemberRecord) on any accepted update
        self.counters = {"pings": 0, "ping_reqs": 0, "syncs": 0, "suspicions": 0, "deaths": 0, "refutations": 0}
        self._queue_self()

    # -- views -------------------------------------------------------------------------------
    def live(self) -> list[MemberRecord]:
        return [m.record for m in self.members.values() if m.record.state != DEAD]

    def alive_ids(self) -> set[str]:
        return {m.record.node_id for m in self.members.values() if m.record.state == ALIVE}

    def candidate_ids(self) -> set[str]:
        """Members a lookup may ask for chunks: ALIVE, and SUSPECT too. A member that answered one
        probe late (a loaded host) is usually alive; asking it costs at most the request's
        deadline, and a dead one is a miss like any other."""
        return {m.record.node_id for m in self.members.values() if m.record.state in (ALIVE, SUSPECT)}

    def state_of(self, node_id: str) -> int | None:
        m = self.members.get(node_id)
        return None if m is None else m.record.state

    def cluster_size(self) -> int:
        """Members not dead, this one included."""
        return 1 + self._not_dead

    def _max_sends(self) -> int:
        return max(3, math.ceil(self.config.retransmit_mult * math.log10(self.cluster_size() + 1)))

    def suspicion_timeout(self) -> float:
        n = self.cluster_size()
        return self.config.suspicion_mult * max(1.0, math.log10(n + 1)) * self.config.period_s

    # -- own state ---------------------------------------------------------------------------
    def set_digest_version(self, generation: int, version: int) -> None:
        self.me = MemberRecord(
            self.me.node_id, self.me.host, self.me.port, self.me.incarnation, ALIVE, generation, version
        )

    def _queue_self(self) -> None:
        self._bcast.add(("m", self.me.node_id), self.me, 40 + len(self.me.node_id))

    def queue_delta(self, d: DigestDelta) -> None:
        self._bcast.add(("d", d.owner, d.generation, d.version), d, d.size())

    # -- updates -----------------------------------------------------------------------------
    def apply(self, rec: MemberRecord, now: float) -> bool:
        """Merge one update; returns whether it changed anything (then it is re-gossiped)."""
        if rec.node_id == self.me.node_id:
            if rec.state != ALIVE and rec.incarnation >= self.me.incarnation:
                # Someone thinks we are suspect or dead: refute with a higher incarnation.
                self.me = MemberRecord(
                    self.me.node_id,
                    self.me.host,
                    self.me.port,
                    rec.incarnation + 1,
                    ALIVE,
                    self.me.digest_generation,
                    self.me.digest_version,
                )
                self.counters["refutations"] += 1
                self._queue_self()
            return False
        cur = self.members.get(rec.node_id)
        if cur is not None and not _supersedes(rec, cur.record):
            if (
                rec.incarnation == cur.record.incarnation
                and rec.state == cur.record.state
                and (rec.digest_generation, rec.digest_version)
                > (cur.record.digest_generation, cur.record.digest_version)
            ):
                cur.record = rec  # same liveness, newer digest version: keep quietly
                if self.on_record:
                    self.on_record(rec)
            return False
        if cur is None and rec.state == DEAD:
            return False  # never knew it; nothing to remove
        changed_state = cur is None or cur.record.state != rec.state
        was_live = cur is not None and cur.record.state != DEAD
        self._not_dead += (rec.state != DEAD) - was_live
        self.members[rec.node_id] = Member(rec, now if changed_state else cur.state_since)
        if changed_state:
            self.events.append((now, rec.node_id, {ALIVE: "alive", SUSPECT: "suspect", DEAD: "dead"}[rec.state]))
        self._bcast.add(("m", rec.node_id), rec, 40 + len(rec.node_id))
        if self.on_record:
            self.on_record(rec)
        return True

    def _set_state(self, node_id: str, state: int, now: float) -> None:
        m = self.members.get(node_id)
        if m is None or m.record.state == state:
            return
        r = m.record
        self.apply(
            MemberRecord(r.node_id, r.host, r.port, r.incarnation, state, r.digest_generation, r.digest_version), now
        )

    def ingest(self, g: Gossip, now: float) -> None:
        """Merge the sender, member updates and digest deltas a message carries."""
        s = g.sender
        cur = self.members.get(s.node_id)
        if cur is not None and cur.record.state != ALIVE and s.incarnation <= cur.record.incarnation:
            # It still talks but we hold it suspect or dead: tell it, so that it can refute.
            self._bcast.add(("m", s.node_id), cur.record, 40 + len(s.node_id))
        if s.node_id != self.me.node_id:
            self.apply(
                MemberRecord(s.node_id, s.host, s.port, s.incarnation, ALIVE, s.digest_generation, s.digest_version),
                now,
            )
        for rec in g.members:
            self.apply(rec, now)
        for d in g.deltas:
            if self.on_delta and d.owner != self.me.node_id and self.on_delta(d):
                self.queue_delta(d)  # new to us: pass it on

    # -- messages ----------------------------------------------------------------------------
    def _gossip(self, target: str = "") -> Gossip:
        items = self._bcast.take(
            min(self.config.max_piggyback, MAX_PIGGYBACK), self.config.max_piggyback_bytes, self._max_sends()
        )
        members = [i for i in items if isinstance(i, MemberRecord)]
        deltas = [i for i in items if isinstance(i, DigestDelta)]
        return Gossip(self.me, target, members, deltas)

    def ping_body(self) -> Gossip:
        """A PING's body: this member and the next piggybacked updates."""
        return self._gossip()

    def full_state(self) -> Gossip:
        members = [m.record for m in self.members.values()]
        return Gossip(self.me, "", members, [])

    def handle(self, kind: int, g: Gossip, now: float) -> tuple[int, Gossip]:
        """Answer a PING or SYNC (PING_REQ is the driver's: it probes, then calls
        :meth:`relay_answer`)."""
        self.ingest(g, now)
        if kind == Kind.SYNC:
            return Kind.SYNC_REPLY, self.full_state()
        return Kind.ACK, self._gossip()

    def relay_answer(self, acked: bool, target: str) -> tuple[int, Gossip]:
        return (Kind.ACK if acked else Kind.NACK), self._gossip(target)

    def on_reply(self, kind: int, g: Gossip, now: float, probe_of: str = "") -> None:
        """A reply arrived: ACK (direct, or relayed for ``g.target``), NACK or SYNC_REPLY."""
        self.ingest(g, now)
        if kind == Kind.ACK and self._probe is not None:
            acked_for = g.target or g.sender.node_id
            if acked_for == self._probe["target"] or probe_of == self._probe["target"]:
                self._probe["acked"] = True

    def on_no_reply(self, out: Outgoing, now: float) -> list[Outgoing]:
        """A request got no answer in time. A direct probe then goes indirect."""
        p = self._probe
        if out.kind != Kind.PING or p is None or out.node_id != p["target"] or p["indirect"]:
            return []
        p["indirect"] = True
        helpers = [r for r in self.live() if r.node_id != p["target"] and r.state == ALIVE]
        self.rng.shuffle(helpers)
        outs = []
        for h in helpers[: self.config.indirect_probes]:
            self.counters["ping_reqs"] += 1
            outs.append(
                Outgoing(Kind.PING_REQ, h.node_id, h.host, h.port, self._gossip(p["target"]), probe_of=p["target"])
            )
        return outs

    def join_requests(self, seeds: list[tuple[str, int]]) -> list[Outgoing]:
        return [Outgoing(Kind.SYNC, "", host, port, self.full_state()) for host, port in seeds]

    def tick(self, now: float) -> list[Outgoing]:
        """One protocol period: judge the last probe, time out suspicions and tombstones,
        start the next probe, and a push-pull sync when due."""
        outs: list[Outgoing] = []
        p = self._probe
        if p is not None and not p["acked"] and self.state_of(p["target"]) == ALIVE:
            self.counters["suspicions"] += 1
            self._set_state(p["target"], SUSPECT, now)
        self._probe = None
        timeout = self.suspicion_timeout()
        for node_id, m in list(self.members.items()):
            if m.record.state == SUSPECT and now - m.state_since >= timeout:
                self.counters["deaths"] += 1
                self._set_state(node_id, DEAD, now)
            elif m.record.state == DEAD and now - m.state_since >= self.config.dead_retention_s:
                del self.members[node_id]
        target = self._next_probe_target()
        if target is not None:
            r = self.members[target].record
            self._probe = {"target": target, "started": now, "acked": False, "indirect": False}
            self.counters["pings"] += 1
            outs.append(Outgoing(Kind.PING, target, r.host, r.port, self._gossip(), probe_of=target))
        if now - self._last_sync >= self.config.sync_interval_s:
            self._last_sync = now
            live = self.live()
            if live:
                r = self.rng.choice(live)
                self.counters["syncs"] += 1
                outs.append(Outgoing(Kind.SYNC, r.node_id, r.host, r.port, self.full_state()))
        return outs

    def _next_probe_target(self) -> str | None:
        while self._probe_order:
            t = self._probe_order.pop()
            m = self.members.get(t)
            if m is not None and m.record.state != DEAD:
                return t
        live = [r.node_id for r in self.live()]
        if not live:
            return None
        self.rng.shuffle(live)
        self._probe_order = live
        return self._probe_order.pop()

    def pending_broadcasts(self) -> int:
        return len(self._bcast)
