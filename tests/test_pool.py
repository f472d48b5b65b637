"""PagedKVPool (the GPU tier) over the CPU and disk tiers: sharing, eviction, offload, reload.

The stateful test drives begin / compute / commit / release with prompts that share prefixes and
checks, after every begin, that each cached page holds exactly the KV computed for its prefix.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

torch = pytest.importorskip("torch")

from _util import wrap_cpu_tiers
from kvtier import ResourceExhaustedError
from kvtier.pool import PagedKVPool

PT, CT = 4, 8  # page and chunk tokens


def page_value(tokens, page: int) -> float:
    """The 'KV' of a page: a function of every token up to its end (as real KV is)."""
    h = hashlib.blake2b(repr(tokens[: (page + 1) * PT]).encode(), digest_size=4).digest()
    return float(int.from_bytes(h, "little") % 100003)


def compute(pool: PagedKVPool, seq, tokens) -> None:
    """Fill the pages after the cached prefix as a model's prefill would: layer by layer, each
    once the sequence may write it (an eviction's offload may still read a layerwise one's)."""
    first = seq.cached_tokens // PT
    for layer in range(pool.num_layers):
        seq.wait_writable(layer)
        for j in range(first, len(seq.page_table)):
            pool.kv[seq.page_table[j], layer] = page_value(tokens, j)


def check_cached(pool: PagedKVPool, seq, tokens) -> None:
    seq.wait()
    for j in range(seq.cached_tokens // PT):
        got = pool.kv[seq.page_table[j]]
        assert torch.all(got == page_value(tokens, j)), f"page {j} of the cached prefix is wrong"


def make_pool(num_pages=24, cpu_chunks=6, **kw):
    # A chunk here is 1 KiB; CPU-tier blocks are 4 KiB aligned (for O_DIRECT), hence 4096 a chunk.
    if "cpu_bytes" in kw:
        return PagedKVPool(
            num_layers=2,
            kv_heads=1,
            head_dim=8,
            num_pages=num_pages,
            page_tokens=PT,
            chunk_tokens=CT,
            dtype=torch.float32,
            **kw,
        )
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


def test_second_request_shares_gpu_pages():
    pool = make_pool()
    toks = list(range(20))  # 2 full chunks + half a chunk
    a = pool.begin(toks)
    assert a.cached_tokens == 0 and len(a.page_table) == 5
    compute(pool, a, toks)
    assert pool.commit(a, toks) == 2
    b = pool.begin(toks + [99])
    assert b.gpu_hit_tokens == 16 and b.page_table[:4] == a.page_table[:4]
    check_cached(pool, b, toks)
    pool.release(a)
    pool.release(b)
    assert pool.stats()["pages_free"] == 24 - 4  # the two chunks stay cached


def test_evicted_chunks_come_back_from_the_cpu_tier():
    pool = make_pool(num_pages=8)
    toks = list(range(16))
    a = pool.begin(toks)
    compute(pool, a, toks)
    pool.commit(a, toks)
    pool.release(a)
    for i in range(3):  # other prompts push the first one out of the pool
        other = [1000 * (i + 1) + t for t in range(16)]
        s = pool.begin(other)
        compute(pool, s, other)
        pool.commit(s, other)
        pool.release(s)
    st_ = pool.stats()
    assert st_["evicted_chunks"] >= 2 and st_["offloaded_chunks"] >= 2
    b = pool.begin(toks)
    assert b.gpu_hit_tokens == 0 and b.lower_hit_tokens == 16
    check_cached(pool, b, toks)


def test_pool_full_of_live_sequences_raises_and_keeps_state():
    pool = make_pool(num_pages=4, cpu_bytes=0)
    a = pool.begin(list(range(16)))  # takes all 4 pages
    with pytest.raises(ResourceExhaustedError, match="pages"):
        pool.begin(list(range(100, 116)))
    assert pool.stats()["pages_free"] == 0
    pool.release(a)
    assert pool.stats()["pages_free"] == 4


def test_bad_arguments():
    with pytest.raises(ValueError, match="chunk_tokens"):
        PagedKVPool(num_layers=1, kv_heads=1, head_dim=8, num_pages=4, page_tokens=4, chunk_tokens=6)
    with pytest.raises(ValueError, match="kv_layout"):
        PagedKVPool(
            num_layers=1, kv_heads=1, head_dim=8, num_pages=4, page_tokens=4, chunk_tokens=8, kv_layout="ragged"
        )
    pool = make_pool()
    s = pool.begin(list(range(8)))
    pool.release(s)
    with pytest.raises(ValueError, match="released"):
        pool.commit(s, list(range(8)))


PREFIXES = [list(range(8)), list(range(100, 108)), list(range(200, 216))]


class PoolMachine(RuleBasedStateMachine):
    """Random requests over shared prefixes; every cached page must hold its prefix's KV."""

    def __init__(self):
        super().__init__()
        self.pool = make_pool(num_pages=10, cpu_chunks=4)
        self.live = []  # (seq, tokens)

    @rule(
        prefix=st.sampled_from(PREFIXES),
        tail=st.lists(st.integers(0, 5), max_size=10),
        commit=st.booleans(),
        layerwise=st.booleans(),
    )
    def request(self, prefix, tail, commit, layerwise):
        toks = prefix + tail
        try:
            seq = self.pool.begin(toks, layerwise=layerwise)
        except ResourceExhaustedError:
            assert self.live, "only live sequences may hold every page"
            return
        check_cached(self.pool, seq, toks)
        compute(self.pool, seq, toks)
        if commit:
            self.pool.commit(seq, toks)
        self.live.append((seq, toks))

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def finish(self, i):
        seq, _ = self.live.pop(i % len(self.live))
        self.pool.release(seq)

    @invariant()
    def pages_are_accounted_for(self):
        st_ = self.pool.stats()
        live_private = set()
        for seq, _ in self.live:
            shared = {p for c in seq._chunks for p in c.pages}
            live_private.update(p for p in seq.page_table if p not in shared)
        cached = {p for c in self.pool._chunks.values() for p in c.pages}
        assert not (live_private & cached), "a page is both private and in a cached chunk"
        assert len(live_private) + len(cached) + st_["pages_free"] == st_["pages_total"]
        lower = st_["lower"]
        assert lower["blocks"]["used_blocks"] <= lower["capacity_chunks"]

    def teardown(self):
        for seq, _ in self.live:
            self.pool.release(seq)
        self.pool.close()


class TieredRestartMachine(RuleBasedStateMachine):
    """Requests over GPU pages, CPU and disk tiers, with restarts of the whole engine.

    The model: the KV a page must hold is a function of its prefix (page_value); the tiers'
    capacities are the pool's pages, the CPU tier's blocks and the disk file's slots. After every
    begin, each cached page holds exactly its prefix's KV; no tier exceeds its capacity; after a
    restart only the disk tier remains, and whatever it serves is still exact.
    """

    def __init__(self):
        super().__init__()
        import tempfile

        self.dir = tempfile.TemporaryDirectory(dir=".")
        self.pool = self._open()
        self.live = []

    def _open(self):
        return make_pool(
            num_pages=8,
            cpu_chunks=2,
            disk_dir=self.dir.name,
            disk_bytes=8 * (4096 + 4096) + (1 << 20),
            disk_admit_min_seen=1,
        )

    @rule(prefix=st.sampled_from(PREFIXES), tail=st.lists(st.integers(0, 3), min_size=8, max_size=16))
    def request(self, prefix, tail):
        toks = prefix + tail
        try:
            seq = self.pool.begin(toks)
        except ResourceExhaustedError:
            assert self.live
            return
        check_cached(self.pool, seq, toks)
        RESTART_COVERAGE["lower_hit_tokens"] += seq.lower_hit_tokens
        compute(self.pool, seq, toks)
        self.pool.commit(seq, toks)
        self.live.append(seq)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def finish(self, i):
        self.pool.release(self.live.pop(i % len(self.live)))

    @rule()
    def restart(self):
        for seq in self.live:
            self.pool.release(seq)
        self.live = []
        self.pool.close()
        self.pool = self._open()
        RESTART_COVERAGE["recovered_slots"] += self.pool.stats()["lower"]["disk"]["recovered_slots"]

    @invariant()
    def tiers_within_capacity(self):
        st_ = self.pool.stats()
        lower = st_["lower"]
        assert st_["pages_free"] <= st_["pages_total"]
        assert lower["blocks"]["used_blocks"] <= lower["capacity_chunks"]
        assert lower["disk"]["slots_used"] <= lower["disk"]["slots_total"]
        assert lower["disk"]["corrupt_detected"] == 0

    def teardown(self):
        for seq in self.live:
            self.pool.release(seq)
        self.pool.close()
        self.dir.cleanup()


# What the restart machine exercised (the last pool of each example): read by hand when changing it.
RESTART_COVERAGE = {"recovered_slots": 0, "lower_hit_tokens": 0}


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestTieredRestartMachine = TieredRestartMachine.TestCase
TestTieredRestartMachine.settings = settings(
    max_examples=25, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_layout", ["cross_layer", "vllm"])
def test_gpu_pool_shares_evicts_and_reloads_bit_exact(kv_layout):
    pool = PagedKVPool(
        num_layers=4,
        kv_heads=2,
        head_dim=64,
        num_pages=8,
        page_tokens=PT,
        chunk_tokens=CT,
        dtype=torch.bfloat16,
        device="cuda",
        kv_layout=kv_layout,
        cpu_bytes=64 << 20,
    )

    def fill(seq, toks):
        for j in range(seq.cached_tokens // PT, len(seq.page_table)):
            v = page_value(toks, j)
            p = seq.page_table[j]
            if kv_layout == "cross_layer":
                pool.kv[p] = v
            else:
                for t in pool.kv:
                    t[:, p] = v

    def page(p):
        return pool.kv[p] if kv_layout == "cross_layer" else torch.stack([t[:, p] for t in pool.kv])

    a = list(range(16))
    s = pool.begin(a)
    fill(s, a)
    pool.commit(s, a)
    want = [page(p).clone() for p in s.page_table]
    pool.release(s)
    for i in range(3):
        o = [1000 * (i + 1) + t for t in range(16)]
        q = pool.begin(o)
        fill(q, o)
        pool.commit(q, o)
        pool.release(q)
    b = pool.begin(a)
    assert b.lower_hit_tokens == 16
    b.wait()
    for j, p in enumerate(b.page_table):
        assert torch.equal(page(p), want[j])
    assert pool.stats()["lower"]["pinned"]


def test_concurrent_requests_from_threads_keep_pages_consistent():
    import threading

    pool = make_pool(num_pages=32, cpu_chunks=8)
    errors = []

    def worker(w):
        try:
            for i in range(40):
                toks = PREFIXES[(w + i) % 3] + [w, i % 4]
                seq = pool.begin(toks)
                check_cached(pool, seq, toks)
                compute(pool, seq, toks)
                pool.commit(seq, toks)
                pool.release(seq)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    st_ = pool.stats()
    assert st_["gpu_referenced_chunks"] == 0
    assert st_["pages_free"] + sum(len(c.pages) for c in pool._chunks.values()) == 32


def test_decode_steps_after_a_load_ask_each_load_once_per_layer(monkeypatch):
    """Regression: a decode step asked every loaded chunk's handle for every layer, thousands of
    core calls a step at 32k tokens (decode ran 0.32x of a GPU-only pool). Chunks loaded together
    share one handle, asked once per layer, and not at all once every layer has landed."""
    from kvtier.cache import LoadHandle

    pool = make_pool(num_pages=24, cpu_chunks=8)
    toks = list(range(32))  # 4 chunks
    a = pool.begin(toks)
    compute(pool, a, toks)
    pool.commit(a, toks)
    pool.release(a)
    filler = pool.begin([5000 + t for t in range(24 * PT)])  # evicts them into the CPU tier
    pool.release(filler)
    calls = []
    real = LoadHandle.wait_layer
    monkeypatch.setattr(
        LoadHandle, "wait_layer", lambda self, layer, t=None: (calls.append(layer), real(self, layer, t))
    )
    b = pool.begin(toks + [1])
    assert b.lower_hit_tokens == 32 and len(b._chunks) == 4
    for _step in range(3):
        for layer in range(pool.num_layers):
            b.wait_layer(layer)
    assert calls[: pool.num_layers] == list(range(pool.num_layers))  # one handle, once a layer
    assert len(calls) <= 2 * pool.num_layers  # and soon none at all
    check_cached(pool, b, toks)


def test_load_handle_remembers_landed_layers():
    from types import SimpleNamespace

    from kvtier.cache import LoadHandle

    class Transfer:
        done = False

        def __init__(self):
            self.calls = []

        def wait_layer(self, layer, timeout_s):
            self.calls.append(layer)

        def wait(self, timeout_s):
            self.calls.append("all")

    t = Transfer()
    h = LoadHandle(SimpleNamespace(transfer=t), 16, 3, 1.0)
    for _ in range(4):
        for layer in range(3):
            h.wait_layer(layer)
    assert t.calls == [0, 1, 2] and h.done()
    h.wait()
    h.wait()
    assert t.calls == [0, 1, 2, "all"]
    with pytest.raises(Exception, match="layer must be in"):
        h.wait_layer(3)


def test_stream_waits_stop_once_the_load_is_known_to_have_landed():
    """The GPU path of the reference engine orders its stream on each layer of a load
    (stream_wait_layer) and checks the load on the host at the end of the prefill (wait): after
    that, decode steps make no call into the load at all (no per-step cost of the tiers)."""
    from types import SimpleNamespace

    from kvtier.cache import LoadHandle
    from kvtier.pool import Sequence

    class Transfer:
        done = False

        def __init__(self):
            self.calls = []

        def stream_wait_layer(self, layer, stream):
            self.calls.append(("stream", layer, stream))

        def wait(self, timeout_s):
            self.calls.append("wait")

    t = Transfer()
    h = LoadHandle(SimpleNamespace(transfer=t), 16, 3, 1.0)
    seq = Sequence(0, 17, [0, 1])
    seq._loads.append((0, h))
    for layer in range(3):  # the prefill: the stream waits on each layer, the host on nothing
        seq.stream_wait_layer(layer, 7)
    assert t.calls == [("stream", 0, 7), ("stream", 1, 7), ("stream", 2, 7)]
    seq.wait()  # the end of the prefill: the load's errors would raise here
    assert t.calls[-1] == "wait"
    before = len(t.calls)
    for _step in range(5):  # decode steps
        for layer in range(3):
            seq.stream_wait_layer(layer, 7)
            seq.wait_layer(layer)
    assert len(t.calls) == before
    with pytest.raises(Exception, match="layer must be in"):
        h.stream_wait_layer(3, 7)


def test_write_through_stores_at_commit_and_evicts_without_copying():
    pool = make_pool(num_pages=8, write_through=True)
    toks = list(range(16))
    a = pool.begin(toks)
    compute(pool, a, toks)
    assert pool.commit(a, toks) == 2
    pool.cache.drain()
    assert pool.stats()["offloaded_chunks"] == 2
    assert pool.cache.lookup(toks) == 16  # in the CPU tier while still in GPU pages
    pool.release(a)
    filler = pool.begin([7000 + t for t in range(32)])  # needs every page: evicts both chunks
    pool.release(filler)
    st_ = pool.stats()
    assert st_["evicted_chunks"] == 2 and st_["offloaded_chunks"] == 2  # no second copy
    b = pool.begin(toks)
    assert b.lower_hit_tokens == 16
    check_cached(pool, b, toks)
    with pytest.raises(Exception, match="write_through must be a bool"):
        make_pool(write_through="yes")


class _FailingLoads:
    """The pool's CPU tier, except that while ``failing``, loads claim ``chunks`` hits and their
    copy fails (a read error, a peer gone mid-transfer) after writing junk into the pages."""

    def __init__(self, tier, chunks: int) -> None:
        self._tier, self._chunks = tier, chunks
        self.pool = None
        self.failing = False

    def __getattr__(self, name):
        return getattr(self._tier, name)

    def lookup(self, keys):
        if not self.failing:
            return self._tier.lookup(keys)
        return max(self._tier.lookup(keys), self._chunks)

    def load(self, keys, pages, stream):
        if not self.failing:
            return self._tier.load(keys, pages, stream)
        from types import SimpleNamespace

        from kvtier.errors import CorruptionError

        self.pool.kv[torch.as_tensor(pages)] = -1.0

        class Transfer:
            done = True

            def wait(self, timeout_s):
                raise CorruptionError("payload checksum mismatch (injected)")

            def wait_layer(self, layer, timeout_s):
                self.wait(timeout_s)

        return SimpleNamespace(chunks=self._chunks, transfer=Transfer())


@pytest.mark.parametrize("waited", [True, False])
def test_a_chunk_whose_load_failed_is_never_shared_or_stored(waited, monkeypatch):
    """A load that fails leaves junk in its pages: its chunks leave the index, so neither a later
    request (GPU hit) nor an eviction (offload into the CPU tier) takes the junk for the KV."""
    from kvtier.errors import CorruptionError

    tiers = []
    wrap_cpu_tiers(monkeypatch, lambda t: tiers.append(_FailingLoads(t, 2)) or tiers[-1])
    pool = make_pool(num_pages=8, cpu_chunks=6)
    tier = tiers[0]
    tier.pool = pool
    toks = list(range(16))
    tier.failing = True
    a = pool.begin(toks)
    tier.failing = False
    assert a.lower_hit_tokens == 16
    if waited:  # the request sees the failure
        with pytest.raises(CorruptionError):
            a.wait_layer(0)
        d = pool.begin(toks)
        assert d.cached_tokens == 0  # not shared
        pool.release(d)
    pool.release(a)  # (or it is released without waiting: the eviction finds the failure)
    filler = pool.begin([9000 + t for t in range(32)])  # every page: evicts whatever is cached
    pool.release(filler)
    assert pool.cache.lookup(toks) == 0  # the junk was not offloaded
    assert pool.stats()["failed_load_chunks_dropped"] == 2
    b = pool.begin(toks)
    assert b.cached_tokens == 0
    compute(pool, b, toks)
    assert pool.commit(b, toks) == 2
    c = pool.begin(toks + [1])
    assert c.gpu_hit_tokens == 16
    check_cached(pool, c, toks)
    pool.release(b)
    pool.release(c)
    st_ = pool.stats()
    assert st_["pages_free"] + sum(len(ch.pages) for ch in pool._chunks.values()) == 8
    pool.close()


class _HeldOffloads:
    """The pool's CPU tier, except that while ``holding``, a store's copy (done at once, for
    real) is reported in flight until the test lets it end, layer by layer: ``release(layer)``
    (``None``: every layer). Its pages then count as still read, as a slow offload's would."""

    def __init__(self, tier) -> None:
        self._tier = tier
        self.holding = False
        self.held = []

    def __getattr__(self, name):
        return getattr(self._tier, name)

    def store(self, keys, pages, stream):
        op = self._tier.store(keys, pages, stream)
        if op.transfer is not None:
            op.transfer.wait(10.0)
        if not self.holding or not op.chunks:
            return op
        from types import SimpleNamespace

        held = _HeldTransfer(2)
        self.held.append(held)
        return SimpleNamespace(chunks=op.chunks, skipped_full=op.skipped_full, transfer=held)


class _HeldTransfer:
    def __init__(self, layers: int) -> None:
        import threading

        self._layers = [threading.Event() for _ in range(layers)]

    def release(self, layer=None) -> None:
        for i, e in enumerate(self._layers):
            if layer is None or i == layer:
                e.set()

    @property
    def done(self) -> bool:
        return all(e.is_set() for e in self._layers)

    def wait_layer(self, layer, timeout_s):
        from kvtier.errors import DeadlineExceededError

        if not self._layers[layer].wait(timeout_s):
            raise DeadlineExceededError(f"layer {layer} still copying (held)")

    def wait(self, timeout_s):
        for layer in range(len(self._layers)):
            self.wait_layer(layer, timeout_s)


def test_pages_an_offload_still_reads_wait_for_it_or_go_to_a_layerwise_request(monkeypatch):
    import threading

    from kvtier.errors import DeadlineExceededError

    tiers = []
    wrap_cpu_tiers(monkeypatch, lambda t: tiers.append(_HeldOffloads(t)) or tiers[-1])
    pool = make_pool(num_pages=8, cpu_chunks=8, timeout_s=0.5)
    tier = tiers[0]

    def evict_all(base):
        """Cache a 2-chunk prompt, then hold the offload of the eviction that the next begin makes."""
        toks = [base + t for t in range(16)]
        s = pool.begin(toks)
        compute(pool, s, toks)
        pool.commit(s, toks)
        pool.release(s)
        return toks

    # Layerwise: the pages come at once; each layer is writable once the offload copied it.
    a = evict_all(1000)
    tier.holding = True
    seq = pool.begin([5000 + t for t in range(32)], layerwise=True)  # every page: evicts a's chunks
    (held,) = tier.held
    assert len(seq._page_readers) == 1 and not held.done
    with pytest.raises(DeadlineExceededError):
        seq.wait_writable(0, timeout_s=0.05)
    held.release(0)
    seq.wait_writable(0)
    with pytest.raises(DeadlineExceededError):
        seq.wait_writable(1, timeout_s=0.05)
    threading.Timer(0.05, held.release).start()
    seq.wait()  # the rest of the offload
    assert seq._page_readers == []
    compute(pool, seq, [5000 + t for t in range(32)])
    pool.release(seq)
    tier.holding = False
    assert pool.cache.lookup(a) == 16  # the offload stored a's chunks

    # By default the begin itself waits until the offload ended.
    evict_all(2000)
    tier.holding = True
    tier.held.clear()
    got = []
    t = threading.Thread(target=lambda: got.append(pool.begin([6000 + t for t in range(32)])))
    t.start()
    t.join(0.2)
    assert t.is_alive() and not got  # still waiting for the held offload
    tier.held[0].release()
    t.join(5)
    assert got and got[0]._page_readers == []
    pool.release(got[0])

    # An offload past the deadline: the begin raises, and the pool keeps every page accounted for.
    tier.holding = False
    evict_all(3000)
    tier.holding = True
    tier.held.clear()
    with pytest.raises(DeadlineExceededError):
        pool.begin([7000 + t for t in range(32)])
    st_ = pool.stats()
    assert st_["gpu_referenced_chunks"] == 0
    assert st_["pages_free"] + sum(len(c.pages) for c in pool._chunks.values()) == 8
    tier.held[0].release()
    tier.holding = False
    s = pool.begin([7000 + t for t in range(32)])  # the pages are free once it ended
    pool.release(s)
    pool.close()
