"""A trace replayed through kvtier's reference router (``kvtier route``, a process) and real kvtier
instances (processes: tests/router_instance.py, a PagedKVPool over a CPU tier each), against the
simulator on the same trace and configuration: the same instance for every request, and the same
hits per instance and tier.

With peers, the instances share their CPU tiers over kvtier.p2p on loopback (each begin pulls
what the others hold after its own hits), the router counts and prices those pulls
(``kvtier route --peers``) and the simulator runs with ``peers``. Between requests the test waits
until every member's digest is flushed and known to the others at its latest version (and the
router has every event), so what a lookup finds is what the tiers hold, as in the simulator;
with two instances each has one peer, so where a chunk is pulled from (whose LRU order the pull
refreshes) is not a choice.

The trace is the hot-prefix generator's (Zipf-popular system prompts, multi-turn sessions) at
80% of the cluster's cold-prefill capacity, so kv_load weighs prefixes against queues. Each chunk
id becomes CT token ids (the simulator's chunk of CT tokens); capacities are in chunks, small
enough that both tiers evict. Time is the trace's clock: the router is told each arrival, and each
instance reports the service seconds the simulator's cost model prices from its own hits and
offloads, so the router's load, like its view of the KV, follows the engine, not wall time. The
decision is then the same code in both (kvtier.routing.Dispatcher) on the same inputs, and the
test asserts equality.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("torch")

from kvtier.router import RouterClient
from kvtier.sim import MODEL_PRESETS, HardwareCost, SimConfig, Simulator
from kvtier.sim.hot_prefix import HotPrefix, hot_prefix_at_load

pytestmark = pytest.mark.multiproc

HERE = Path(__file__).resolve().parent
CT = 16  # tokens a chunk, in the engine and the simulator
INSTANCES = 3
GPU_CHUNKS = 64  # per instance
CPU_CHUNKS = 128
REQUESTS = 300
LOAD = 0.8
MODEL = "llama3_8b"  # the cost model's shape (the engine's KV is a tiny one)
TAIL_BASE = 1 << 30  # token ids of partial last chunks: never in a full chunk
SHAPE = HotPrefix(
    system_prompts=6,
    system_tokens=256,
    first_tokens=64,
    turn_tokens=48,
    output_tokens=32,
    turns_mean=4.0,
    max_tokens=640,
)


PEER_INSTANCES = 2
# kv_load's earliest-first-token form (balance 1, no slack) with peers: queues count from the
# first second, so some requests go to the idle instance that would pull the prefix.
PEER_BALANCE, PEER_SLACK_S = 1.0, 0.0
PEERS = {  # loopback members; failure detection slow enough that a busy machine never drops one
    "secret": "router-replay-secret-0123456789",
    "listen": "127.0.0.1:0",
    "gossip_interval_s": 0.02,
    "ack_timeout_s": 1.0,
    "suspicion_mult": 10000.0,
    "request_timeout_s": 20.0,
    "digest_rebuild_s": 3600.0,
}


def sim_config() -> SimConfig:
    model = MODEL_PRESETS[MODEL]
    chunk = CT * model.kv_bytes_per_token
    return SimConfig(
        model=model,
        chunk_tokens=CT,
        page_tokens=CT,
        gpu_bytes=GPU_CHUNKS * chunk,
        cpu_bytes=CPU_CHUNKS * -(-chunk // 4096) * 4096,
        instances=INSTANCES,
        routing="kv_load",
        hardware=HardwareCost(),
    )


def tokens_of(i: int, req) -> list[int]:
    toks = [c * CT + j for c in req.chunks for j in range(CT)]
    toks.extend((TAIL_BASE + i * CT + j) % (1 << 31) for j in range(req.input_length - len(toks)))
    return toks


class Proc:
    """A child process answering JSON lines; every read has a deadline."""

    def __init__(self, tmp_path, name: str, argv: list[str]) -> None:
        self.name = name
        self.log_path = tmp_path / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
        self._buf = b""

    def readline(self, timeout: float) -> bytes:
        end = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no line in {timeout}s; log:\n{self.log()}")
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise EOFError(f"{self.name} exited; log:\n{self.log()}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def call(self, timeout: float = 30.0, **msg) -> dict:
        self.proc.stdin.write((json.dumps(msg) + "\n").encode())
        self.proc.stdin.flush()
        out = json.loads(self.readline(timeout))
        assert "error" not in out, f"{self.name}: {out}"
        return out

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b'{"op": "stop"}\n')
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass  # a pipe the child closed first
        self._log.close()


def start_instances(tmp_path, events: str, instances: int, peers: bool, insts: dict[str, Proc]) -> dict[str, dict]:
    """Start the instance processes (into ``insts``, so that the caller stops those started if
    one fails) and return their ready lines; with peers, each after the first seeds its peer
    service with the first's address."""
    ready = {}
    seeds: list[str] = []
    for k in range(instances):
        name = f"i{k}"
        conf = {"name": name, "gpu_chunks": GPU_CHUNKS, "cpu_chunks": CPU_CHUNKS, "chunk_tokens": CT, "model": MODEL}
        conf["events"] = events
        if peers:
            conf["peers"] = {**PEERS, "node_id": name, "seeds": seeds}
        insts[name] = Proc(tmp_path, name, [sys.executable, str(HERE / "router_instance.py"), json.dumps(conf)])
        if peers and not seeds:
            ready[name] = json.loads(insts[name].readline(120.0))
            seeds = [ready[name]["peer_address"]]
    for name, p in insts.items():
        if name not in ready:
            ready[name] = json.loads(p.readline(120.0))
    return ready


def wait_digests(insts: dict[str, Proc], timeout: float = 30.0) -> None:
    """Until every member's digest holds all it has noted (nothing pending) and every other
    member has it at that (generation, version): a lookup then finds what the tiers hold."""
    end = time.monotonic() + timeout
    while True:
        d = {n: p.call(op="digest") for n, p in insts.items()}
        own = {r["node_id"]: r["digest"] for r in d.values()}
        behind = [
            (n, o)
            for n, r in d.items()
            for o, g in own.items()
            if o != r["node_id"]
            and (g["version"] or g["pending"])
            and r["seen"].get(o) != [g["generation"], g["version"]]
        ]
        if not behind and not any(g["pending"] for g in own.values()):
            return
        if time.monotonic() > end:
            raise TimeoutError(f"digests not in step after {timeout}s: {behind}; {d}")
        time.sleep(0.005)


def start_router(tmp_path, ready: dict[str, dict], policy: str, peers: bool) -> tuple[Proc, tuple[str, int]]:
    """``kvtier route`` subscribed to each instance's endpoint (or, without one, fed by ``apply``)."""
    argv = [sys.executable, "-m", "kvtier.cli", "route", "--listen", "127.0.0.1:0", "--duration", "300"]
    argv += [f"--instance={n}" + (f"={r['endpoint']}" if "endpoint" in r else "") for n, r in ready.items()]
    first = next(iter(ready.values()))
    argv += ["--model-id", first["model_id"], "--layout-fingerprint", first["fingerprint"]]
    argv += ["--chunk-tokens", str(CT), "--model", MODEL, "--routing", policy]
    if peers:
        argv += ["--peers", "--balance", str(PEER_BALANCE), "--queue-slack", str(PEER_SLACK_S)]
    router = Proc(tmp_path, "router", argv)
    line = router.readline(60.0).decode()
    m = re.search(r"listening on ([\d.]+):(\d+)", line)
    assert m, line
    return router, (m.group(1), int(m.group(2)))


def replay(reqs, insts: dict[str, Proc], client: RouterClient, peers: bool) -> tuple[list[int], list[dict]]:
    names = list(insts)
    routes, hits = [], [{"requests": 0, "gpu": 0, "cpu": 0, "peer": 0} for _ in names]
    for i, req in enumerate(reqs):
        toks = tokens_of(i, req)
        d = client.call(tokens=toks, now=req.arrival_s)
        assert "error" not in d, d
        inst = insts[d["instance"]]
        r = inst.call(op="serve", tokens=toks)
        assert r["wrong_tokens"] == 0, (i, r)
        if "published" in r:  # on the event stream: the router has them all before the next route
            synced = client.call(op="sync", instance=inst.name, events=r["published"], timeout_s=30)
        else:
            synced = client.call(op="apply", instance=inst.name, events=r["events"])
        assert "error" not in synced, synced
        if peers:
            wait_digests(insts)
        assert client.call(op="done", request_id=d["request_id"], service_s=r["service_s"]) == {"instance": inst.name}
        k = names.index(inst.name)
        routes.append(k)
        hits[k]["requests"] += 1
        hits[k]["gpu"] += r["gpu"]
        hits[k]["cpu"] += r["cpu"]
        hits[k]["peer"] += r["peer"]
    return routes, hits


@pytest.mark.parametrize(
    ("policy", "events", "peers"),
    [("kv_load", "publish", False), ("least_loaded", "reply", False), ("kv_load", "reply", True)],
    ids=["kv_load-stream", "least_loaded-apply", "kv_load-peers"],
)
def test_router_and_instances_match_the_simulator(tmp_path, policy, events, peers):
    """``events``: ``publish``, each instance's EventPublisher to the router's EventSubscriber
    (vLLM's KV-event stream over ZMQ); ``reply``, each request's events in the instance's reply,
    handed to the router with its ``apply`` op. ``peers``: the instances share their CPU tiers
    over loopback (kvtier.p2p), the router prices pulls, the simulator has ``peers``."""
    if events == "publish":
        pytest.importorskip("kvtier.event_stream", reason="the event stream needs pyzmq and msgspec (kvtier[events])")
    instances = PEER_INSTANCES if peers else INSTANCES
    cfg = replace(sim_config(), routing=policy, instances=instances, peers=peers)
    if peers:
        cfg = replace(cfg, routing_balance=PEER_BALANCE, routing_slack_s=PEER_SLACK_S)
    reqs = hot_prefix_at_load(REQUESTS, LOAD, cfg, seed=5, config=SHAPE)
    assert max(len(r.chunks) for r in reqs) < GPU_CHUNKS  # every prompt fits a pool
    sim = Simulator(cfg).run(reqs)

    insts: dict[str, Proc] = {}
    router = None
    try:
        ready = start_instances(tmp_path, events, instances, peers, insts)
        router, address = start_router(tmp_path, ready, policy, peers)
        client = RouterClient(address, timeout_s=30.0)
        if events == "publish":  # a ZMQ subscriber misses what is sent before it joins
            for n, p in insts.items():
                joined = p.call(op="subscribed", timeout_s=30.0)
                assert joined["joined"], f"{n}: the router never subscribed"
                assert "error" not in client.call(op="sync", instance=n, events=joined["published"], timeout_s=30)
        if peers:
            wait_digests(insts)
        routes, hits = replay(reqs, insts, client, peers)
        state = client.call(op="state")
        client.close()
        stats = {n: p.call(op="stats") for n, p in insts.items()}
    finally:
        for p in insts.values():
            p.stop()
        if router is not None:
            router.proc.terminate()
            router.stop()

    sim_hits = [{k: d[k] for k in ("requests", "gpu", "cpu", "peer")} for d in sim.per_instance]
    print("per instance (requests, gpu, cpu and peer hits): sim", sim_hits, "real", hits)
    print("hit ratio: sim", round(sim.hit_ratio(), 4), "chunks", sim.chunks)
    # both tiers evicted, and every instance served
    pool = {n: s["stats"] for n, s in stats.items()}
    assert all(s["evicted_chunks"] > 0 and s["lower"]["index"]["evictions"] > 0 for s in pool.values()), pool
    if events == "publish":  # nothing refused by a socket, every event read
        assert all(s["publisher"]["send_refused"] == 0 for s in stats.values()), stats
        assert {n: st["events"] for n, st in state.items()} == {n: s["publisher"]["events"] for n, s in stats.items()}
    assert all(h["requests"] > REQUESTS // 10 for h in hits)
    if peers:  # pulls happened, on every instance, and nothing failed
        assert all(h["peer"] > 0 for h in hits), hits
        assert all(not s["stats"]["lower"]["peers"].get("chunks_pull_failed") for s in stats.values()), stats
    assert all(st["events"] > 0 for st in state.values())
    assert routes == sim.routes
    assert hits == sim_hits
