"""KV events of a cache (kvtier.events): what KVCache.take_events and PagedKVPool.take_events
report matches, medium by medium, what the tiers hold; the bounded log; events off; the packed
records and the config key.

Runs the disk tier on a real file system (pytest's tmp_path or a temporary directory, which must
accept O_DIRECT).
"""

from __future__ import annotations

import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvtier.config import CacheConfig, KVTierConfig
from kvtier.errors import InvalidArgumentError
from kvtier.events import (
    CLEARED,
    CPU,
    DISK,
    GPU,
    RECORD_BYTES,
    REMOVED,
    STORED,
    EventQueue,
    KVEvent,
    events_from_records,
)

torch = pytest.importorskip("torch")

from _util import toks, wrap_cpu_tiers
from kvtier import KVCache, Layout
from kvtier.pool import PagedKVPool

MEDIA_BITS = {GPU: 4, CPU: 1, DISK: 2}


def make_cache(disk_dir, *, cpu_chunks=4, disk_chunks=6, admit=1, **kw):
    # Write-back at eviction (disk_write_through off): the sequences here reach the write-back
    # event sites, which write-through (chunks on disk before they are evicted) would skip.
    kw.setdefault("disk_write_through", False)
    kv = [torch.zeros(2, 64, 16, 1, 16) for _ in range(2)]
    layout = Layout.from_vllm(kv, chunk_tokens=32)  # 2 pages a chunk, 8 KiB
    slot = 4096 + layout.chunk_bytes
    if disk_dir is None:
        return KVCache(layout, cpu_bytes=cpu_chunks * layout.chunk_bytes, method="cpu", **kw)
    return KVCache(
        layout,
        cpu_bytes=cpu_chunks * layout.chunk_bytes,
        method="cpu",
        disk_dir=str(disk_dir),
        disk_bytes=4096 + disk_chunks * slot,
        disk_admit_min_seen=admit,
        **kw,
    )


class Picture:
    """What a consumer of the events knows: key -> media bits (1 cpu, 2 disk, 4 gpu)."""

    def __init__(self) -> None:
        self.media: dict[bytes, int] = {}

    def apply(self, events: list[KVEvent]) -> None:
        for e in events:
            bit = MEDIA_BITS[e.medium]
            if e.kind == CLEARED:
                for k in self.media:
                    self.media[k] &= ~bit
                continue
            for k in e.keys:
                held = self.media.get(k, 0)
                if e.kind == STORED:
                    assert not held & bit, f"stored twice in {e.medium} without a removal"
                    self.media[k] = held | bit
                else:
                    assert held & bit, f"removed from {e.medium}, where it was not"
                    self.media[k] = held & ~bit

    def of(self, key: bytes, mask: int = 3) -> int:
        return self.media.get(key, 0) & mask


def check_matches(cache: KVCache, picture: Picture, prompts: list[list[int]]) -> None:
    """The picture equals the cache's media for every key of every prompt, and predicts what
    lookup_tiers answers."""
    cache.drain()
    picture.apply(cache.take_events())
    for p in prompts:
        keys = cache.keyer.keys(p)
        held = bytes(cache.tier.media(b"".join(keys)))
        assert [picture.of(k) for k in keys] == list(held)
        expected = []
        for k in keys:
            m = picture.of(k)
            if not m:
                break
            expected.append("cpu" if m & 1 else "disk")
        assert cache.lookup_tiers(p) == expected


OPS = st.lists(
    st.tuples(st.sampled_from(["store", "load", "lookup", "persist"]), st.integers(0, 4), st.integers(1, 4)),
    min_size=1,
    max_size=25,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, admit=st.sampled_from([1, 2]))
def test_events_rebuild_what_each_medium_holds(ops, admit):
    """Random stores, loads (promotions), lookups (prefetches) and persists over prompts that
    share prefixes, in a CPU tier of 4 chunks over a disk of 6: after each call the media rebuilt
    from the events equal those the cache reports for every chunk."""
    base = toks(4 * 32, 1)
    prompts = [base, base[:64] + toks(64, 2), toks(4 * 32, 3), toks(4 * 32, 4), base[:96] + toks(32, 5)]
    with tempfile.TemporaryDirectory() as d, make_cache(d, admit=admit) as cache:
        picture = Picture()
        check_matches(cache, picture, prompts)
        for op, which, chunks in ops:
            tokens = prompts[which][: chunks * 32]
            if op == "store":
                cache.store(tokens, list(range(2 * chunks))).wait()
            elif op == "load":
                cache.load(tokens, list(range(32, 32 + 2 * chunks))).wait()
            elif op == "lookup":
                cache.lookup(tokens)
            else:
                cache.persist()
            check_matches(cache, picture, prompts)
        assert cache.stats()["events_dropped"] == 0


def test_eviction_pressure_reaches_every_event_site(tmp_path):
    """The sequence behind the hypothesis test, spelled out: stores evict, evictions write back,
    the disk evicts, a load promotes; each change is one event."""
    with make_cache(tmp_path, disk_chunks=8) as cache:  # 12 chunks evicted into 8 slots
        picture = Picture()
        prompts = [toks(4 * 32, s) for s in range(4)]
        for p in prompts:
            cache.store(p, list(range(8))).wait()
        check_matches(cache, picture, prompts)
        # On disk, and the most recent there: the write-backs its promotion causes evict prompt 1.
        assert cache.load(prompts[2], list(range(32, 40))).wait() == 4 * 32
        check_matches(cache, picture, prompts)
        st = cache.stats()
        assert st["disk"]["demotions_written"] > 0 and st["disk"]["evictions"] > 0
        assert st["disk"]["chunks_promoted"] + st["disk"]["chunks_prefetched"] > 0
        assert st["events_recorded"] > 0 and st["events_pending"] == 0


def test_consecutive_records_of_one_kind_and_medium_are_one_event(tmp_path):
    with make_cache(None) as cache:
        first = cache.take_events()
        assert [(e.kind, e.medium, e.keys) for e in first] == [(CLEARED, CPU, ())]
        p = toks(4 * 32, 1)
        cache.store(p, list(range(8))).wait()
        events = cache.take_events()
        assert len(events) == 1
        assert events[0].kind == STORED and events[0].medium == CPU
        assert events[0].keys == tuple(cache.keyer.keys(p))  # prefix order
        assert cache.take_events() == []


def test_a_restart_clears_then_names_what_the_disk_recovered(tmp_path):
    p = toks(3 * 32, 1)
    with make_cache(tmp_path) as cache:
        cache.store(p, list(range(6))).wait()
        cache.persist()
        keys = cache.keyer.keys(p)
    with make_cache(tmp_path) as cache:
        events = cache.take_events()
        assert [(e.kind, e.medium) for e in events[:2]] == [(CLEARED, CPU), (CLEARED, DISK)]
        assert [(e.kind, e.medium) for e in events[2:]] == [(STORED, DISK)]
        assert set(events[2].keys) == set(keys)


def test_a_full_log_drops_the_oldest_and_counts_them():
    with make_cache(None, cpu_chunks=2, events_capacity=3) as cache:
        cache.take_events()  # the cleared event
        a, b = toks(2 * 32, 1), toks(2 * 32, 2)
        cache.store(a, list(range(4))).wait()  # 2 stored
        cache.store(b, list(range(4))).wait()  # 2 removed, 2 stored: 6 records in a log of 3
        st = cache.stats()
        assert st["events_dropped"] == 3 and st["events_pending"] == 3
        events = cache.take_events()
        kept = [(e.kind, k) for e in events for k in e.keys]
        kb = cache.keyer.keys(b)
        ka = cache.keyer.keys(a)
        assert kept[1:] == [(STORED, kb[0]), (STORED, kb[1])]  # the newest survive
        assert kept[0][0] == REMOVED and kept[0][1] in ka
        assert cache.stats()["events_pending"] == 0


def test_capacity_zero_records_nothing(tmp_path):
    with make_cache(tmp_path, events_capacity=0) as cache:
        cache.store(toks(4 * 32, 1), list(range(8))).wait()
        cache.store(toks(4 * 32, 2), list(range(8))).wait()
        cache.drain()
        assert cache.take_events() == []
        st = cache.stats()
        assert st["event_capacity"] == 0 and st["events_recorded"] == 0


def test_take_events_limits_the_records_taken(tmp_path):
    with make_cache(None) as cache:
        cache.store(toks(4 * 32, 1), list(range(8))).wait()
        first = cache.take_events(2)
        assert [(e.kind, len(e.keys)) for e in first] == [(CLEARED, 0), (STORED, 1)]
        assert sum(len(e.keys) for e in cache.take_events()) == 3


@pytest.mark.parametrize("n", [1, 63, 64, 300])
def test_short_and_long_drains_decode_alike(n, monkeypatch):
    """Below _VECTORIZE_FROM records a Python loop decodes them, from it numpy: the same events."""
    import random

    import kvtier.events as events_module

    rng = random.Random(n)
    records = b"".join(bytes((rng.randrange(3), rng.randrange(3))) + rng.randbytes(16) for _ in range(n))
    first = events_from_records(records, ts=1.0)
    monkeypatch.setattr(events_module, "_VECTORIZE_FROM", 0 if n < events_module._VECTORIZE_FROM else 10**9)
    assert events_from_records(records, ts=1.0) == first
    assert sum(max(1, len(e.keys)) for e in first) == n


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_bad_max_records_is_refused_naming_it(bad):
    with make_cache(None) as cache, pytest.raises(InvalidArgumentError, match="max_records"):
        cache.take_events(bad)


def test_take_events_on_a_closed_cache_is_refused():
    cache = make_cache(None)
    cache.close()
    with pytest.raises(InvalidArgumentError, match="closed"):
        cache.take_events()


# -- the GPU medium of a PagedKVPool ---------------------------------------------------------------
PT, CT = 4, 8


def make_pool(num_pages=8, cpu_chunks=6, **kw):
    return PagedKVPool(
        num_layers=2,
        kv_heads=1,
        head_dim=8,
        num_pages=num_pages,
        page_tokens=PT,
        chunk_tokens=CT,
        dtype=torch.float32,
        cpu_bytes=cpu_chunks * 4096,
        **kw,
    )


def run_request(pool: PagedKVPool, tokens: list[int]) -> None:
    seq = pool.begin(tokens)
    seq.wait()
    pool.commit(seq, tokens)
    pool.release(seq)


@settings(max_examples=30, deadline=None)
@given(requests=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 4)), min_size=1, max_size=20))
def test_pool_events_rebuild_the_gpu_and_cpu_media(requests):
    """Requests over shared prefixes in a pool of 8 pages (4 chunks): commits register chunks,
    begins load them from the CPU tier, evictions drop them; the events rebuild both media."""
    prompts = [list(range(32)), list(range(16)) + list(range(100, 116)), list(range(200, 232)), list(range(300, 332))]
    pool = make_pool()
    try:
        picture = Picture()
        for which, chunks in requests:
            run_request(pool, prompts[which][: chunks * CT])
            pool.cache.drain()
            picture.apply(pool.take_events())
            for p in prompts:
                keys = pool.keyer.keys(p)
                cpu = bytes(pool.cache.tier.media(b"".join(keys)))
                assert [picture.of(k, 4) == 4 for k in keys] == [pool.share_has(k) for k in keys]
                assert [picture.of(k, 3) for k in keys] == list(cpu)
        st = pool.stats()
        assert st["gpu_events_dropped"] == 0 and st["gpu_events_pending"] == 0
    finally:
        pool.close()


def test_pool_starts_with_cleared_gpu_and_names_commits_and_evictions():
    pool = make_pool(num_pages=4)  # 2 chunks
    try:
        events = pool.take_events()
        assert [(e.kind, e.medium) for e in events] == [(CLEARED, GPU), (CLEARED, CPU)]
        a, b = list(range(16)), list(range(100, 116))
        run_request(pool, a)
        run_request(pool, b)  # evicts a's chunks (offloaded to the CPU tier first)
        events = pool.take_events()
        gpu = [(e.kind, e.keys) for e in events if e.medium == GPU]
        ka, kb = tuple(pool.keyer.keys(a)), tuple(pool.keyer.keys(b))
        assert gpu == [(STORED, ka), (REMOVED, ka), (STORED, kb)]
        # GPU events come ahead of the cache's.
        assert [e.medium for e in events] == [GPU, GPU, GPU, CPU]
    finally:
        pool.close()


class _FailingLoads:
    """The pool's CPU tier, except that while ``failing``, loads claim two hits and fail."""

    def __init__(self, tier) -> None:
        self._tier = tier
        self.failing = False

    def __getattr__(self, name):
        return getattr(self._tier, name)

    def lookup(self, keys):
        return max(self._tier.lookup(keys), 2) if self.failing else self._tier.lookup(keys)

    def load(self, keys, pages, stream):
        if not self.failing:
            return self._tier.load(keys, pages, stream)
        from types import SimpleNamespace

        from kvtier.errors import CorruptionError

        class Transfer:
            done = True

            def wait(self, timeout_s):
                raise CorruptionError("payload checksum mismatch (injected)")

            def wait_layer(self, layer, timeout_s):
                self.wait(timeout_s)

        return SimpleNamespace(chunks=2, transfer=Transfer())


def test_pool_removes_the_chunks_of_a_failed_load(monkeypatch):
    from kvtier.errors import CorruptionError

    tiers = []
    wrap_cpu_tiers(monkeypatch, lambda t: tiers.append(_FailingLoads(t)) or tiers[-1])
    pool = make_pool()
    try:
        pool.take_events()
        tokens = list(range(16))
        tiers[0].failing = True
        seq = pool.begin(tokens)
        tiers[0].failing = False
        with pytest.raises(CorruptionError):
            seq.wait()
        pool.release(seq)
        gpu = [(e.kind, e.keys) for e in pool.take_events() if e.medium == GPU]
        keys = tuple(pool.keyer.keys(tokens))
        assert gpu == [(STORED, keys), (REMOVED, keys)]  # landed in shared pages, then dropped
        assert not any(pool.share_has(k) for k in keys)
    finally:
        pool.close()


def test_pool_without_a_cpu_tier_has_gpu_events_only():
    pool = PagedKVPool(num_layers=1, kv_heads=1, head_dim=8, num_pages=4, page_tokens=PT, chunk_tokens=CT, cpu_bytes=0)
    try:
        run_request(pool, list(range(16)))
        assert [(e.kind, e.medium) for e in pool.take_events()] == [(CLEARED, GPU), (STORED, GPU)]
    finally:
        pool.close()


def test_pool_capacity_zero_records_nothing():
    pool = make_pool(events_capacity=0)
    try:
        run_request(pool, list(range(16)))
        assert pool.take_events() == []
        assert pool.stats()["gpu_events_recorded"] == 0
    finally:
        pool.close()


# -- packed records, the queue, the config key -----------------------------------------------------
def test_records_batch_runs_of_one_kind_and_medium():
    k = [bytes([i]) * 16 for i in range(4)]
    rec = b"".join(
        [
            bytes((2, 1)) + bytes(16),  # cleared cpu
            bytes((0, 1)) + k[0],
            bytes((0, 1)) + k[1],
            bytes((0, 2)) + k[2],
            bytes((1, 1)) + k[0],
            bytes((2, 2)) + bytes(16),
            bytes((2, 2)) + bytes(16),
        ]
    )
    events = events_from_records(rec, ts=5.0)
    assert [(e.kind, e.medium, e.keys) for e in events] == [
        (CLEARED, CPU, ()),
        (STORED, CPU, (k[0], k[1])),
        (STORED, DISK, (k[2],)),
        (REMOVED, CPU, (k[0],)),
        (CLEARED, DISK, ()),
        (CLEARED, DISK, ()),
    ]
    assert all(e.ts == 5.0 for e in events)


@pytest.mark.parametrize("bad", [b"\x00" * (RECORD_BYTES - 1), bytes((7, 1)) + bytes(16), bytes((0, 9)) + bytes(16)])
def test_bad_records_are_refused(bad):
    with pytest.raises(InvalidArgumentError, match="records"):
        events_from_records(bad)


def test_event_queue_drops_the_oldest_and_counts():
    q = EventQueue(2)
    q.record(STORED, GPU, [b"a" * 16, b"b" * 16, b"c" * 16])
    assert (q.recorded, q.dropped, q.pending()) == (3, 1, 2)
    assert [e.keys for e in events_from_records(q.take())] == [(b"b" * 16, b"c" * 16)]
    off = EventQueue(0)
    off.record(CLEARED, GPU, ())
    assert off.take() == b"" and off.recorded == 0
    with pytest.raises(InvalidArgumentError, match="capacity"):
        EventQueue(-1)


def test_events_capacity_is_a_config_key():
    assert CacheConfig().events_capacity == 65536
    assert KVTierConfig.load(env={"KVTIER_EVENTS_CAPACITY": "0"}).cache_config().events_capacity == 0
    with pytest.raises(InvalidArgumentError, match="events_capacity"):
        CacheConfig(events_capacity=-1)
    with pytest.raises(InvalidArgumentError, match=r"events\.capacity"):
        KVTierConfig.load(env={"KVTIER_EVENTS_CAPACITY": "lots"})
