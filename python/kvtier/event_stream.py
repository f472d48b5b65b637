"""KV events on the wire: :class:`EventPublisher` publishes a cache's events (kvtier.events) as
vLLM's KV-event stream, :class:`EventSubscriber` reads such streams from many instances.

The format is vLLM's (``vllm/distributed/kv_events.py``, vLLM 0.32: ``ZmqEventPublisher`` and
``KVEventBatch``), so consumers written for vLLM's events read kvtier's unchanged:

- a ZMQ PUB socket (kvtier binds an XPUB, which SUB sockets see as a PUB: it also lets the
  publisher know when a subscriber joined); every batch is one 3-frame message:
  ``(topic, sequence, payload)``: the topic as UTF-8, the batch's sequence number as 8 bytes
  big-endian (0, 1, 2, ... per publisher), the msgpack payload;
- the payload is a ``KVEventBatch``: an array ``[ts, events, data_parallel_rank]`` (the rank is
  null unless set; ``ts`` is when the events were taken from the cache);
- each event is a msgpack map tagged by its ``"type"``: ``BlockStored`` (``block_hashes``,
  ``parent_block_hash``, ``token_ids``, ``block_size``, ``lora_id``, ``medium``, ``lora_name``),
  ``BlockRemoved`` (``block_hashes``, ``medium``) or ``AllBlocksCleared``.

kvtier's events map onto it so: ``block_hashes`` are the chunk keys (16 bytes each, in order),
``block_size`` is the chunk size in tokens, ``token_ids`` is empty and ``parent_block_hash`` null
(a key already names its whole prefix), ``lora_id`` and ``lora_name`` null, and the medium is
vLLM's name for it: ``"GPU"``, ``"CPU"``, and ``"STORAGE"`` for the disk tier. ``AllBlocksCleared``
carries kvtier's medium as an extra ``"medium"`` field (msgspec decoders, vLLM's included, skip
fields they do not know); one without it, as vLLM sends, clears every medium.

The subscriber also reads vLLM's older positional events (``array_like`` structs: ``[tag, ...]``)
and counts, then skips, block hashes that are not kvtier chunk keys (vLLM's own ints or 32-byte
hashes).

Example::

    pub = EventPublisher(cache)                    # drains cache.take_events() every 50 ms
    sub = EventSubscriber({"node-a": pub.endpoint})
    for instance, event in sub.poll(timeout_s=1.0):
        ...
    sub.close(); pub.close()

Needs pyzmq and msgspec (``pip install 'kvtier[events]'``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from kvtier.errors import InvalidArgumentError
from kvtier.events import CLEARED, CPU, DISK, GPU, MEDIA, REMOVED, STORED, KVEvent
from kvtier.keys import KEY_BYTES

try:
    import msgspec
    import zmq
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f"kvtier.event_stream needs pyzmq and msgspec, the extra 'events' ({e}): pip install 'kvtier[events]'"
    ) from e

log = logging.getLogger(__name__)

__all__ = ["VLLM_MEDIA", "EventPublisher", "EventSubscriber", "decode_batch", "encode_batch"]

VLLM_MEDIA = {GPU: "GPU", CPU: "CPU", DISK: "STORAGE"}
"""kvtier's medium -> vLLM's medium string (vLLM's MEDIUM_GPU, MEDIUM_CPU, MEDIUM_STORAGE)."""
_KVTIER_MEDIA = {v: k for k, v in VLLM_MEDIA.items()}


# -- vLLM's structs, as they encode (msgspec: array-like batch, tagged map events) -----------------
class _Batch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class _Event(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class _BlockStored(_Event, tag="BlockStored"):
    block_hashes: list[bytes]
    parent_block_hash: bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None


class _BlockRemoved(_Event, tag="BlockRemoved"):
    block_hashes: list[bytes]
    medium: str | None


class _AllBlocksCleared(_Event, tag="AllBlocksCleared"):
    medium: str | None = None  # kvtier's extension: which medium; None clears all


_ENCODER = msgspec.msgpack.Encoder()


def _positive_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise InvalidArgumentError(f"{name} must be a number > 0, got {value!r}")
    return float(value)


def encode_batch(
    events: list[KVEvent],
    block_size: int,
    ts: float | None = None,
    data_parallel_rank: int | None = None,
) -> bytes:
    """One batch of ``events`` as vLLM's ``KVEventBatch`` payload (msgpack bytes). ``ts``
    defaults to the first event's (when it was taken), or now for an empty batch."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise InvalidArgumentError(f"block_size must be a positive int (tokens per chunk), got {block_size!r}")
    out: list[_Event] = []
    for e in events:
        if not isinstance(e, KVEvent):
            raise InvalidArgumentError(f"events: expected KVEvent, got {type(e).__name__}")
        medium = VLLM_MEDIA[e.medium]
        if e.kind == STORED:
            out.append(_BlockStored(list(e.keys), None, [], block_size, None, medium, None))
        elif e.kind == REMOVED:
            out.append(_BlockRemoved(list(e.keys), medium))
        else:
            out.append(_AllBlocksCleared(medium))
    if ts is None:
        ts = events[0].ts if events else time.time()
    batch = _Batch(ts, out, data_parallel_rank)
    return _ENCODER.encode(batch)


class _Skipped:
    """What decode_batch left out: hashes that are not kvtier keys, events it cannot read."""

    def __init__(self) -> None:
        self.foreign_hashes = 0
        self.unknown_events = 0


def _keys(hashes: Any, skipped: _Skipped) -> tuple[bytes, ...]:
    keys = []
    for h in hashes if isinstance(hashes, list) else ():
        if isinstance(h, bytes) and len(h) == KEY_BYTES:
            keys.append(h)
        else:
            skipped.foreign_hashes += 1
    return tuple(keys)


def _medium(value: Any) -> str | None:
    if value is None:
        return GPU  # vLLM's events before media existed were of its GPU cache
    return _KVTIER_MEDIA.get(value)


def _decode_event(raw: Any, ts: float, skipped: _Skipped) -> list[KVEvent]:
    if isinstance(raw, dict):
        tag, hashes, medium = raw.get("type"), raw.get("block_hashes"), raw.get("medium")
    elif isinstance(raw, list) and raw:  # vLLM's positional form: [tag, fields...]
        tag = raw[0]
        hashes = raw[1] if len(raw) > 1 else None
        if tag == "BlockStored":
            medium = raw[6] if len(raw) > 6 else None
        elif tag == "BlockRemoved":
            medium = raw[2] if len(raw) > 2 else None
        else:
            medium = None
    else:
        skipped.unknown_events += 1
        return []
    if tag == "AllBlocksCleared":
        if medium is None:
            return [KVEvent(CLEARED, m, (), ts) for m in MEDIA]
        m = _medium(medium)
        if m is None:
            skipped.unknown_events += 1
            return []
        return [KVEvent(CLEARED, m, (), ts)]
    if tag not in ("BlockStored", "BlockRemoved"):
        skipped.unknown_events += 1
        return []
    m = _medium(medium)
    if m is None:
        skipped.unknown_events += 1
        return []
    keys = _keys(hashes, skipped)
    if not keys:
        return []
    return [KVEvent(STORED if tag == "BlockStored" else REMOVED, m, keys, ts)]


def decode_batch(payload: bytes, skipped: _Skipped | None = None) -> tuple[float, list[KVEvent]]:
    """A ``KVEventBatch`` payload (kvtier's, or vLLM's: map or positional events) as
    ``(ts, events)``. Raises InvalidArgumentError for bytes that are not such a batch."""
    skipped = skipped if skipped is not None else _Skipped()
    try:
        raw = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError as e:
        raise InvalidArgumentError(f"payload: not msgpack ({e})") from None
    if isinstance(raw, dict):  # a batch encoded as a map
        ts, events = raw.get("ts"), raw.get("events")
    elif isinstance(raw, list) and len(raw) >= 2:
        ts, events = raw[0], raw[1]
    else:
        raise InvalidArgumentError(f"payload: not a KVEventBatch (got {type(raw).__name__})")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not isinstance(events, list):
        raise InvalidArgumentError("payload: a KVEventBatch is [ts: float, events: list, ...]")
    out: list[KVEvent] = []
    for e in events:
        out.extend(_decode_event(e, float(ts), skipped))
    return float(ts), out


class EventPublisher:
    """Publishes ``source.take_events()`` (a :class:`kvtier.KVCache` or
    :class:`kvtier.pool.PagedKVPool`) as vLLM's KV-event stream from a background thread.

    Args:
        source: anything with ``take_events(max_records) -> list[KVEvent]``.
        endpoint: where the socket binds; a ``*`` port takes a free one. ``.endpoint`` is the
            address bound (``tcp://127.0.0.1:41234``), for subscribers to connect to.
        interval_s: how often the thread drains the source (each drain publishes what it took,
            in batches of at most ``max_batch_records`` chunk records).
        topic: the first frame of every message (vLLM's ``KVEventsConfig.topic``).
        block_size: tokens per chunk, sent as BlockStored's ``block_size``; default: the
            source's ``layout.chunk_tokens``.
        data_parallel_rank: sent in every batch when given.
        hwm: ZMQ high-water mark; a subscriber that falls this many messages behind loses the
            rest (it sees a gap in the sequence numbers).

    ``close(timeout_s)`` publishes what is left and stops. ``stats()`` counts batches, events,
    errors of the source and messages the socket refused.
    """

    def __init__(
        self,
        source,
        endpoint: str = "tcp://127.0.0.1:*",
        *,
        interval_s: float = 0.05,
        topic: str = "",
        block_size: int | None = None,
        max_batch_records: int = 4096,
        data_parallel_rank: int | None = None,
        hwm: int = 100_000,
    ) -> None:
        if not callable(getattr(source, "take_events", None)):
            raise InvalidArgumentError(f"source must have take_events(), got {type(source).__name__}")
        if not isinstance(endpoint, str) or "://" not in endpoint:
            raise InvalidArgumentError(f"endpoint must be a ZMQ address such as 'tcp://127.0.0.1:*', got {endpoint!r}")
        self._interval_s = _positive_number("interval_s", interval_s)
        if not isinstance(topic, str):
            raise InvalidArgumentError(f"topic must be a str, got {topic!r}")
        if block_size is None:
            block_size = getattr(getattr(source, "layout", None), "chunk_tokens", None)
            if block_size is None:
                raise InvalidArgumentError("block_size must be given: the source has no layout.chunk_tokens")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise InvalidArgumentError(f"block_size must be a positive int (tokens per chunk), got {block_size!r}")
        for name, v in (("max_batch_records", max_batch_records), ("hwm", hwm)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise InvalidArgumentError(f"{name} must be a positive int, got {v!r}")
        if data_parallel_rank is not None and (
            isinstance(data_parallel_rank, bool) or not isinstance(data_parallel_rank, int) or data_parallel_rank < 0
        ):
            raise InvalidArgumentError(f"data_parallel_rank must be an int >= 0 or None, got {data_parallel_rank!r}")
        self._source = source
        self._topic = topic.encode()
        self._block_size = block_size
        self._max_records = max_batch_records
        self._dp_rank = data_parallel_rank
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.XPUB)
        self._sock.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscription shows, not only the first
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError as e:
            self._sock.close(linger=0)
            self._ctx.term()
            raise InvalidArgumentError(f"endpoint {endpoint!r}: cannot bind ({e})") from None
        self.endpoint: str = self._sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._seq = 0
        self._lock = threading.Condition()
        self._subscriptions = 0  # subscription messages seen (XPUB_VERBOSE: one per subscriber)
        self._counts = dict(batches=0, events=0, records=0, send_refused=0, source_errors=0, encode_errors=0)
        self._stop = threading.Event()
        self._linger_ms = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kvtier-event-publisher", daemon=True)
        self._thread.start()

    # -- the thread (the only user of the socket once started) ------------------------------------
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        next_drain = time.monotonic()
        try:
            while not self._stop.is_set():
                wait_ms = max(0.0, next_drain - time.monotonic()) * 1000
                if poller.poll(wait_ms):
                    self._read_subscriptions()
                if time.monotonic() >= next_drain:
                    self._drain()
                    next_drain = time.monotonic() + self._interval_s
            self._drain()  # what is left at close
        finally:
            self._sock.close(linger=self._linger_ms)

    def _read_subscriptions(self) -> None:
        while True:
            try:
                msg = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if msg[:1] == b"\x01":
                with self._lock:
                    self._subscriptions += 1
                    self._lock.notify_all()

    def _drain(self) -> None:
        while True:
            try:
                events = self._source.take_events(self._max_records)
            except Exception as e:  # noqa: BLE001 - a closed or failing source: counted, the thread goes on
                self._counts["source_errors"] += 1
                log.debug("kvtier: event source failed: %s: %s", type(e).__name__, e)
                return
            if not events:
                return
            self._publish(events)
            if sum(max(1, len(e.keys)) for e in events) < self._max_records:
                return

    def _publish(self, events: list[KVEvent]) -> None:
        try:
            payload = encode_batch(events, self._block_size, data_parallel_rank=self._dp_rank)
        except Exception as e:  # noqa: BLE001 - bookkeeping degrades, never raises
            self._counts["encode_errors"] += 1
            log.warning("kvtier: could not encode a KV event batch: %s: %s", type(e).__name__, e)
            return
        seq = self._seq
        self._seq += 1  # a batch the socket refuses leaves a gap the subscribers see
        try:
            self._sock.send_multipart([self._topic, seq.to_bytes(8, "big"), payload], zmq.NOBLOCK)
        except zmq.ZMQError:
            self._counts["send_refused"] += 1
            return
        self._counts["batches"] += 1
        self._counts["events"] += len(events)
        self._counts["records"] += sum(max(1, len(e.keys)) for e in events)

    # -- API ---------------------------------------------------------------------------------------
    def wait_for_subscribers(self, n: int = 1, timeout_s: float = 10.0) -> bool:
        """Wait until ``n`` subscriptions reached the socket (messages published after that reach
        those subscribers), or ``timeout_s``; True if they did."""
        timeout_s = _positive_number("timeout_s", timeout_s)
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._subscriptions < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
            return True

    def stats(self) -> dict:
        """Batches and events published, chunk records in them, batches the socket refused
        (a subscriber past its high-water mark; the sequence number is spent), failures of the
        source and of encoding, subscriptions seen, and the next sequence number."""
        with self._lock:
            subscriptions = self._subscriptions
        return dict(self._counts, subscriptions=subscriptions, next_sequence=self._seq)

    def close(self, timeout_s: float = 5.0) -> None:
        """Publish what the source still has, then stop; waits at most ``timeout_s`` (the last
        messages get that long to leave)."""
        if self._closed:
            return
        self._closed = True
        timeout_s = _positive_number("timeout_s", timeout_s)
        deadline = time.monotonic() + timeout_s
        self._linger_ms = int(timeout_s * 1000)
        self._stop.set()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.warning("kvtier: the event publisher did not stop within %.1f s; its socket stays open", timeout_s)
            return
        self._ctx.term()

    def __enter__(self) -> EventPublisher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class EventSubscriber:
    """Reads the KV-event streams of several instances (kvtier's :class:`EventPublisher`, or
    vLLM's publishers), one SUB socket each.

    ``endpoints``: instance name -> ZMQ address. ``poll(timeout_s)`` returns the events that
    arrived as ``(instance, KVEvent)`` pairs, oldest first per instance. Sequence numbers are
    checked per instance: a jump counts the batches missed (``stats()["missed_batches"]``); a
    number lower than the last one is a restarted publisher (counted, accepted).
    """

    _MAX_MESSAGES_PER_POLL = 4096

    def __init__(self, endpoints: Mapping[str, str], *, topic: str = "") -> None:
        if not isinstance(endpoints, Mapping):
            kind = type(endpoints).__name__
            raise InvalidArgumentError(f"endpoints must map instance names to addresses, got {kind}")
        if not isinstance(topic, str):
            raise InvalidArgumentError(f"topic must be a str, got {topic!r}")
        self._topic = topic.encode()
        self._ctx = zmq.Context()
        self._poller = zmq.Poller()
        self._socks: dict[Any, str] = {}
        self._last_seq: dict[str, int] = {}
        self._skipped = _Skipped()
        self._counts = dict(batches=0, events=0, missed_batches=0, restarts=0, bad_messages=0)
        self._closed = False
        try:
            for name, endpoint in endpoints.items():
                self.connect(name, endpoint)
        except BaseException:
            self.close()
            raise

    def connect(self, instance: str, endpoint: str) -> None:
        """Also read ``instance``'s stream at ``endpoint``."""
        if not isinstance(instance, str) or not instance:
            raise InvalidArgumentError(f"instance names must be non-empty strs, got {instance!r}")
        if instance in self._socks.values():
            raise InvalidArgumentError(f"instance {instance!r} is already connected")
        if not isinstance(endpoint, str) or "://" not in endpoint:
            raise InvalidArgumentError(f"endpoint of {instance!r} must be a ZMQ address, got {endpoint!r}")
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, self._topic)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            raise InvalidArgumentError(f"endpoint of {instance!r}: {endpoint!r}: {e}") from None
        self._socks[sock] = instance
        self._poller.register(sock, zmq.POLLIN)

    def poll(self, timeout_s: float = 0.0) -> list[tuple[str, KVEvent]]:
        """Events that arrived, waiting at most ``timeout_s`` for the first message (0: no wait);
        then whatever else is ready, up to a bound per call."""
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 <= timeout_s < float("inf"):
            raise InvalidArgumentError(f"timeout_s must be a number >= 0, got {timeout_s!r}")
        if self._closed:
            raise InvalidArgumentError("this EventSubscriber is closed")
        out: list[tuple[str, KVEvent]] = []
        ready = dict(self._poller.poll(timeout_s * 1000))
        handled = 0
        while ready and handled < self._MAX_MESSAGES_PER_POLL:
            for sock in list(ready):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    del ready[sock]
                    continue
                handled += 1
                out.extend(self._handle(self._socks[sock], frames))
        return out

    def _handle(self, instance: str, frames: list[bytes]) -> list[tuple[str, KVEvent]]:
        if len(frames) != 3 or len(frames[1]) != 8:
            self._counts["bad_messages"] += 1
            return []
        seq = int.from_bytes(frames[1], "big")
        try:
            _, events = decode_batch(frames[2], self._skipped)
        except InvalidArgumentError:
            self._counts["bad_messages"] += 1
            return []
        last = self._last_seq.get(instance)
        if last is not None:
            if seq > last + 1:
                self._counts["missed_batches"] += seq - last - 1
            elif seq <= last:
                self._counts["restarts"] += 1
        self._last_seq[instance] = seq
        self._counts["batches"] += 1
        self._counts["events"] += len(events)
        return [(instance, e) for e in events]

    def stats(self) -> dict:
        """Batches and events read, batches missed (gaps in sequence numbers), publishers seen
        restarting, messages that were not KV-event batches, block hashes that were not kvtier
        keys, events of unknown kinds or media, and the last sequence number per instance."""
        return dict(
            self._counts,
            foreign_hashes=self._skipped.foreign_hashes,
            unknown_events=self._skipped.unknown_events,
            last_sequence=dict(self._last_seq),
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sock in list(self._socks):
            sock.close(linger=0)
        self._socks.clear()
        self._ctx.term()

    def __enter__(self) -> EventSubscriber:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
