"""One kvtier instance process for tests/test_router_replay.py: a PagedKVPool (CPU tensors, a tiny
KV shape) over a CPU tier, driven by JSON lines on stdin, one reply a line on stdout.

``python tests/router_instance.py CONFIG_JSON``; CONFIG: ``name``, ``gpu_chunks``, ``cpu_chunks``,
``chunk_tokens``, ``model`` (the cost model's preset), ``events``: ``"reply"`` (each reply
carries the request's KV events, JSON, for the router's ``apply`` op) or ``"publish"`` (an
``EventPublisher`` on a free loopback port, named in the ready line, publishes them as vLLM's
KV-event stream), and optionally ``peers``: the pool's kvtier.p2p settings (a PeerConfig's
fields: a loopback listen address, the seeds, the secret, gossip timing); the ready line then
names the peer service's address.

The events of a request are taken from the pool (``take_events``) once it is served, so that the
reply can say how many events the instance has published in all: the test has the router wait
for that many (its ``sync`` op) before routing the next request. The publisher's source is the
queue they are put in.

Ops: ``subscribed``: wait until the router's subscriber has joined, then publish the pool's first
events (its ``cleared`` ones). ``serve`` (``tokens``): begin, check the KV it found, compute the
rest (deterministic values of each token id), commit, release; replies with its hits (``peer``:
the chunks its peers' pulls brought, of the ``cpu`` ones the pool loaded from below), the service
seconds the simulator's cost model prices from them, and its events (or how many it published).
``digest`` (with peers): this member's own digest (generation, version, keys not yet in a delta)
and the versions of the others' digests it has. ``stats``; ``stop``.
"""

from __future__ import annotations

import json
import sys
import threading
from types import SimpleNamespace

import torch
from kvtier.events import KVEvent
from kvtier.pool import PagedKVPool
from kvtier.router import event_to_json
from kvtier.sim.cost import MODEL_PRESETS, HardwareCost
from kvtier.sim.engine import request_service_s

BLOCK = 4096  # a CPU-tier block holds one chunk of this tiny shape


def kv_values(tokens: torch.Tensor) -> torch.Tensor:
    """The KV of each token, shape [n, 2, 8]: a function of the token id alone."""
    base = (tokens * 2654435761 % 65521).to(torch.float32)
    return base[:, None, None] + torch.arange(16, dtype=torch.float32).view(1, 2, 8)


class Outbox:
    """The publisher's source: the events the instance took from its pool, oldest first."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[KVEvent] = []
        self.put = 0

    def push(self, events: list[KVEvent]) -> None:
        with self.lock:
            self.events.extend(events)
            self.put += len(events)

    def take_events(self, max_records: int = 0) -> list[KVEvent]:
        with self.lock:
            out, self.events = self.events, []
        return out


def main() -> int:
    cfg = json.loads(sys.argv[1])
    ct = cfg["chunk_tokens"]
    model = MODEL_PRESETS[cfg["model"]]
    hw = HardwareCost()
    pool = PagedKVPool(
        num_layers=1,
        kv_heads=1,
        head_dim=8,
        num_pages=cfg["gpu_chunks"],
        page_tokens=ct,
        chunk_tokens=ct,
        dtype=torch.float32,
        cpu_bytes=cfg["cpu_chunks"] * BLOCK,
        model_id=cfg.get("model_id", "router-replay"),
        peers=cfg.get("peers"),
    )
    peers = pool.cache.peers if cfg.get("peers") else None
    publish = cfg["events"] == "publish"
    outbox, pub = Outbox(), None
    ready = {"event": "ready", "fingerprint": pool.layout.fingerprint_hex, "model_id": pool.keyer.model_id}
    if peers is not None:
        ready["peer_address"] = "{}:{}".format(*peers.address)
    if publish:
        from kvtier.event_stream import EventPublisher

        pub = EventPublisher(outbox, "tcp://127.0.0.1:*", interval_s=0.002, block_size=ct)
        ready["endpoint"] = pub.endpoint
    out = sys.stdout

    def reply(obj) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    reply(ready)
    for line in sys.stdin:
        msg = json.loads(line)
        op = msg["op"]
        if op == "stop":
            break
        if op == "stats":
            reply({"stats": pool.stats(), "publisher": pub.stats() if pub else None})
            continue
        if op == "digest":
            st = peers.stats()
            reply({"node_id": st["node_id"], "digest": st["digest"], "seen": peers.digest_versions()})
            continue
        if op == "subscribed":
            joined = pub.wait_for_subscribers(1, msg.get("timeout_s", 30.0))
            outbox.push(pool.take_events())
            reply({"joined": joined, "published": outbox.put})
            continue
        tokens = msg["tokens"]
        before = pool.stats()
        pulled = peers.stats().get("chunks_pulled", 0) if peers is not None else 0
        seq = pool.begin(tokens)
        seq.wait()
        ids = torch.tensor(tokens, dtype=torch.int64)
        pages = torch.tensor(seq.page_table, dtype=torch.int64)
        pos = torch.arange(len(tokens))
        page, off = pages[pos // ct], pos % ct
        view = pool.kv[:, 0, :, :, 0, :]  # [pages, 2, page_tokens, dim]
        c = seq.cached_tokens
        wrong = int((view[page[:c], :, off[:c], :] != kv_values(ids[:c])).any(dim=(1, 2)).sum())
        view[page[c:], :, off[c:], :] = kv_values(ids[c:])
        pool.commit(seq, tokens)
        pool.release(seq)
        after = pool.stats()
        peer = peers.stats().get("chunks_pulled", 0) - pulled if peers is not None else 0
        b = SimpleNamespace(
            gpu_hits=after["gpu_hit_chunks"] - before["gpu_hit_chunks"],
            lower_hits=after["lower_hit_chunks"] - before["lower_hit_chunks"],
            offloaded=after["offloaded_chunks"] - before["offloaded_chunks"],
            disk_hits=0,
            critical_writebacks=0,
            load_writebacks=0,
            load_disk_writes=0,
            split_head=0,
            peer_same_host=0,
        )
        service = request_service_s(hw, model, ct, ct * model.kv_bytes_per_token, b, len(tokens), peer)
        evs = pool.take_events()
        r = {"gpu": b.gpu_hits, "cpu": b.lower_hits - peer, "peer": peer, "wrong_tokens": wrong, "service_s": service}
        if publish:
            outbox.push(evs)
            r["published"] = outbox.put
        else:
            r["events"] = [event_to_json(e) for e in evs]
        reply(r)
    if pub is not None:
        pub.close()
    pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
