"""kvtier.router on synthetic KV events: the per-instance views, the load it keeps, the decision
(the policies of kvtier.routing through the simulator's Dispatcher) and the TCP service."""

from __future__ import annotations

import re
import subprocess
import sys
import threading

import pytest
from kvtier.errors import DeadlineExceededError, InvalidArgumentError, NotFoundError
from kvtier.events import KVEvent
from kvtier.keys import ChunkKeyer
from kvtier.router import (
    InstanceView,
    Router,
    RouterClient,
    RouterService,
    default_cost,
    event_from_json,
    event_to_json,
    parse_endpoints,
)
from kvtier.routing import LinearPrefixCost

CT = 16
KEYER = ChunkKeyer("router-test", b"\x03" * 16, chunk_tokens=CT)
PROMPT = list(range(10 * CT + 5))  # 10 full chunks and a tail
KEYS = KEYER.keys(PROMPT)


def ev(kind, medium, keys=(), ts=0.0):
    return KVEvent(kind, medium, tuple(keys), ts)


def test_view_counts_the_gpu_run_then_the_lower_run():
    v = InstanceView()
    v.apply(ev("stored", "gpu", KEYS[:3]))
    v.apply(ev("stored", "cpu", KEYS[:6]))
    v.apply(ev("stored", "disk", KEYS[6:8]))
    assert v.prefix(KEYS) == {"gpu": 3, "cpu": 3, "disk": 2}
    v.apply(ev("removed", "gpu", KEYS[1:2]))  # the GPU run ends at 1; CPU holds 1..5
    assert v.prefix(KEYS) == {"gpu": 1, "cpu": 5, "disk": 2}
    v.apply(ev("removed", "cpu", KEYS[4:5]))
    assert v.prefix(KEYS) == {"gpu": 1, "cpu": 3}
    v.apply(ev("cleared", "cpu"))
    assert v.prefix(KEYS) == {"gpu": 1}
    assert v.counts() == {"gpu": 2, "cpu": 0, "disk": 2}
    assert v.events == 6
    v.apply(ev("removed", "gpu", KEYS[:1]))  # a removal of a chunk not held is no error
    v.apply(ev("removed", "gpu", KEYS[:1]))
    assert v.prefix(KEYS) == {}


def test_a_chunk_in_gpu_and_cpu_after_the_gpu_run_counts_as_cpu():
    v = InstanceView()
    v.apply(ev("stored", "gpu", [KEYS[0], KEYS[2]]))
    v.apply(ev("stored", "cpu", KEYS[1:4]))
    assert v.prefix(KEYS) == {"gpu": 1, "cpu": 3}


def test_kv_load_routes_to_the_instance_holding_the_prefix():
    r = Router(["a", "b", "c"], KEYER)
    r.apply("b", ev("stored", "gpu", KEYS[:8]))
    r.apply("c", ev("stored", "cpu", KEYS[:4]))
    d = r.route(PROMPT, now=0.0)
    assert (d.instance, d.index, d.prefix) == ("b", 1, {"gpu": 8})
    assert d.estimate_s > 0 and d.queued_s == 0.0
    # b is now busy for its estimate; a cold prompt goes elsewhere
    cold = [7] * (4 * CT)
    assert r.route(cold, now=0.0).instance != "b"


def test_load_follows_estimates_then_reports():
    cost = LinearPrefixCost(recompute_chunk_s=0.01)  # no request_s: estimates are 0
    r = Router(["a", "b"], KEYER, policy="least_loaded", cost=cost)
    d = r.route(PROMPT, now=0.0)
    assert d.estimate_s == 0.0
    assert r.done(d.request_id, service_s=2.0) == d.instance
    assert r.queued_s(now=0.5)[d.index] == pytest.approx(1.5)
    d2 = r.route(PROMPT, now=0.5)
    assert d2.index != d.index  # the other is idle
    r.report_load(d.instance, 0.0, now=0.5)
    assert r.queued_s(now=0.5) == [0.0, 0.0]
    assert r.pending() == 1
    r.done(d2.request_id, now=0.75)  # ended at 0.75, without a reported service
    assert r.pending() == 0 and r.queued_s(now=0.75) == [0.0, 0.0]


def test_done_corrects_the_estimate_of_a_queued_request():
    r = Router(["a"], KEYER, cost=default_cost(CT))
    d1 = r.route(PROMPT, now=0.0)
    d2 = r.route(PROMPT, now=0.0)  # queued behind d1
    assert d2.queued_s == pytest.approx(d1.estimate_s)
    r.done(d1.request_id, service_s=d1.estimate_s + 1.0)
    assert r.queued_s(now=0.0)[0] == pytest.approx(d1.estimate_s + 1.0 + d2.estimate_s)


def test_round_robin_and_a_callable_policy():
    r = Router(["a", "b", "c"], KEYER, policy="round_robin")
    assert [r.route(PROMPT, now=0.0).instance for _ in range(4)] == ["a", "b", "c", "a"]
    seen = []

    def last_with_gpu(req, cands):
        seen.append([c.prefix for c in cands])
        return len(cands) - 1

    r = Router(["a", "b"], KEYER, policy=last_with_gpu)
    r.apply("a", ev("stored", "gpu", KEYS[:2]))
    assert r.route(PROMPT, now=0.0).instance == "b"
    assert seen == [[{"gpu": 2}, {}]]


def test_bad_input_raises_typed_errors_naming_the_value():
    with pytest.raises(InvalidArgumentError, match="names repeat"):
        Router(["a", "a"], KEYER)
    with pytest.raises(InvalidArgumentError, match="at least one"):
        Router([], KEYER)
    with pytest.raises(InvalidArgumentError, match="ChunkKeyer"):
        Router(["a"], "keyer")
    with pytest.raises(InvalidArgumentError, match="unknown policy 'nope'"):
        Router(["a"], KEYER, policy="nope")
    r = Router(["a", "b"], KEYER)
    with pytest.raises(NotFoundError, match="'z'"):
        r.apply("z", ev("stored", "gpu", KEYS[:1]))
    with pytest.raises(InvalidArgumentError, match="KVEvent"):
        r.apply("a", {"kind": "stored"})
    with pytest.raises(InvalidArgumentError, match=r"tokens\[1\] = -3"):
        r.route([1, -3], now=0.0)
    with pytest.raises(InvalidArgumentError, match="now"):
        r.route(PROMPT, now="soon")
    with pytest.raises(NotFoundError, match="request_id 99"):
        r.done(99)
    with pytest.raises(InvalidArgumentError, match="service_s"):
        r.done(r.route(PROMPT, now=0.0).request_id, service_s=-1)
    with pytest.raises(InvalidArgumentError, match="queued_s"):
        r.report_load("a", -1.0)
    with pytest.raises(InvalidArgumentError, match="NAME=ENDPOINT"):
        parse_endpoints(["a:tcp://x"])
    with pytest.raises(InvalidArgumentError, match="named twice"):
        parse_endpoints(["a=tcp://x", "a=tcp://y"])
    assert parse_endpoints(["a=tcp://x:1", "b=tcp://y:2"]) == {"a": "tcp://x:1", "b": "tcp://y:2"}


def test_wait_events_has_a_deadline():
    r = Router(["a"], KEYER)
    with pytest.raises(DeadlineExceededError, match="0 events applied"):
        r.wait_events("a", 1, 0.05)
    t = threading.Timer(0.05, r.apply, ("a", ev("stored", "cpu", KEYS[:1])))
    t.start()
    r.wait_events("a", 1, 10.0)
    t.join()


def test_events_round_trip_as_json():
    e = ev("stored", "disk", KEYS[:3], ts=1.5)
    assert event_from_json(event_to_json(e)) == e
    with pytest.raises(InvalidArgumentError, match="hex"):
        event_from_json({"kind": "stored", "medium": "gpu", "keys": ["zz"]})
    with pytest.raises(InvalidArgumentError, match="'tape'"):
        event_from_json({"kind": "stored", "medium": "tape", "keys": []})


class FakeSubscriber:
    """The subscriber seam: ``poll(timeout_s) -> [(instance, KVEvent)]``."""

    def __init__(self) -> None:
        self.queue = []
        self.lock = threading.Lock()

    def push(self, name, event) -> None:
        with self.lock:
            self.queue.append((name, event))

    def poll(self, timeout_s):
        with self.lock:
            out, self.queue = self.queue, []
        if not out:
            threading.Event().wait(min(timeout_s, 0.01))
        return out


def test_service_routes_over_tcp_with_events_from_a_subscriber():
    sub = FakeSubscriber()
    svc = RouterService(Router(["a", "b"], KEYER), subscriber=sub, poll_s=0.01).start()
    try:
        c = RouterClient(svc.address, timeout_s=10.0)
        sub.push("b", ev("stored", "gpu", KEYS[:6]))
        assert c.call(op="sync", instance="b", events=1, timeout_s=10) == {"events": 1}
        d = c.call(tokens=PROMPT, now=0.0)
        assert d["instance"] == "b" and d["prefix"] == {"gpu": 6}
        assert c.call(op="done", request_id=d["request_id"], service_s=0.5) == {"instance": "b"}
        pushed = c.call(op="apply", instance="a", events=[event_to_json(ev("stored", "cpu", KEYS[:2]))])
        assert pushed == {"events": 1}
        st = c.call(op="state", now=0.25)
        assert st["a"]["chunks"]["cpu"] == 2 and st["b"]["queued_s"] == pytest.approx(0.25)
        assert c.call(op="load", instance="a", queued_s=3.0, now=0.25) == {}
        # bad requests: a typed error naming the value; the connection stays usable
        assert c.call(tokens=[1, 2.5])["error"] == "InvalidArgumentError"
        assert "'tokens'" in c.call(op="route")["message"]
        assert c.call(op="fly")["message"].startswith("op 'fly'")
        assert c.call(op="done", request_id=12345)["error"] == "NotFoundError"
        late = c.call(op="sync", instance="a", events=5, timeout_s=0.05)
        assert late["error"] == "DeadlineExceededError"
        assert c.call(op="sync", instance="a", events=1, timeout_s=0)["error"] == "InvalidArgumentError"
        assert "not JSON" in svc.handle_line(b"not json\n")["message"]
        assert svc.handle_line(b"[1, 2]\n")["error"] == "InvalidArgumentError"
        c.close()
    finally:
        svc.close()


def run_route(*argv: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kvtier.cli", "route", "--listen", "127.0.0.1:0", "--duration", "0.2", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_cli_serves_for_its_duration_and_names_bad_flags():
    keyer = ["--model-id", "m", "--layout-fingerprint", "0a" * 16, "--chunk-tokens", "16"]
    ok = run_route("--instance", "a", "--instance", "b", *keyer)
    assert ok.returncode == 0, ok.stderr
    assert re.match(r"kvtier route: listening on 127\.0\.0\.1:\d+ \(instances a, b; policy kv_load\)", ok.stdout)
    bad = run_route("--instance", "a", "--model-id", "m", "--layout-fingerprint", "zz")
    assert bad.returncode == 2 and "'zz'" in bad.stderr and "Traceback" not in bad.stderr
    twice = run_route("--instance", "a=tcp://127.0.0.1:1", "--instance", "a=tcp://127.0.0.1:2", *keyer)
    assert twice.returncode == 2 and "names repeat: ['a', 'a']" in twice.stderr
    listen = run_route("--instance", "a", *keyer, "--listen", "nowhere")
    assert listen.returncode == 2 and "'nowhere'" in listen.stderr
