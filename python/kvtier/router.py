"""kvtier's reference router: which instance serves a prompt, from the KV events the instances
publish and the work the router sent them.

A :class:`Router` keeps, per instance, only what events say (chunk key -> the media holding it:
``gpu``, ``cpu``, ``disk``; :mod:`kvtier.events`) and its load: the requests it routed there
and not yet finished, each priced in seconds by a cost model, corrected by what the instance
reports when the request is done (or by a load the instance reports itself). ``route(tokens)``
keys the prompt with the instances' :class:`~kvtier.keys.ChunkKeyer`, counts the leading chunks
each instance holds by tier, and asks a policy of :mod:`kvtier.routing` through the same
:class:`~kvtier.routing.Dispatcher` the simulator routes with, so that a router and a simulator
that see the same state make the same decision.

Time is the caller's clock: pass ``now`` (seconds, e.g. a trace's arrival times, which makes the
load accounting deterministic) or leave it out for the wall clock since the router started.

Example::

    from kvtier.events import KVEvent
    from kvtier.keys import ChunkKeyer
    from kvtier.router import Router

    keyer = ChunkKeyer("my-model", b"\\x01" * 16, chunk_tokens=256)
    prompt = list(range(2048))     # 8 chunks
    r = Router(["a", "b"], keyer)
    r.apply("b", KVEvent("stored", "gpu", tuple(keyer.keys(prompt)[:4]), ts=0.0))
    d = r.route(prompt, now=0.0)   # d.instance == "b": four chunks it need not recompute
    r.done(d.request_id, service_s=0.05)

:class:`RouterService` serves a router on TCP (``kvtier route``; docs/router.md).
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kvtier.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    KVTierError,
    NotFoundError,
)
from kvtier.events import CLEARED, CPU, DISK, GPU, MEDIA, STORED, KVEvent
from kvtier.keys import ChunkKeyer
from kvtier.routing import DEFAULT_BALANCE, DEFAULT_SLACK_S, Dispatcher, RouteRequest, bind_policy

__all__ = [
    "InstanceView",
    "Routed",
    "Router",
    "RouterClient",
    "RouterService",
    "default_cost",
    "event_from_json",
    "event_to_json",
    "open_subscriber",
    "parse_endpoints",
]


class InstanceView:
    """Where one instance holds chunks, as its events say: chunk key -> set of media."""

    def __init__(self) -> None:
        self.media: dict[bytes, set[str]] = {}
        self.events = 0  # events applied

    def apply(self, event: KVEvent) -> None:
        m = event.medium
        if event.kind == CLEARED:
            for k in [k for k, s in self.media.items() if m in s]:
                self._drop(k, m)
        elif event.kind == STORED:
            for k in event.keys:
                self.media.setdefault(k, set()).add(m)
        else:
            for k in event.keys:
                self._drop(k, m)
        self.events += 1

    def _drop(self, key: bytes, medium: str) -> None:
        s = self.media.get(key)
        if s is not None:
            s.discard(medium)
            if not s:
                del self.media[key]

    def prefix(self, keys: Sequence[bytes]) -> dict:
        """Leading chunks of ``keys`` held here, by tier, as the instance's ``begin`` finds them:
        the GPU pages' run first, then the run held in the CPU tier or on disk after it (a chunk
        in both counts as ``cpu``)."""
        media = self.media
        n = len(keys)
        g = 0
        while g < n and GPU in media.get(keys[g], ()):
            g += 1
        cpu = disk = 0
        i = g
        while i < n:
            s = media.get(keys[i], ())
            if CPU in s:
                cpu += 1
            elif DISK in s:
                disk += 1
            else:
                break
            i += 1
        return {t: c for t, c in ((GPU, g), (CPU, cpu), (DISK, disk)) if c}

    def serves(self, key: bytes, media: tuple[str, ...]) -> bool:
        """Whether this instance holds ``key`` in one of ``media`` (what it serves its peers)."""
        s = self.media.get(key)
        return s is not None and any(m in s for m in media)

    def counts(self) -> dict:
        """Chunks held per medium."""
        out = dict.fromkeys(MEDIA, 0)
        for s in self.media.values():
            for m in s:
                out[m] += 1
        return out


@dataclass(frozen=True)
class Routed:
    """A decision: the instance (name and index), the request's id for :meth:`Router.done`, the
    prefix the instance holds by tier, its queued seconds and the priced service seconds."""

    instance: str
    index: int
    request_id: int
    prefix: dict = field(default_factory=dict)
    queued_s: float = 0.0
    estimate_s: float = 0.0


def default_cost(chunk_tokens: int, model: str = "llama3_8b", hardware=None):
    """The simulator's cost model (``kvtier.sim``'s :class:`SimPrefixCost`) for ``model`` (a
    preset name of ``kvtier.sim.MODEL_PRESETS`` or a ModelShape) and ``hardware`` (a
    HardwareCost; default: its uncalibrated rates)."""
    from kvtier.sim.cost import MODEL_PRESETS, HardwareCost
    from kvtier.sim.engine import SimPrefixCost

    if isinstance(model, str):
        if model not in MODEL_PRESETS:
            raise InvalidArgumentError(f"model: unknown preset {model!r} (known: {sorted(MODEL_PRESETS)})")
        model = MODEL_PRESETS[model]
    hw = hardware if hardware is not None else HardwareCost()
    return SimPrefixCost(hw, model, chunk_tokens, chunk_tokens * model.kv_bytes_per_token)


class Router:
    """Routes prompts among named instances from their KV events and the load it knows.

    Args:
        instances: the instances' names, in order (a policy's indices follow it).
        keyer: the instances' chunk keyer (same model id, layout fingerprint, chunk size, salt).
        policy: a name of ``kvtier.routing.POLICIES`` (default ``kv_load``), a RoutingPolicy or
            a callable ``f(request, candidates) -> index``.
        balance, slack_s: kv_load's weight of queued seconds and the queue (seconds beyond the
            shortest) that counts as none (kvtier.routing.KvLoad; the simulator's defaults).
        cost: prices a cached prefix (``saved_s(num_tokens, prefix)``) for kv_load and, with a
            ``request_s(num_tokens, prefix)``, a routed request's service; default
            :func:`default_cost` for the keyer's chunk size.
        peers: the instances share their CPU tiers as peers (kvtier.p2p, ``PagedKVPool(peers=...)``):
            after an instance's own run of a prompt's chunks, the run that other instances hold
            in their CPU tiers (and on disk, with ``peer_disk``) counts as its ``peer`` prefix,
            what its ``begin`` would pull; the cost model prices the pulls. As ``kvtier sim
            --peers [--peer-disk]``.

    Thread-safe: one lock guards the views and the load.
    """

    def __init__(
        self,
        instances: Sequence[str],
        keyer: ChunkKeyer,
        policy="kv_load",
        *,
        balance: float = DEFAULT_BALANCE,
        slack_s: float = DEFAULT_SLACK_S,
        cost=None,
        peers: bool = False,
        peer_disk: bool = False,
    ) -> None:
        names = list(instances)
        if not names:
            raise InvalidArgumentError("instances: a router needs at least one instance")
        for n in names:
            if not isinstance(n, str) or not n:
                raise InvalidArgumentError(f"instances: each name is a non-empty str, got {n!r}")
        if len(set(names)) != len(names):
            raise InvalidArgumentError(f"instances: names repeat: {names}")
        if not isinstance(keyer, ChunkKeyer):
            raise InvalidArgumentError(f"keyer must be a kvtier.keys.ChunkKeyer, got {type(keyer).__name__}")
        for flag, v in (("peers", peers), ("peer_disk", peer_disk)):
            if not isinstance(v, bool):
                raise InvalidArgumentError(f"{flag} must be True or False, got {v!r}")
        self.names = names
        self.keyer = keyer
        self.peer_media: tuple[str, ...] = ((CPU, DISK) if peer_disk else (CPU,)) if peers else ()
        self.cost = cost if cost is not None else default_cost(keyer.chunk_tokens)
        self.policy = bind_policy(policy, balance=balance, slack_s=slack_s, cost=self.cost)
        self._index = {n: i for i, n in enumerate(names)}
        self.views = [InstanceView() for _ in names]
        self._dispatch = Dispatcher(self.policy, len(names))
        self._free_at = [0.0] * len(names)  # when each instance's queue empties, on the caller's clock
        self._pending: dict[int, tuple[int, float, float]] = {}  # request id -> (instance, start, estimate)
        self._next_id = 0
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        self._applied = threading.Condition(self._lock)

    # -- state from events ---------------------------------------------------------------------
    def index_of(self, instance: str) -> int:
        i = self._index.get(instance)
        if i is None:
            raise NotFoundError(f"instance {instance!r} is not one of the router's ({', '.join(self.names)})")
        return i

    def apply(self, instance: str, event: KVEvent) -> None:
        """Update ``instance``'s view with one event."""
        if not isinstance(event, KVEvent):
            raise InvalidArgumentError(f"event must be a kvtier.events.KVEvent, got {type(event).__name__}")
        i = self.index_of(instance)
        with self._lock:
            self.views[i].apply(event)
            self._applied.notify_all()

    def apply_all(self, events: Iterable[tuple[str, KVEvent]]) -> int:
        """Apply ``(instance, event)`` pairs (what an event subscriber's ``poll`` returns)."""
        n = 0
        for name, ev in events:
            self.apply(name, ev)
            n += 1
        return n

    def events_applied(self, instance: str) -> int:
        return self.views[self.index_of(instance)].events

    def wait_events(self, instance: str, count: int, timeout_s: float) -> None:
        """Block until ``count`` events of ``instance`` have been applied (another thread
        applies them); raises DeadlineExceededError after ``timeout_s``."""
        i = self.index_of(instance)
        end = time.monotonic() + timeout_s
        with self._lock:
            while self.views[i].events < count:
                left = end - time.monotonic()
                if left <= 0:
                    raise DeadlineExceededError(
                        f"instance {instance!r}: {self.views[i].events} events applied after {timeout_s} s, "
                        f"waiting for {count}"
                    )
                self._applied.wait(left)

    # -- load -----------------------------------------------------------------------------------
    def _clock(self, now: float | None) -> float:
        if now is None:
            return time.monotonic() - self._t0
        if isinstance(now, bool) or not isinstance(now, (int, float)) or now != now:
            raise InvalidArgumentError(f"now must be a number of seconds, got {now!r}")
        return float(now)

    def queued_s(self, now: float | None = None) -> list[float]:
        """Seconds of work queued at each instance at ``now``."""
        t = self._clock(now)
        with self._lock:
            return [max(0.0, f - t) for f in self._free_at]

    def report_load(self, instance: str, queued_s: float, now: float | None = None) -> None:
        """``instance`` says it has ``queued_s`` seconds of work ahead of a new request."""
        if isinstance(queued_s, bool) or not isinstance(queued_s, (int, float)) or not queued_s >= 0:
            raise InvalidArgumentError(f"queued_s must be a number >= 0, got {queued_s!r}")
        i = self.index_of(instance)
        t = self._clock(now)
        with self._lock:
            self._free_at[i] = t + float(queued_s)

    # -- routing --------------------------------------------------------------------------------
    def route(self, tokens, now: float | None = None) -> Routed:
        """The instance that serves a prompt of ``tokens`` (ids) arriving at ``now``; the request
        counts in its load until :meth:`done`."""
        keys = self.keyer.keys(tokens)
        return self.route_keys(keys, len(tokens), now)

    def route_keys(self, keys: Sequence[bytes], num_tokens: int, now: float | None = None) -> Routed:
        """:meth:`route` for a prompt already keyed: its chunk keys and its length in tokens."""
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise InvalidArgumentError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
        t = self._clock(now)
        req = RouteRequest(num_tokens, tuple(keys))
        with self._lock:
            queued = [max(0.0, f - t) for f in self._free_at]
            prefixes: dict[int, dict] = {}

            def prefix_of(i: int) -> dict:
                if i not in prefixes:
                    prefixes[i] = self._prefix(i, keys)
                return prefixes[i]

            i = self._dispatch.pick(req, queued, prefix_of)
            prefix = prefix_of(i)
            est = self._estimate(num_tokens, prefix)
            start = max(t, self._free_at[i])
            self._free_at[i] = start + est
            rid = self._next_id
            self._next_id += 1
            self._pending[rid] = (i, start, est)
        return Routed(self.names[i], i, rid, prefix, queued[i], est)

    def _prefix(self, i: int, keys: Sequence[bytes]) -> dict:
        """Instance ``i``'s prefix of ``keys`` by tier: its own, then (with peers) the run after
        it that some other instance serves, chunk by chunk as a peer lookup assembles it."""
        out = self.views[i].prefix(keys)
        media = self.peer_media
        if media:
            others = [v for j, v in enumerate(self.views) if j != i]
            start = n = sum(out.values())
            while n < len(keys) and any(v.serves(keys[n], media) for v in others):
                n += 1
            if n > start:
                out["peer"] = n - start
        return out

    def _estimate(self, num_tokens: int, prefix: dict) -> float:
        f = getattr(self.cost, "request_s", None)
        return float(f(num_tokens, prefix)) if f is not None else 0.0

    def done(self, request_id: int, service_s: float | None = None, now: float | None = None) -> str:
        """Request ``request_id`` is over: it took ``service_s`` seconds of its instance (what the
        instance measured or priced), or, without it, it ended at ``now``. Its instance's queue
        moves by the difference from the estimate. Returns the instance's name."""
        if service_s is not None and (
            isinstance(service_s, bool) or not isinstance(service_s, (int, float)) or not service_s >= 0
        ):
            raise InvalidArgumentError(f"service_s must be a number >= 0, got {service_s!r}")
        with self._lock:
            rec = self._pending.pop(request_id, None) if isinstance(request_id, int) else None
            if rec is None:
                raise NotFoundError(f"request_id {request_id!r} is not a routed request that is not done")
            i, start, est = rec
            took = float(service_s) if service_s is not None else max(0.0, self._clock(now) - start)
            self._free_at[i] = max(start + took, self._free_at[i] + took - est)
        return self.names[i]

    def pending(self) -> int:
        """Routed requests not yet done."""
        with self._lock:
            return len(self._pending)

    def state(self, now: float | None = None) -> dict:
        """Per instance: chunks held per medium, events applied, queued seconds."""
        q = self.queued_s(now)
        with self._lock:
            return {
                n: {"chunks": v.counts(), "events": v.events, "queued_s": q[i]}
                for i, (n, v) in enumerate(zip(self.names, self.views))
            }


class RouterService:
    """A :class:`Router` on TCP, one JSON object a line each way, and a thread that applies the
    events a subscriber delivers.

    Requests (``op`` defaults to ``route``)::

        {"tokens": [...], "now": 12.5}                 -> {"instance": "a", "request_id": 7, "prefix": {...}, ...}
        {"op": "done", "request_id": 7, "service_s": 0.05}  -> {"instance": "a"}
        {"op": "apply", "instance": "a", "events": [{"kind": "stored", "medium": "gpu",
                                                     "keys": ["<32 hex digits>", ...]}]} -> {"events": n}
        {"op": "load", "instance": "a", "queued_s": 1.5}    -> {}
        {"op": "sync", "instance": "a", "events": 120, "timeout_s": 5} -> {"events": 120}
        {"op": "state"}                                -> {"a": {"chunks": {...}, "events": n, "queued_s": s}, ...}

    A bad request gets ``{"error": "<exception class>", "message": "..."}`` naming the bad value;
    the connection stays open. ``subscriber``: any object with ``poll(timeout_s) -> [(instance,
    KVEvent)]`` (``kvtier.events.EventSubscriber``), or None when events come through
    :meth:`Router.apply` directly.
    """

    def __init__(
        self,
        router: Router,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        subscriber=None,
        *,
        poll_s: float = 0.05,
        idle_timeout_s: float = 300.0,
    ) -> None:
        self.router = router
        self.subscriber = subscriber
        self.poll_s = poll_s
        self.idle_timeout_s = idle_timeout_s
        self.event_error: BaseException | None = None
        self._stop = threading.Event()
        service = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                self.connection.settimeout(service.idle_timeout_s)
                while True:
                    try:
                        line = self.rfile.readline(64 << 20)
                    except (TimeoutError, OSError):
                        return
                    if not line:
                        return
                    reply = service.handle_line(line)
                    try:
                        self.wfile.write((json.dumps(reply) + "\n").encode())
                    except OSError:
                        return

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(listen, Handler)
        self.address = self._server.server_address[:2]
        self._threads = [threading.Thread(target=self._server.serve_forever, name="kvtier-route", daemon=True)]
        if subscriber is not None:
            self._threads.append(threading.Thread(target=self._pump, name="kvtier-route-events", daemon=True))

    def start(self) -> RouterService:
        for t in self._threads:
            t.start()
        return self

    def _pump(self) -> None:
        while not self._stop.is_set():
            try:
                self.router.apply_all(self.subscriber.poll(self.poll_s))
            except Exception as e:  # noqa: BLE001 - reported by the state op and the CLI
                self.event_error = e
                return

    def handle_line(self, line: bytes) -> dict:
        try:
            msg = json.loads(line)
        except ValueError as e:
            return _error(InvalidArgumentError(f"request is not JSON: {e}: {line[:80]!r}"))
        try:
            return self.handle(msg)
        except KVTierError as e:
            return _error(e)

    def handle(self, msg) -> dict:
        """One request (a decoded JSON object) -> its reply."""
        r = self.router
        if not isinstance(msg, dict):
            raise InvalidArgumentError(f"request must be a JSON object, got {msg!r:.80}")
        op = msg.get("op", "route")
        if op == "route":
            tokens = _field(msg, "tokens", list)
            d = r.route(tokens, msg.get("now"))
            return {
                "instance": d.instance,
                "request_id": d.request_id,
                "prefix": d.prefix,
                "queued_s": d.queued_s,
                "estimate_s": d.estimate_s,
            }
        if op == "done":
            return {"instance": r.done(_field(msg, "request_id", int), msg.get("service_s"), msg.get("now"))}
        if op == "apply":
            name = _field(msg, "instance", str)
            events = [event_from_json(e) for e in _field(msg, "events", list)]
            r.index_of(name)
            r.apply_all((name, e) for e in events)
            return {"events": r.events_applied(name)}
        if op == "load":
            r.report_load(_field(msg, "instance", str), _field(msg, "queued_s", (int, float)), msg.get("now"))
            return {}
        if op == "sync":
            name = _field(msg, "instance", str)
            count = _field(msg, "events", int)
            timeout = msg.get("timeout_s", 10.0)
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 600:
                raise InvalidArgumentError(f"timeout_s must be a number of seconds in (0, 600], got {timeout!r}")
            if self.event_error is not None:
                raise KVTierError(f"the event subscriber stopped: {self.event_error!r}")
            r.wait_events(name, count, float(timeout))
            return {"events": r.events_applied(name)}
        if op == "state":
            out = r.state(msg.get("now"))
            if self.event_error is not None:
                out["event_error"] = repr(self.event_error)
            return out
        raise InvalidArgumentError(f"op {op!r} is not one of route, done, apply, load, sync, state")

    def close(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        for t in self._threads[1:]:
            t.join(self.poll_s + 5.0)


def _field(msg: dict, name: str, kind) -> object:
    if name not in msg:
        raise InvalidArgumentError(f"request {msg.get('op', 'route')!r} needs {name!r}")
    v = msg[name]
    if isinstance(v, bool) or not isinstance(v, kind):
        raise InvalidArgumentError(f"{name!r} has the wrong type: {v!r:.80}")
    return v


def event_to_json(ev: KVEvent) -> dict:
    """A KVEvent as a JSON object (keys in hex), the form of the ``apply`` op."""
    return {"kind": ev.kind, "medium": ev.medium, "keys": [k.hex() for k in ev.keys], "ts": ev.ts}


def event_from_json(obj) -> KVEvent:
    """The inverse of :func:`event_to_json`; a bad field raises InvalidArgumentError naming it."""
    if not isinstance(obj, dict):
        raise InvalidArgumentError(f"an event is a JSON object, got {obj!r:.80}")
    keys = obj.get("keys", [])
    if not isinstance(keys, list):
        raise InvalidArgumentError(f"event keys must be a list of hex strings, got {keys!r:.80}")
    try:
        raw = tuple(bytes.fromhex(k) for k in keys)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"event keys must be hex strings, got {keys!r:.80}") from None
    ts = obj.get("ts", 0.0)
    if isinstance(ts, bool) or not isinstance(ts, (int, float)):
        raise InvalidArgumentError(f"event ts must be a number, got {ts!r}")
    return KVEvent(obj.get("kind"), obj.get("medium"), raw, float(ts))


def _error(e: BaseException) -> dict:
    return {"error": type(e).__name__, "message": str(e)}


class RouterClient:
    """A connection to a :class:`RouterService`; every call has a deadline."""

    def __init__(self, address: tuple[str, int], timeout_s: float = 10.0) -> None:
        self._sock = socket.create_connection(address, timeout=timeout_s)
        self._file = self._sock.makefile("rwb")

    def call(self, **msg) -> dict:
        self._file.write((json.dumps(msg) + "\n").encode())
        self._file.flush()
        line = self._file.readline()
        if not line:
            raise KVTierError("the router closed the connection")
        return json.loads(line)

    def close(self) -> None:
        self._file.close()
        self._sock.close()


def parse_endpoints(specs: Sequence[str]) -> dict[str, str]:
    """``NAME=ENDPOINT`` strings -> {name: endpoint}, names unique and in order."""
    out: dict[str, str] = {}
    for s in specs:
        name, sep, ep = s.partition("=")
        if not sep or not name or not ep:
            raise InvalidArgumentError(f"instance {s!r}: expected NAME=ENDPOINT, e.g. a=tcp://127.0.0.1:5557")
        if name in out:
            raise InvalidArgumentError(f"instance {name!r} is named twice")
        out[name] = ep
    return out


def open_subscriber(endpoints: dict[str, str]):
    """The event transport's subscriber for ``{instance: endpoint}`` (None for no endpoints):
    ``poll(timeout_s) -> [(instance, KVEvent)]`` (``kvtier.event_stream.EventSubscriber``: vLLM's
    KV-event stream over ZMQ). The one place the router names the transport."""
    if not endpoints:
        return None
    try:
        from kvtier.event_stream import EventSubscriber
    except ImportError as e:
        raise FailedPreconditionError(
            f"event endpoints need kvtier.event_stream ({e}); name the instances without endpoints "
            "and push their events with the 'apply' op"
        ) from None
    return EventSubscriber(endpoints)


def add_parser(sub) -> None:
    """Register `kvtier route` on the `kvtier` command's subparsers."""
    from kvtier.routing import POLICIES

    p = sub.add_parser(
        "route",
        help="the reference router: pick an instance for each prompt from the instances' KV events and load",
        description="Serve kvtier's reference router on TCP (one JSON object a line: "
        '{"tokens": [...]} -> {"instance": ...}; ops done, apply, load, sync, state; docs/router.md), '
        "keeping each instance's cached chunks from the KV events it publishes.",
    )
    p.add_argument(
        "--instance",
        action="append",
        required=True,
        metavar="NAME[=ENDPOINT]",
        help="an instance, in routing order, and the endpoint its KV events are published on "
        "(without one, its events come through the 'apply' op); repeat for each",
    )
    p.add_argument("--listen", default="127.0.0.1:7600", help="HOST:PORT to serve on (port 0: any free port)")
    p.add_argument("--model-id", required=True, help="the instances' model id (their chunk keys' namespace)")
    p.add_argument(
        "--layout-fingerprint", required=True, help="the instances' layout fingerprint, hex (Layout.fingerprint_hex)"
    )
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--tenant-salt", default=None)
    p.add_argument("--routing", default="kv_load", choices=sorted(POLICIES), help="the policy (default kv_load)")
    p.add_argument(
        "--balance", type=float, default=DEFAULT_BALANCE, help="kv_load: weight of queued seconds (as kvtier sim's)"
    )
    p.add_argument(
        "--queue-slack",
        type=float,
        default=DEFAULT_SLACK_S,
        help="kv_load: seconds of queue beyond the shortest one that count as none (as kvtier sim's)",
    )
    p.add_argument("--model", default="llama3_8b", help="model preset of the cost model (kvtier sim's --model)")
    p.add_argument("--calibrate", default=None, metavar="DIR", help="price with bench results in DIR, as kvtier sim")
    p.add_argument(
        "--peers",
        action="store_true",
        help="the instances pull missing chunks from each other's CPU tiers (kvtier.p2p): count and price those "
        "pulls, as kvtier sim --peers",
    )
    p.add_argument("--peer-disk", action="store_true", help="with --peers: peers also serve their disk tier")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: until killed)")
    p.set_defaults(func=_cmd_route)


def _cmd_route(args) -> int:
    import signal
    import sys

    try:
        names, endpoints = [], {}
        for spec in args.instance:
            name, sep, _ = spec.partition("=")
            names.append(name)
            if sep:
                endpoints.update(parse_endpoints([spec]))
        host, sep, port = args.listen.rpartition(":")
        if not sep or not port.isdigit():
            raise InvalidArgumentError(f"--listen must be HOST:PORT, got {args.listen!r}")
        keyer = ChunkKeyer(args.model_id, args.layout_fingerprint, args.chunk_tokens, args.tenant_salt)
        hw = None
        if args.calibrate:
            from kvtier.sim.cost import MODEL_PRESETS, Calibration

            hw = Calibration(args.calibrate).hardware(model=MODEL_PRESETS.get(args.model))
        cost = default_cost(args.chunk_tokens, args.model, hw)
        if args.peer_disk and not args.peers:
            raise InvalidArgumentError("--peer-disk needs --peers")
        router = Router(
            names,
            keyer,
            args.routing,
            balance=args.balance,
            slack_s=args.queue_slack,
            cost=cost,
            peers=args.peers,
            peer_disk=args.peer_disk,
        )
        subscriber = open_subscriber(endpoints)
        service = RouterService(router, (host, int(port)), subscriber).start()
    except (KVTierError, OSError) as e:
        print(f"kvtier route: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    h, pt = service.address
    print(
        f"kvtier route: listening on {h}:{pt} (instances {', '.join(names)}; policy {router.policy.name})", flush=True
    )
    try:
        stop.wait(args.duration)
    except KeyboardInterrupt:
        pass
    finally:
        service.close()
        if subscriber is not None:
            subscriber.close()
    if service.event_error is not None:
        print(f"kvtier route: the event subscriber stopped: {service.event_error!r}", file=sys.stderr)
        return 1
    return 0
