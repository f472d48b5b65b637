"""Scale simulation: the real membership, digest and lookup-planning code of kvtier.p2p over an
in-process transport, for clusters of 100 to 1,000 members.

Time is simulated in protocol periods (``period_s``, 1 s by default). Each period every live
member runs :meth:`Membership.tick`; its requests are delivered at once (a round trip is taken
to be shorter than the ACK timeout) to live targets, and dropped for dead ones, which the
sender then sees as a timeout. Every message is encoded with the wire protocol, so byte counts
are those a TCP deployment would send (frame headers included; TCP/IP headers not).

Digests: each member's own :class:`LocalDigest` is real; what a member knows of others is kept
as versions (the bits of a peer's filter at the version it has are the owner's filter, shared in
memory: 1,000 copies of 1,000 filters would not fit). Delta bytes on piggyback and full-filter
fetch bytes are counted exactly.

Run ``python -m kvtier.p2p.sim --sizes 30,100,300,1000 --json docs/p2p_scale.json --plot
docs/p2p_scale.png`` for the figures in docs/p2p.md (about 6 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from kvtier.p2p import protocol as P
from kvtier.p2p.digest import (
    LocalDigest,
    _positions,
    assemble_plan,
    bloom_geometry,
    choose_sources,
    key_hash,
)
from kvtier.p2p.membership import Membership, MembershipConfig, Outgoing


class _VersionDigests:
    """What a member knows of peers' digests: watermarks and versions only (see module doc);
    the same bookkeeping as :class:`kvtier.p2p.digest.PeerDigests`."""

    def __init__(self) -> None:
        self.have: dict[str, tuple[int, int]] = {}
        self.extra: dict[str, set[int]] = {}
        self.latest: dict[str, tuple[int, int]] = {}
        self.behind: set[str] = set()

    def announce(self, owner, gen, ver) -> None:
        if (gen, ver) > self.latest.get(owner, (0, 0)):
            self.latest[owner] = (gen, ver)
            if self.have.get(owner, (0, 0)) < (gen, ver):
                self.behind.add(owner)

    def apply_delta(self, d: P.DigestDelta) -> bool:
        before = self.latest.get(d.owner, (0, 0))
        self.announce(d.owner, d.generation, d.version)
        have = self.have.get(d.owner)
        if have is None or have[0] != d.generation or d.version <= have[1]:
            return (d.generation, d.version) > before
        extra = self.extra.setdefault(d.owner, set())
        if d.version in extra:
            return False
        extra.add(d.version)
        v = have[1]
        while v + 1 in extra:
            v += 1
            extra.discard(v)
        self.have[d.owner] = (d.generation, v)
        if self.have[d.owner] >= self.latest[d.owner]:
            self.behind.discard(d.owner)
        return True

    def caught_up(self, owner, gen, ver) -> None:
        self.have[owner] = (gen, ver)
        self.extra.pop(owner, None)
        self.announce(owner, gen, ver)
        if self.have[owner] >= self.latest[owner]:
            self.behind.discard(owner)

    def stale(self) -> list[str]:
        return sorted(self.behind, key=lambda o: self.have.get(o, (0, 0))[1] - self.latest[o][1])

    def forget(self, owner) -> None:
        self.have.pop(owner, None)
        self.extra.pop(owner, None)
        self.latest.pop(owner, None)
        self.behind.discard(owner)


@dataclass
class SimNode:
    node_id: str
    m: Membership
    digest: LocalDigest
    peers: _VersionDigests
    alive: bool = True
    held: set = field(default_factory=set)


def _frame_bytes(body: bytes) -> int:
    return P.HEADER_BYTES + len(body)


class Cluster:
    """N simulated members; ``bytes_by_kind`` counts every message, request and reply."""

    def __init__(
        self,
        n: int,
        *,
        seed: int = 0,
        period_s: float = 1.0,
        digest_capacity: int = 4096,
        digest_fp_rate: float = 0.001,
        sync_interval_s: float = 30.0,
        max_sources: int = 4,
        fetches_per_tick: int = 4,
    ) -> None:
        self.fetches_per_tick = fetches_per_tick
        self.rng = random.Random(seed)
        self.period_s = period_s
        self.now = 0.0
        self.rounds = 0
        self.cfg = MembershipConfig(
            period_s=period_s,
            ack_timeout_s=period_s / 2,
            indirect_probes=3,
            suspicion_mult=4.0,
            dead_retention_s=60 * period_s,
            sync_interval_s=sync_interval_s,
        )
        self.bits, self.hashes = bloom_geometry(digest_capacity, digest_fp_rate)
        self.max_sources = max_sources
        self.nodes: dict[str, SimNode] = {}
        self.bytes_by_kind: Counter = Counter()
        self.msgs_by_kind: Counter = Counter()
        for i in range(n):
            self._add(f"n{i:04d}")
        # Start from a converged cluster: everyone knows everyone (the join and death experiments
        # then measure one change against it).
        for node in self.nodes.values():
            for other in self.nodes.values():
                if other is not node:
                    node.m.apply(other.m.me, 0.0)
            node.m._bcast.clear()  # converged: nothing left to announce

    def _add(self, node_id: str, incarnation: int = 1) -> SimNode:
        m = Membership(
            node_id,
            node_id,
            7070,
            incarnation,
            self.cfg,
            random.Random(self.rng.random()),
            now=self.now - self.rng.random() * self.cfg.sync_interval_s,
        )
        node = SimNode(node_id, m, LocalDigest(node_id, self.bits, self.hashes, generation=1), _VersionDigests())
        m.on_delta = node.peers.apply_delta

        def on_record(rec, node=node):
            if rec.state == P.DEAD:
                node.peers.forget(rec.node_id)
            else:
                node.peers.announce(rec.node_id, rec.digest_generation, rec.digest_version)

        m.on_record = on_record
        self.nodes[node_id] = node
        return node

    # -- transport ------------------------------------------------------------------------------
    def _count(self, kind: int, body: bytes) -> None:
        name = {
            P.Kind.PING: "ping",
            P.Kind.ACK: "ack",
            P.Kind.NACK: "nack",
            P.Kind.PING_REQ: "ping_req",
            P.Kind.SYNC: "sync",
            P.Kind.SYNC_REPLY: "sync_reply",
        }[kind]
        self.bytes_by_kind[name] += _frame_bytes(body)
        self.msgs_by_kind[name] += 1

    def _deliver(self, src: SimNode, out: Outgoing) -> None:
        body = out.body.encode()
        self._count(out.kind, body)
        dst = self.nodes.get(out.node_id) if out.node_id else self._by_addr(out.host)
        if dst is None or not dst.alive:
            for more in src.m.on_no_reply(out, self.now):
                self._deliver(src, more)
            return
        if out.kind == P.Kind.PING_REQ:
            dst.m.ingest(out.body, self.now)
            target = self.nodes.get(out.body.target)
            ping = dst.m.ping_body()
            self._count(P.Kind.PING, ping.encode())
            acked = target is not None and target.alive
            if acked:
                kind, reply = target.m.handle(P.Kind.PING, ping, self.now)
                self._count(kind, reply.encode())
                dst.m.on_reply(kind, reply, self.now)
            kind, reply = dst.m.relay_answer(acked, out.body.target)
        else:
            kind, reply = dst.m.handle(out.kind, out.body, self.now)
        self._count(kind, reply.encode())
        src.m.on_reply(kind, reply, self.now, probe_of=out.probe_of)

    def _by_addr(self, host: str) -> SimNode | None:
        return self.nodes.get(host)

    # -- time -----------------------------------------------------------------------------------
    def step(self, stores_per_node_per_s: float = 0.0) -> None:
        order = [n for n in self.nodes.values() if n.alive]
        self.rng.shuffle(order)
        for node in order:
            if stores_per_node_per_s and self.rng.random() < stores_per_node_per_s * self.period_s:
                key = self.rng.randbytes(16)
                node.held.add(key)
                node.digest.add([key])
            for d in node.digest.flush():
                node.m.queue_delta(d)
            node.m.set_digest_version(node.digest.generation, node.digest.version)
            for out in node.m.tick(self.now):
                self._deliver(node, out)
            for owner in node.peers.stale()[: self.fetches_per_tick]:  # catch up on digests behind
                o = self.nodes.get(owner)
                if o is None or not o.alive:
                    continue
                have = node.peers.have.get(owner, (0, 0))
                deltas = o.digest.deltas_since(*have) if have != (0, 0) else None
                self.msgs_by_kind["digest_fetch"] += 2
                if deltas is not None:
                    body = P.encode_deltas(deltas)
                    self.bytes_by_kind["digest_fetch"] += 2 * P.HEADER_BYTES + 8 + len(body)
                else:
                    snap = o.digest.snapshot()
                    self.bytes_by_kind["digest_fetch"] += 2 * P.HEADER_BYTES + 8 + 17 + len(snap.bits)
                node.peers.caught_up(owner, o.digest.generation, o.digest.version)
        self.now += self.period_s
        self.rounds += 1

    def live(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.alive]

    # -- experiments ------------------------------------------------------------------------------
    def join(self, seed_id: str) -> SimNode:
        node = self._add(f"j{len(self.nodes):04d}", incarnation=2)
        for out in node.m.join_requests([(seed_id, 7070)]):
            out.node_id = seed_id
            self._deliver(node, out)
        return node

    def known_by_all(self, node_id: str, state: int) -> bool:
        for n in self.live():
            if n.node_id == node_id:
                continue
            s = n.m.state_of(node_id)
            if state == P.DEAD:
                if s is not None and s != P.DEAD:
                    return False
            elif s != state:
                return False
        return True


def _until(cluster: Cluster, pred, max_rounds: int, **step_kw) -> int | None:
    for r in range(max_rounds + 1):
        if pred():
            return r
        cluster.step(**step_kw)
    return None


def lookup_messages(cluster: Cluster, requests: int, chunks: int, holders: int, rng: random.Random) -> dict:
    """Requests for ``chunks``-chunk prompts, each held whole by ``holders`` random members (and
    nowhere else); counts the directory and pull messages a requester sends and receives.
    Every member has the digests of every other (converged), as after gossip settles."""
    live = cluster.live()
    row = {o.node_id: i for i, o in enumerate(live)}
    bits = np.stack([o.digest.filter.bits for o in live])  # every peer's filter, one row each
    ids = np.array([o.node_id for o in live])
    nbits, nhashes = cluster.bits, cluster.hashes
    confirms = false_pos = pulls = found = 0
    for _ in range(requests):
        keys = [rng.randbytes(16) for _ in range(chunks)]
        owners = rng.sample(live, holders)
        for o in owners:
            o.held.update(keys)
            o.digest.add(keys)
            o.digest.flush()
            bits[row[o.node_id]] = o.digest.filter.bits
        requester = rng.choice([n for n in live if n not in owners])
        local = [False] * chunks
        cands = []
        for k in keys:
            pos = _positions(key_hash(k), nbits, nhashes)
            hit = np.all(bits[:, (pos >> 3).astype(np.intp)] & (1 << (pos & 7)).astype(np.uint8), axis=1)
            cands.append([m for m in ids[hit].tolist() if m != requester.node_id])
        confirmed: dict[str, set[int]] = {}
        asked: set[str] = set()
        plan: list[str] = []
        for _round in range(2):
            asks = choose_sources(len(plan), local, cands, cluster.max_sources, asked, rng)
            if not asks:
                break
            for m, idx in asks.items():
                confirms += 1
                holder = cluster.nodes[m]
                ok = {j for j in idx if keys[j] in holder.held}
                false_pos += len(idx) - len(ok)
                confirmed[m] = ok
            asked |= set(asks)
            plan = assemble_plan(local, confirmed)
            if len(plan) == chunks:
                break
        pulls += len(set(plan))
        found += len(plan) == chunks
    return {
        "requests": requests,
        "chunks": chunks,
        "holders": holders,
        "confirm_requests_per_request": confirms / requests,
        "messages_per_request": 2 * (confirms + pulls) / requests,
        "false_positive_chunks_per_request": false_pos / requests,
        "found_rate": found / requests,
    }


def run_scale(n: int, seed: int = 0, steady_rounds: int = 30, store_rate: float = 0.2) -> dict:
    """Membership and directory figures of an ``n``-member cluster where every member stores
    ``store_rate`` new chunks per second."""
    t0 = time.perf_counter()
    c = Cluster(n, seed=seed)
    rng = random.Random(seed + 1)
    # Every member holds some chunks already (filters ~ half full at capacity 4096).
    for node in c.nodes.values():
        keys = [rng.randbytes(16) for _ in range(1024)]
        node.held.update(keys)
        node.digest.add(keys)
        node.digest.flush()
        node.m.set_digest_version(node.digest.generation, node.digest.version)
    for node in c.nodes.values():
        for o in c.nodes.values():
            if o is not node:
                node.peers.caught_up(o.node_id, o.digest.generation, o.digest.version)
    # Steady state: gossip bytes per member per second, with each member storing 1 chunk/s.
    c.bytes_by_kind.clear()
    c.msgs_by_kind.clear()
    for _ in range(steady_rounds):
        c.step(stores_per_node_per_s=store_rate)
    secs = steady_rounds * c.period_s
    steady = {k: v / n / secs for k, v in c.bytes_by_kind.items()}
    steady_total = sum(steady.values())
    # Directory freshness: rounds until a chunk stored now is in every member's view of the
    # owner's digest (stores go on meanwhile).
    owner = rng.choice(c.live())
    owner.digest.add([rng.randbytes(16)])
    owner.digest.flush()
    target = (owner.digest.generation, owner.digest.version)
    for d in owner.digest._log[-1:]:
        owner.m.queue_delta(d)
    fresh_rounds = _until(
        c,
        lambda: all(x.peers.have.get(owner.node_id, (0, 0)) >= target for x in c.live() if x is not owner),
        300,
        stores_per_node_per_s=store_rate,
    )
    # Join through one seed.
    seed_node = rng.choice(c.live()).node_id
    joiner = c.join(seed_node)
    join_rounds = _until(c, lambda: c.known_by_all(joiner.node_id, P.ALIVE), 200)
    # Death: one member stops answering.
    victim = rng.choice([x for x in c.live() if x is not joiner])
    victim.alive = False
    suspect_rounds = _until(c, lambda: all(x.m.state_of(victim.node_id) in (P.SUSPECT, P.DEAD) for x in c.live()), 200)
    dead_rounds_more = _until(c, lambda: c.known_by_all(victim.node_id, P.DEAD), 400)
    dead_rounds = None if suspect_rounds is None or dead_rounds_more is None else suspect_rounds + dead_rounds_more
    lookups = {
        "1_chunk": lookup_messages(c, 100, 1, 1, rng),
        "16_chunks_1_holder": lookup_messages(c, 100, 16, 1, rng),
        "16_chunks_3_holders": lookup_messages(c, 100, 16, 3, rng),
    }
    return {
        "members": n,
        "period_s": c.period_s,
        "stores_per_member_per_s": store_rate,
        "suspicion_timeout_periods": c.cfg.suspicion_mult * max(1.0, math.log10(n + 1)),
        "join_known_by_all_rounds": join_rounds,
        "death_suspected_by_all_rounds": suspect_rounds,
        "death_known_by_all_rounds": dead_rounds,
        "gossip_bytes_per_member_per_s": steady_total,
        "new_chunk_in_all_digests_rounds": fresh_rounds,
        "gossip_bytes_per_member_per_s_by_kind": steady,
        "bloom_bits_per_member": c.bits,
        "lookups": lookups,
        "wall_s": time.perf_counter() - t0,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,1000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--plot", default=None, help="write a PNG plot here (needs matplotlib)")
    args = ap.parse_args(argv)
    results = []
    for size in args.sizes.split(","):
        results.append(run_scale(int(size), seed=args.seed))
        print(json.dumps(results[-1]), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    if args.plot:
        plot(results, args.plot)
    return 0


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["members"] for r in results]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    ax[0].plot(ns, [r["join_known_by_all_rounds"] for r in results], "o-", label="join known by all")
    ax[0].plot(ns, [r["death_suspected_by_all_rounds"] for r in results], "s-", label="death suspected by all")
    ax[0].plot(ns, [r["death_known_by_all_rounds"] for r in results], "^-", label="death (dead) known by all")
    ax[0].set_xscale("log")
    ax[0].set_xlabel("members")
    ax[0].set_ylabel("protocol periods (1 period = 1 s here)")
    ax[0].legend(fontsize=8)
    ax[0].set_title("membership convergence")
    ax[1].plot(ns, [r["gossip_bytes_per_member_per_s"] / 1024 for r in results], "o-", label="total")
    for kind in ("ping", "ack", "sync", "sync_reply", "digest_fetch"):
        ax[1].plot(
            ns, [r["gossip_bytes_per_member_per_s_by_kind"].get(kind, 0) / 1024 for r in results], ".--", label=kind
        )
    ax[1].set_xscale("log")
    ax[1].set_xlabel("members")
    ax[1].set_ylabel("KiB sent per member per second")
    ax[1].legend(fontsize=7)
    ax[1].set_title(f"gossip traffic ({results[0]['stores_per_member_per_s']} chunk stored / member / s)")
    for name, mark in (("1_chunk", "o-"), ("16_chunks_1_holder", "s-"), ("16_chunks_3_holders", "^-")):
        ax[2].plot(ns, [r["lookups"][name]["messages_per_request"] for r in results], mark, label=name)
    ax[2].set_xscale("log")
    ax[2].set_ylim(bottom=0)
    ax[2].set_xlabel("members")
    ax[2].set_ylabel("messages per lookup+pull")
    ax[2].legend(fontsize=8)
    ax[2].set_title("lookup messages per request")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
