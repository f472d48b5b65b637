"""A call either fails before anything is submitted or returns its future; bookkeeping beside a
submitted copy (metrics, the peer digest and its key journal) degrades and is counted, never
raised; close() always drains and releases. Faults are injected where they happen for real (a
journal path that cannot be written, a metrics sink that raises), not by patching kvtier."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from _util import wait_until
from kvtier import KVCache, Layout
from kvtier.errors import InvalidArgumentError

PAGES = 32
PPC = 2  # pages per chunk
SECRET = "s" * 32


def make_layout():
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(2, PAGES, 4, 2, 8, generator=gen) for _ in range(2)]
    return tensors, Layout.from_vllm(tensors, chunk_tokens=4 * PPC)


def page_bytes(tensors, p) -> bytes:
    return b"".join(t[i, p].contiguous().view(torch.uint8).numpy().tobytes() for t in tensors for i in range(2))


class RaisingMetrics:
    """A metrics sink that fails on every call (a full disk under its exporter, say)."""

    def __init__(self) -> None:
        self.calls = 0

    def observe_latency(self, op, seconds) -> None:
        self.calls += 1
        raise OSError(28, "No space left on device")

    def close(self) -> None:
        raise RuntimeError("exporter already gone")


def open_cache(tmp_path, *, peers: bool):
    tensors, layout = make_layout()
    kw = {}
    if peers:
        journal = tmp_path / "p2p-keys.journal"
        journal.mkdir()  # the journal cannot be opened for appending: every append fails
        kw["peers"] = {"listen": "127.0.0.1:0", "secret": SECRET}
        kw["disk_dir"] = None
    cache = KVCache(layout, cpu_bytes=64 * layout.chunk_bytes, method="cpu", **kw)
    return tensors, layout, cache


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n_chunks=st.integers(1, 6), metrics_fail=st.booleans(), rounds=st.integers(1, 3), seed=st.integers(0, 99))
def test_store_returns_its_future_whatever_its_bookkeeping_does(tmp_path_factory, n_chunks, metrics_fail, rounds, seed):
    tmp = tmp_path_factory.mktemp("bk")
    tensors, layout, cache = open_cache(tmp, peers=False)
    sink = RaisingMetrics()
    if metrics_fail:
        cache.metrics = sink
    rng = np.random.default_rng(seed)
    try:
        for _r in range(rounds):
            tokens = rng.integers(0, 50_000, n_chunks * layout.chunk_tokens).tolist()
            pages = list(range(n_chunks * PPC))
            before = [page_bytes(tensors, p) for p in pages]
            fut = cache.store(tokens, pages)  # must not raise: the copy is submitted
            fut.wait()
            for t in tensors:  # the caller reuses its pages only after the future completed
                t[:, : n_chunks * PPC].zero_()
            dst = list(range(PAGES - n_chunks * PPC, PAGES))
            h = cache.load(tokens, dst)
            assert h.wait() == n_chunks * layout.chunk_tokens
            assert [page_bytes(tensors, p) for p in dst] == before
        # every timed call (store, load) failed its metrics call once; none of it was raised
        assert cache.stats()["bookkeeping_errors"] == (sink.calls if metrics_fail else 0)
        assert sink.calls == (2 * rounds if metrics_fail else 0)
    finally:
        cache.close()  # a metrics sink that raises at close is counted, not raised


def test_a_journal_that_cannot_be_written_never_fails_a_store(tmp_path):
    """Peers on, the key journal unwritable (a full disk in production): store() returns its
    future, the chunks hold the bytes the pages held when the future completed, close() works."""
    tensors, layout = make_layout()
    (tmp_path / "p2p-keys.journal").mkdir()
    from kvtier.p2p.service import KeyJournal  # the journal peers keep in the disk directory

    journal = KeyJournal(str(tmp_path))
    journal.append([b"k" * 16])  # must not raise
    journal.rewrite([b"k" * 16])
    journal.close()
    assert journal.errors == 2

    cache = KVCache(
        layout, cpu_bytes=64 * layout.chunk_bytes, method="cpu", peers={"listen": "127.0.0.1:0", "secret": SECRET}
    )
    try:
        tokens = list(range(3 * layout.chunk_tokens))
        pages = list(range(3 * PPC))
        before = [page_bytes(tensors, p) for p in pages]
        cache.store(tokens, pages).wait()
        for t in tensors:
            t.zero_()
        h = cache.load(tokens, list(range(10, 10 + 3 * PPC)))
        h.wait()
        assert [page_bytes(tensors, p) for p in range(10, 10 + 3 * PPC)] == before
    finally:
        cache.close()


def test_close_drains_and_releases_whatever_fails(tmp_path):
    _tensors, layout, cache = open_cache(tmp_path, peers=False)
    cache.metrics = RaisingMetrics()
    tokens = list(range(4 * layout.chunk_tokens))
    cache.store(tokens, list(range(4 * PPC)))  # not waited: close() must drain it
    cache.close()  # the metrics sink raises at close: counted, and the tier is still released
    cache.close()  # idempotent
    for call in (
        cache.stats,
        cache.drain,
        lambda: cache.lookup(tokens),
        lambda: cache.store(tokens, list(range(4 * PPC))),
    ):
        with pytest.raises(InvalidArgumentError, match="this KVCache is closed"):
            call()


def test_meta_tensors_are_a_clear_error_and_change_nothing(tmp_path):
    _tensors, layout, cache = open_cache(tmp_path, peers=False)
    try:
        tokens = list(range(2 * layout.chunk_tokens))
        cache.store(tokens, list(range(2 * PPC))).wait()
        with pytest.raises(ValueError, match="meta device"):
            cache.store(torch.zeros(2 * layout.chunk_tokens, dtype=torch.long, device="meta"), [0, 1, 2, 3])
        with pytest.raises(ValueError, match="meta device"):
            cache.lookup(torch.zeros(8, dtype=torch.long, device="meta"))
        with pytest.raises(InvalidArgumentError, match="meta device"):
            cache.load(tokens, torch.zeros(4, dtype=torch.long, device="meta"))
        assert cache.lookup(tokens) == 2 * layout.chunk_tokens
    finally:
        cache.close()


def test_store_pages_changed_before_the_future_completes_are_counted_with_verify_stores():
    """cpu.verify_stores: a chunk whose pages changed before its store's future completed is
    found and counted (store()'s page contract); with the contract kept, nothing is counted."""
    tensors, layout = make_layout()
    cache = KVCache(layout, cpu_bytes=64 * layout.chunk_bytes, method="cpu", verify_stores=True)
    try:
        good = list(range(2 * layout.chunk_tokens))
        cache.store(good, list(range(2 * PPC))).wait()
        cache.store(good, list(range(2 * PPC))).wait()  # already cached: nothing to check
        s = cache.stats()
        assert (s["store_verify_chunks"], s["store_verify_mismatches"]) == (2, 0)
        # Break the contract as a harness did: the copy has landed (its chunks are visible), the
        # caller has not seen the future complete, and it already writes new KV into the pages.
        bad = list(range(1000, 1000 + 3 * layout.chunk_tokens))
        fut = cache.store(bad, list(range(4 * PPC, 7 * PPC)))
        wait_until(lambda: cache.lookup(bad) == 3 * layout.chunk_tokens)
        for t in tensors:
            t[:, 4 * PPC : 6 * PPC].add_(1)  # two of its three chunks change
        fut.wait()
        s = cache.stats()
        assert (s["store_verify_chunks"], s["store_verify_mismatches"]) == (5, 2)
    finally:
        cache.close()


def test_verify_stores_checks_unwaited_stores_by_drain():
    _tensors, layout = make_layout()
    with KVCache(layout, cpu_bytes=64 * layout.chunk_bytes, method="cpu", verify_stores=True) as cache:
        for i in range(4):
            cache.store(list(range(i * 100, i * 100 + layout.chunk_tokens)), list(range(i * PPC, (i + 1) * PPC)))
        cache.drain()
        s = cache.stats()
        assert (s["store_verify_chunks"], s["store_verify_mismatches"]) == (4, 0)


def test_verify_stores_follows_the_environment(monkeypatch):
    _tensors, layout = make_layout()
    monkeypatch.setenv("KVTIER_CPU_VERIFY_STORES", "1")
    with KVCache(layout, cpu_bytes=8 * layout.chunk_bytes, method="cpu") as cache:
        assert cache.config.verify_stores is True
    monkeypatch.setenv("KVTIER_CPU_VERIFY_STORES", "maybe")
    with pytest.raises(InvalidArgumentError, match="KVTIER_CPU_VERIFY_STORES"):
        KVCache(layout, cpu_bytes=8 * layout.chunk_bytes, method="cpu")
    assert os.environ["KVTIER_CPU_VERIFY_STORES"] == "maybe"


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["direct", "staged", "zero_copy"])
def test_verify_stores_on_a_gpu(gpu, method):
    """The same check over GPU pages, for every copy method: a kept contract counts nothing,
    pages changed after the copy landed but before the future was seen complete are counted."""
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(2, PAGES, 4, 2, 8, generator=gen).to(gpu) for _ in range(2)]
    layout = Layout.from_vllm(tensors, chunk_tokens=4 * PPC)
    with KVCache(
        layout, cpu_bytes=64 * layout.chunk_bytes, method=method, verify_stores=True, staging_bytes=1 << 20
    ) as cache:
        good = list(range(3 * layout.chunk_tokens))
        cache.store(good, list(range(3 * PPC))).wait()
        s = cache.stats()
        assert (s["store_verify_chunks"], s["store_verify_mismatches"]) == (3, 0)
        bad = list(range(1000, 1000 + 2 * layout.chunk_tokens))
        fut = cache.store(bad, list(range(4 * PPC, 6 * PPC)))
        wait_until(lambda: cache.lookup(bad) == 2 * layout.chunk_tokens)
        for t in tensors:
            t[:, 4 * PPC : 5 * PPC].add_(1)
        torch.cuda.synchronize()
        fut.wait()
        s = cache.stats()
        assert (s["store_verify_chunks"], s["store_verify_mismatches"]) == (5, 1)
