"""kvtier.event_stream: KV events as vLLM's KV-event stream. Batches decode both ways against a
schema written here after vLLM 0.32's vllm/distributed/kv_events.py (and against vLLM's own
classes where vllm is installed); a publisher in one process and a subscriber in another see the
same events; gaps in sequence numbers are counted."""

from __future__ import annotations

import multiprocessing as mp
import queue
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

msgspec = pytest.importorskip("msgspec")
zmq = pytest.importorskip("zmq")
torch = pytest.importorskip("torch")

from _util import toks
from kvtier.errors import InvalidArgumentError
from kvtier.event_stream import VLLM_MEDIA, EventPublisher, EventSubscriber, decode_batch, encode_batch
from kvtier.events import CLEARED, CPU, DISK, GPU, REMOVED, STORED, KVEvent

DEADLINE_S = 60.0


# -- vLLM's schema (vllm/distributed/kv_events.py, vLLM 0.32.0), written out ---------------------
class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[bytes | int]
    parent_block_hash: bytes | int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[bytes | int]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


K = [bytes([i]) * 16 for i in range(6)]


def vllm_batch() -> bytes:
    """A batch as vLLM 0.32 sends it, with the optional fields set and hashes that are not kvtier
    keys mixed in (an int, a 32-byte hash)."""
    events = [
        AllBlocksCleared(),
        BlockStored(
            block_hashes=[K[0], K[1], 12345, b"\x07" * 32],
            parent_block_hash=None,
            token_ids=[1, 2, 3],
            block_size=16,
            lora_id=None,
            medium="CPU",
            lora_name=None,
            extra_keys=[None, None, None, None],
            group_idx=0,
            kv_cache_spec_kind="full_attention",
            locality="LOCAL",
        ),
        BlockStored([K[2]], K[1], [], 16, None, "STORAGE", None),
        BlockStored([K[3]], None, [], 16, None, None, None),  # no medium: vLLM's GPU cache
        BlockRemoved([K[0]], "CPU", group_idx=0),
    ]
    return msgspec.msgpack.encode(KVEventBatch(ts=12.5, events=events, data_parallel_rank=0))


def test_decodes_a_batch_as_vllm_sends_it():
    from kvtier.event_stream import _Skipped

    skipped = _Skipped()
    ts, events = decode_batch(vllm_batch(), skipped)
    assert ts == 12.5
    assert [(e.kind, e.medium, e.keys) for e in events] == [
        (CLEARED, GPU, ()),  # AllBlocksCleared without a medium clears every medium
        (CLEARED, CPU, ()),
        (CLEARED, DISK, ()),
        (STORED, CPU, (K[0], K[1])),
        (STORED, DISK, (K[2],)),
        (STORED, GPU, (K[3],)),
        (REMOVED, CPU, (K[0],)),
    ]
    assert skipped.foreign_hashes == 2 and skipped.unknown_events == 0


def test_vllm_decoders_read_what_kvtier_sends():
    ours = [
        KVEvent(CLEARED, DISK, (), 1.0),
        KVEvent(STORED, GPU, (K[0], K[1]), 1.0),
        KVEvent(STORED, CPU, (K[2],), 1.0),
        KVEvent(REMOVED, DISK, (K[3],), 1.0),
    ]
    payload = encode_batch(ours, block_size=256, ts=3.0, data_parallel_rank=2)
    batch = msgspec.msgpack.Decoder(KVEventBatch).decode(payload)
    assert (batch.ts, batch.data_parallel_rank) == (3.0, 2)
    cleared, stored_gpu, stored_cpu, removed = batch.events
    assert isinstance(cleared, AllBlocksCleared)
    assert isinstance(stored_gpu, BlockStored) and stored_gpu.block_hashes == [K[0], K[1]]
    assert (stored_gpu.medium, stored_gpu.block_size, stored_gpu.token_ids) == ("GPU", 256, [])
    assert stored_gpu.parent_block_hash is None and stored_gpu.lora_id is None
    assert stored_cpu.medium == "CPU"
    assert isinstance(removed, BlockRemoved) and (removed.block_hashes, removed.medium) == ([K[3]], "STORAGE")
    # The raw map names every field vLLM requires, and kvtier's medium rides on AllBlocksCleared.
    raw = msgspec.msgpack.decode(payload)
    assert raw[0] == 3.0 and raw[2] == 2
    assert raw[1][0] == {"type": "AllBlocksCleared", "medium": "STORAGE"}
    assert set(raw[1][1]) == {
        "type",
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
    }
    # And back: what kvtier sent is what kvtier reads.
    assert [(e.kind, e.medium, e.keys) for e in decode_batch(payload)[1]] == [(e.kind, e.medium, e.keys) for e in ours]


def test_reads_vllms_older_positional_events():
    class OldEvent(msgspec.Struct, array_like=True, omit_defaults=True, tag=True):
        pass

    class OldStored(OldEvent, tag="BlockStored"):
        block_hashes: list[bytes]
        parent_block_hash: bytes | None
        token_ids: list[int]
        block_size: int
        lora_id: int | None
        medium: str | None

    class OldRemoved(OldEvent, tag="BlockRemoved"):
        block_hashes: list[bytes]
        medium: str | None

    class OldBatch(msgspec.Struct, array_like=True):
        ts: float
        events: list[OldStored | OldRemoved]

    payload = msgspec.msgpack.encode(
        OldBatch(1.0, [OldStored([K[0]], None, [], 16, None, "CPU"), OldRemoved([K[0]], "CPU")])
    )
    assert [(e.kind, e.medium, e.keys) for e in decode_batch(payload)[1]] == [
        (STORED, CPU, (K[0],)),
        (REMOVED, CPU, (K[0],)),
    ]


def test_with_vllms_own_classes():
    kv_events = pytest.importorskip(
        "vllm.distributed.kv_events", reason="vllm is not installed here (scripts/ci_vllm.sh installs it)"
    )
    payload = encode_batch([KVEvent(STORED, CPU, (K[0],), 1.0), KVEvent(CLEARED, GPU, (), 1.0)], block_size=16)
    batch = msgspec.msgpack.Decoder(kv_events.KVEventBatch).decode(payload)
    assert isinstance(batch.events[0], kv_events.BlockStored)
    assert batch.events[0].block_hashes == [K[0]] and batch.events[0].medium == kv_events.MEDIUM_CPU
    assert isinstance(batch.events[1], kv_events.AllBlocksCleared)
    theirs = kv_events.KVEventBatch(
        ts=2.0, events=[kv_events.BlockRemoved(block_hashes=[K[1]], medium=kv_events.MEDIUM_STORAGE)]
    )
    assert [(e.kind, e.medium, e.keys) for e in decode_batch(msgspec.msgpack.encode(theirs))[1]] == [
        (REMOVED, DISK, (K[1],))
    ]
    assert VLLM_MEDIA == {GPU: kv_events.MEDIUM_GPU, CPU: kv_events.MEDIUM_CPU, DISK: kv_events.MEDIUM_STORAGE}


@pytest.mark.parametrize("payload", [b"\xc1", msgspec.msgpack.encode(5), msgspec.msgpack.encode(["x", []])])
def test_a_payload_that_is_not_a_batch_is_refused(payload):
    with pytest.raises(InvalidArgumentError, match="payload"):
        decode_batch(payload)


def test_encode_refuses_a_bad_block_size():
    with pytest.raises(InvalidArgumentError, match="block_size"):
        encode_batch([], block_size=0)


# -- publisher and subscriber ----------------------------------------------------------------------
def make_cache(disk_dir=None):
    from kvtier import KVCache, Layout

    kv = [torch.zeros(2, 64, 16, 1, 16) for _ in range(2)]
    layout = Layout.from_vllm(kv, chunk_tokens=32)  # 2 pages a chunk, 8 KiB
    extra = {}
    if disk_dir is not None:
        extra = dict(
            disk_dir=str(disk_dir),
            disk_bytes=4096 + 6 * (4096 + layout.chunk_bytes),
            disk_admit_min_seen=1,
            disk_persist_interval_s=0.0,
            disk_persist_on_close=False,
        )
    return KVCache(layout, cpu_bytes=4 * layout.chunk_bytes, method="cpu", **extra)


PROMPTS_SEEDS = range(5)


def run_workload(cache) -> None:
    """Stores that evict, write back and evict from disk, then loads that promote."""
    prompts = [toks(4 * 32, s) for s in PROMPTS_SEEDS]
    for p in prompts:
        cache.store(p, list(range(8))).wait()
    for p in prompts[::-1]:
        cache.load(p, list(range(32, 40))).wait()
    cache.drain()


def media_of(cache) -> dict[bytes, int]:
    out = {}
    for s in PROMPTS_SEEDS:
        keys = cache.keyer.keys(toks(4 * 32, s))
        out.update(zip(keys, bytes(cache.tier.media(b"".join(keys)))))
    return out


def rebuild(events) -> dict[bytes, int]:
    bits = {CPU: 1, DISK: 2, GPU: 4}
    media: dict[bytes, int] = {}
    for e in events:
        if e.kind == CLEARED:
            media = {k: m & ~bits[e.medium] for k, m in media.items()}
        for k in e.keys:
            m = media.get(k, 0)
            media[k] = m | bits[e.medium] if e.kind == STORED else m & ~bits[e.medium]
    return media


class _Gated:
    """A cache's take_events, held back until ``gate`` opens; keeps what it handed out."""

    def __init__(self, cache) -> None:
        self.cache, self.layout = cache, cache.layout
        self.gate = threading.Event()
        self.taken: list[KVEvent] = []

    def take_events(self, max_records=0):
        if not self.gate.is_set():
            return []
        events = self.cache.take_events(max_records)
        self.taken.extend(events)
        return events


def collect(sub: EventSubscriber, done, deadline_s: float = DEADLINE_S) -> list:
    """Poll until ``done(received)`` or the deadline."""
    received: list = []
    end = time.monotonic() + deadline_s
    while time.monotonic() < end and not done(received):
        received += sub.poll(0.05)
    return received


def test_publisher_to_subscriber_in_one_process(tmp_path):
    with make_cache(tmp_path) as cache:
        source = _Gated(cache)
        pub = EventPublisher(source, interval_s=0.01, max_batch_records=7)
        sub = EventSubscriber({"a": pub.endpoint})
        try:
            assert pub.wait_for_subscribers(1, timeout_s=DEADLINE_S)
            source.gate.set()
            run_workload(cache)
            pub.close()  # publishes the rest: source.taken is final
            received = collect(sub, lambda r: len(r) >= len(source.taken))
            assert [e for _, e in received] == source.taken
            expected = media_of(cache)
            assert {name for name, _ in received} == {"a"}
            assert rebuild(e for _, e in received) == expected
            st = sub.stats()
            assert st["missed_batches"] == 0 and st["bad_messages"] == 0 and st["foreign_hashes"] == 0
            assert st["batches"] > 1  # max_batch_records split the drains
        finally:
            pub.close()
            sub.close()
        ps = pub.stats()
        assert ps["send_refused"] == 0 and ps["source_errors"] == 0 and ps["batches"] == st["batches"]


def _publishing_child(disk_dir: str, endpoints: mp.Queue, results: mp.Queue) -> None:
    """The publishing process: a cache with a disk tier runs the workload while its events go out."""
    cache = make_cache(disk_dir)
    source = _Gated(cache)
    pub = EventPublisher(source, interval_s=0.01, topic="kv-events")
    endpoints.put(pub.endpoint)
    joined = pub.wait_for_subscribers(1, timeout_s=DEADLINE_S)
    source.gate.set()
    run_workload(cache)
    pub.close(timeout_s=DEADLINE_S)  # publishes the rest, lingering until it left
    taken = [(e.kind, e.medium, e.keys) for e in source.taken]
    results.put((joined, taken, media_of(cache), pub.stats()))
    cache.close()


@pytest.mark.multiproc
def test_publisher_and_subscriber_in_two_processes(tmp_path):
    ctx = mp.get_context("spawn")
    endpoints, results = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_publishing_child, args=(str(tmp_path), endpoints, results))
    child.start()
    try:
        endpoint = endpoints.get(timeout=DEADLINE_S)
        with EventSubscriber({"child": endpoint}, topic="kv-events") as sub:
            result: list = []

            def done(received) -> bool:
                if not result:
                    try:
                        result.append(results.get_nowait())
                    except queue.Empty:
                        return False
                return len(received) >= len(result[0][1])

            received = collect(sub, done)
            assert result, "the publishing process sent no result"
            joined, taken, media, pub_stats = result[0]
            assert joined
            assert [(e.kind, e.medium, e.keys) for _, e in received] == taken
            assert rebuild(e for _, e in received) == media
            assert any(m & 2 for m in media.values())  # the disk took part
            assert sub.stats()["missed_batches"] == 0
            assert pub_stats["batches"] == sub.stats()["batches"]
    finally:
        child.join(DEADLINE_S)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0


def test_gaps_and_restarts_are_counted():
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind("tcp://127.0.0.1:*")
    endpoint = pub.getsockopt(zmq.LAST_ENDPOINT).decode()
    sub = EventSubscriber({"x": endpoint})
    try:
        assert pub.poll(DEADLINE_S * 1000), "the subscription did not arrive"
        pub.recv()
        payload = encode_batch([KVEvent(STORED, CPU, (K[0],), 1.0)], block_size=16)
        for seq in (0, 1, 4, 0):  # two lost, then a restarted publisher
            pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])
        pub.send_multipart([b"", b"short", payload])  # not a batch
        collect(sub, lambda r: sub.stats()["batches"] + sub.stats()["bad_messages"] >= 5)
        st = sub.stats()
        assert (st["batches"], st["missed_batches"], st["restarts"], st["bad_messages"]) == (4, 2, 1, 1)
        assert st["last_sequence"] == {"x": 0}
    finally:
        sub.close()
        pub.close()
        ctx.term()


def test_a_closed_source_is_counted_not_raised():
    cache = make_cache()
    pub = EventPublisher(cache, interval_s=0.01)
    cache.close()
    end = time.monotonic() + DEADLINE_S
    while pub.stats()["source_errors"] == 0 and time.monotonic() < end:
        time.sleep(0.01)
    pub.close()
    assert pub.stats()["source_errors"] > 0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"endpoint": "nowhere"}, "endpoint"),
        ({"interval_s": 0}, "interval_s"),
        ({"interval_s": "fast"}, "interval_s"),
        ({"block_size": -1}, "block_size"),
        ({"max_batch_records": 0}, "max_batch_records"),
        ({"data_parallel_rank": -1}, "data_parallel_rank"),
        ({"topic": 5}, "topic"),
    ],
)
def test_publisher_refuses_bad_arguments_naming_them(kwargs, name):
    with make_cache() as cache, pytest.raises(InvalidArgumentError, match=name):
        EventPublisher(cache, **kwargs)


def test_publisher_refuses_a_source_without_take_events():
    with pytest.raises(InvalidArgumentError, match="take_events"):
        EventPublisher(object())


def test_subscriber_refuses_bad_arguments_naming_them():
    with pytest.raises(InvalidArgumentError, match="endpoints"):
        EventSubscriber(["tcp://127.0.0.1:1"])
    with pytest.raises(InvalidArgumentError, match="endpoint of 'a'"):
        EventSubscriber({"a": "nowhere"})
    with EventSubscriber({}) as sub:
        with pytest.raises(InvalidArgumentError, match="timeout_s"):
            sub.poll(-1)
        sub.connect("a", "tcp://127.0.0.1:1")
        with pytest.raises(InvalidArgumentError, match="already connected"):
            sub.connect("a", "tcp://127.0.0.1:2")


def test_events_imports_no_zmq_and_event_stream_names_the_extra():
    """kvtier.events is core: it works without pyzmq; kvtier.event_stream says what to install."""
    code = (
        "import sys; sys.modules['zmq'] = None\n"
        "import kvtier.events\n"
        "try:\n"
        "    import kvtier.event_stream\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=DEADLINE_S)
    assert out.returncode == 0, out.stderr
    assert "pip install 'kvtier[events]'" in out.stdout
