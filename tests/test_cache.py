"""KVCache end to end: store / lookup / load round trips for every layout, eviction, pins, bad input.

CPU variants run everywhere; the same cases run on a GPU (marker gpu) with every copy method.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import kvtier
from kvtier import CacheConfig, KVCache, Layout

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn]
LAYOUTS = ["vllm", "flashinfer_nhd", "flashinfer_hnd", "mla", "hf", "cross_layer"]


def random_tensor(shape, dtype, device, gen):
    """Random bit patterns of any dtype (NaNs included: comparisons are on bytes)."""
    nbytes = int(np.prod(shape)) * torch.tensor([], dtype=dtype).element_size()
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape).to(device)


class KVModel:
    """Some engine's KV tensors of one kind, plus a byte reader for page p of every segment."""

    def __init__(
        self, kind, dtype, page_tokens, device="cpu", layers=2, heads=2, dim=16, num_pages=48, chunk_pages=2, seed=0
    ):
        gen = torch.Generator().manual_seed(seed)
        self.kind, self.page_tokens, self.num_pages = kind, page_tokens, num_pages
        chunk_tokens = page_tokens * chunk_pages
        r = lambda *shape: random_tensor(shape, dtype, device, gen)  # noqa: E731
        if kind == "vllm":
            self.tensors = [r(2, num_pages, page_tokens, heads, dim) for _ in range(layers)]
            self.layout = Layout.from_vllm(self.tensors, chunk_tokens=chunk_tokens)
            self.pages = lambda p: [t[i, p] for t in self.tensors for i in range(2)]
        elif kind.startswith("flashinfer"):
            nhd = kind.endswith("nhd")
            shape = (num_pages, 2, page_tokens, heads, dim) if nhd else (num_pages, 2, heads, page_tokens, dim)
            self.tensors = [r(*shape) for _ in range(layers)]
            self.layout = Layout.from_flashinfer(
                self.tensors, kv_layout="NHD" if nhd else "HND", chunk_tokens=chunk_tokens
            )
            self.pages = lambda p: [t[p, i] for t in self.tensors for i in range(2)]
        elif kind == "mla":
            self.tensors = [r(num_pages, page_tokens, 3 * dim) for _ in range(layers)]
            self.layout = Layout.from_mla(self.tensors, chunk_tokens=chunk_tokens)
            self.pages = lambda p: [t[p] for t in self.tensors]
        elif kind == "hf":
            seq = num_pages * page_tokens
            self.tensors = [(r(1, heads, seq, dim), r(1, heads, seq, dim)) for _ in range(layers)]
            self.layout = Layout.from_hf_cache(self.tensors, page_tokens=page_tokens, chunk_tokens=chunk_tokens)
            sl = lambda p: slice(p * page_tokens, (p + 1) * page_tokens)  # noqa: E731
            self.pages = lambda p: [t[0, :, sl(p)] for kv in self.tensors for t in kv]
        elif kind == "cross_layer":
            self.tensors = [r(num_pages, layers, 2, page_tokens, heads, dim)]
            self.layout = Layout.from_cross_layer(self.tensors[0], chunk_tokens=chunk_tokens)
            self.pages = lambda p: [self.tensors[0][p]]
        else:
            raise AssertionError(kind)

    def page_bytes(self, p) -> bytes:
        return b"".join(x.contiguous().view(torch.uint8).cpu().numpy().tobytes() for x in self.pages(p))

    def snapshot(self) -> list[bytes]:
        return [self.page_bytes(p) for p in range(self.num_pages)]


def tokens_for(n_tokens, seed):
    return np.random.default_rng(seed).integers(0, 50000, n_tokens).tolist()


def roundtrip(model: KVModel, cache: KVCache, seed=1):
    rng = np.random.default_rng(seed)
    ppc = model.layout.pages_per_chunk
    n_chunks = 3
    tokens = tokens_for(n_chunks * model.layout.chunk_tokens + model.page_tokens, seed)  # + one page of a partial chunk
    perm = rng.permutation(model.num_pages)
    src = perm[: n_chunks * ppc + 1]  # the sequence's pages (last one partial)
    dst = perm[n_chunks * ppc + 1 : 2 * n_chunks * ppc + 1]
    before = model.snapshot()

    fut = cache.store(tokens, src)
    assert fut.wait() == n_chunks
    assert cache.lookup(tokens) == n_chunks * model.layout.chunk_tokens
    assert model.snapshot() == before, "store must not change the KV tensors"

    handle = cache.load(tokens, dst)
    assert handle.wait() == n_chunks * model.layout.chunk_tokens
    after = model.snapshot()
    for j in range(n_chunks * ppc):
        assert after[dst[j]] == before[src[j]], f"page {dst[j]} != source page {src[j]}"
    untouched = set(range(model.num_pages)) - set(dst[: n_chunks * ppc].tolist())
    for p in untouched:
        assert after[p] == before[p], f"page {p} was not loaded into but changed"


@pytest.mark.parametrize("page_tokens", [1, 16, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("kind", LAYOUTS)
def test_roundtrip_cpu_bit_exact(kind, dtype, page_tokens):
    model = KVModel(
        kind,
        dtype,
        page_tokens,
        num_pages=32,
        chunk_pages=2 if page_tokens > 1 else 4,
        dim=8 if page_tokens == 64 else 16,
    )
    with KVCache(model.layout, cpu_bytes=64 * model.layout.chunk_bytes) as cache:
        roundtrip(model, cache)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["auto", "direct", "staged", "zero_copy"])
@pytest.mark.parametrize("page_tokens", [1, 16, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("kind", LAYOUTS)
def test_roundtrip_gpu_bit_exact(kind, dtype, page_tokens, method):
    model = KVModel(
        kind,
        dtype,
        page_tokens,
        device="cuda",
        num_pages=32,
        chunk_pages=2 if page_tokens > 1 else 4,
        dim=8 if page_tokens == 64 else 16,
    )
    with KVCache(model.layout, cpu_bytes=64 * model.layout.chunk_bytes, method=method) as cache:
        assert cache.stats()["pinned"]
        roundtrip(model, cache)


def test_store_skips_cached_chunks_and_shares_prefixes():
    model = KVModel("vllm", torch.float32, 16)
    cache = KVCache(model.layout, cpu_bytes=64 * model.layout.chunk_bytes)
    ct = model.layout.chunk_tokens
    a = tokens_for(3 * ct, 7)
    b = a[: 2 * ct] + tokens_for(ct, 8)  # shares two chunks with a
    assert cache.store(a, list(range(6))).wait() == 3
    fut = cache.store(b, list(range(6, 12)))
    assert fut.wait() == 1 and fut.already_cached == 2
    assert cache.lookup(b) == 3 * ct
    assert cache.lookup(b[:ct] + tokens_for(2 * ct, 9)) == ct
    assert cache.stats()["chunks_stored"] == 4


def test_namespaces_do_not_share():
    model = KVModel("vllm", torch.float32, 16)
    toks = tokens_for(2 * model.layout.chunk_tokens, 3)
    a = KVCache(model.layout, cpu_bytes=8 * model.layout.chunk_bytes, model_id="m", tenant_salt="t1")
    a.store(toks, list(range(4))).wait()
    assert a.lookup(toks) == len(toks)
    # Same process, same bytes: a different tenant's keys never match the stored ones.
    b_keys = kvtier.ChunkKeyer.from_layout("m", model.layout, "t2").keys(toks)
    a_keys = kvtier.ChunkKeyer.from_layout("m", model.layout, "t1").keys(toks)
    assert set(a_keys).isdisjoint(b_keys)


def test_eviction_is_lru_and_bounded():
    model = KVModel("vllm", torch.float32, 16, num_pages=64)
    ct = model.layout.chunk_tokens
    cache = KVCache(model.layout, cpu_bytes=4 * model.layout.chunk_bytes)
    seqs = [tokens_for(ct, s) for s in range(6)]  # one chunk each, independent
    for i in range(4):
        cache.store(seqs[i], [2 * i, 2 * i + 1]).wait()
    assert cache.load(seqs[0], [40, 41]).wait() == ct  # 0 becomes most recent
    cache.store(seqs[4], [8, 9]).wait()  # evicts 1 (LRU)
    cache.store(seqs[5], [10, 11]).wait()  # evicts 2
    present = [cache.lookup(s) == ct for s in seqs]
    assert present == [True, False, False, True, True, True]
    st = cache.stats()
    assert st["index"]["evictions"] == 2
    assert st["blocks"]["used_blocks"] <= st["capacity_chunks"] == 4


def test_concurrent_stores_and_loads_from_threads():
    model = KVModel("vllm", torch.float32, 16, num_pages=256, layers=2)
    ct = model.layout.chunk_tokens
    cache = KVCache(model.layout, cpu_bytes=32 * model.layout.chunk_bytes, cpu_threads=2)
    before = model.snapshot()
    errors = []

    def worker(w):
        try:
            rng = np.random.default_rng(w)
            for _it in range(20):
                s = int(rng.integers(0, 8))  # 8 distinct sequences shared by all threads
                toks = tokens_for(2 * ct, 100 + s)
                src = [s * 4 + j for j in range(4)]  # sequence s always lives in pages 4s..4s+3
                cache.store(toks, src).wait()
                dst = [128 + w * 16 + j for j in range(4)]  # each thread loads into its own pages
                h = cache.load(toks, dst)
                n = h.wait()
                got = [model.page_bytes(p) for p in dst[: n // 16]]
                assert got == [before[p] for p in src[: n // 16]]
        except Exception as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    st = cache.stats()
    assert st["in_flight"] == 0 and st["index"]["pinned"] == 0 and st["index"]["writing"] == 0


def test_layer_waits_deliver_each_layer():
    model = KVModel("vllm", torch.float32, 16, num_pages=64, layers=4)
    ct = model.layout.chunk_tokens
    cache = KVCache(model.layout, cpu_bytes=16 * model.layout.chunk_bytes)
    toks = tokens_for(4 * ct, 5)
    original = [t.clone() for t in model.tensors]
    src, dst = list(range(8)), list(range(32, 40))
    cache.store(toks, src).wait()
    h = cache.load(toks, dst)
    for layer in range(4):
        h.wait_layer(layer)
        # Once wait_layer(layer) returns, that layer's pages hold the stored bytes.
        assert torch.equal(model.tensors[layer][:, dst].view(torch.uint8), original[layer][:, src].view(torch.uint8))
    assert h.wait() == 4 * ct
    with pytest.raises(ValueError, match="layer"):
        h.wait_layer(4)


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda c, t: c.store(t, list(range(3))), "page_ids has 3 pages"),
        (lambda c, t: c.store(t, [0, 1, 2, 99]), "out of range"),
        (lambda c, t: c.store(t, [0, 1, 1, 2]), "repeated"),
        (lambda c, t: c.store(t, [-1, 0, 1, 2]), "out of range"),
        (lambda c, t: c.store(t, np.zeros((2, 2), dtype=np.int64)), "1-D"),
        (lambda c, t: c.store(t, [0.0, 1.0, 2.0, 3.0]), "integers"),
        (lambda c, t: c.store(torch.tensor(t, dtype=torch.float32), [0, 1, 2, 3]), "float|integer"),
        (lambda c, t: c.load(t, [5, 5, 6, 7]), "repeated"),
        (lambda c, t: c.load(t, [0, 1, 2, 64]), "out of range"),
    ],
)
def test_bad_input_raises_and_changes_nothing(bad, match):
    model = KVModel("vllm", torch.float32, 16, num_pages=32)
    ct = model.layout.chunk_tokens
    cache = KVCache(model.layout, cpu_bytes=8 * model.layout.chunk_bytes)
    kept = tokens_for(ct, 11)
    cache.store(kept, [20, 21]).wait()
    before_pages = model.snapshot()
    before = cache.stats()
    with pytest.raises(ValueError, match=match):
        bad(cache, kept + tokens_for(ct, 13))
    after = cache.stats()
    assert after["index"]["entries"] == before["index"]["entries"] == 1
    assert cache.lookup(kept) == ct
    assert model.snapshot() == before_pages


def test_config_errors_name_the_key():
    model = KVModel("vllm", torch.float32, 16)
    with pytest.raises(ValueError, match="cpu_bytes"):
        KVCache(model.layout, cpu_bytes=0)
    with pytest.raises(ValueError, match="cpu_bytes"):
        KVCache(model.layout, cpu_bytes=model.layout.chunk_bytes - 1)
    with pytest.raises(ValueError, match="method"):
        KVCache(model.layout, method="teleport")
    with pytest.raises(ValueError, match="timeout_s"):
        CacheConfig(timeout_s=0)
    with pytest.raises(ValueError, match="layout"):
        KVCache("not a layout")


def test_closed_cache_refuses_calls():
    model = KVModel("vllm", torch.float32, 16)
    cache = KVCache(model.layout, cpu_bytes=4 * model.layout.chunk_bytes)
    cache.close()
    with pytest.raises(ValueError, match="closed"):
        cache.lookup([1] * 64)


def test_close_frees_the_disk_file_while_the_cache_object_lives(tmp_path):
    """A cache with peers is reopened on its directory in the same process right after close
    (a restart in place): the peer service, which also holds the tier, goes with close."""
    model = KVModel("vllm", torch.float32, 16)
    opts = dict(cpu_bytes=4 * model.layout.chunk_bytes, disk_dir=str(tmp_path), disk_bytes=16 << 20)
    cache = KVCache(model.layout, peers={"secret": b"close-test-secret-0123456789ab"}, **opts)
    tokens = list(range(2 * model.layout.chunk_tokens))
    cache.store(tokens, range(2 * model.layout.pages_per_chunk)).wait()
    cache.close()
    with KVCache(model.layout, **opts) as again:  # the file's lock is free: no FailedPreconditionError
        assert again.lookup(tokens) == len(tokens)  # persisted at close
    assert cache is not None  # the closed object was alive throughout


def test_failed_copies_leave_nothing_visible():
    """A store whose copy fails is never visible; a failed load releases its pins."""
    model = KVModel("vllm", torch.float32, 16, num_pages=32)
    layout = model.layout
    ct = layout.chunk_tokens
    tier = kvtier._core.CpuTier(
        layout.to_core_segments(),
        -1,
        layout.pages_per_chunk,
        [list(layout.layer_segments(i)) for i in range(layout.num_layers)],
        8 * layout.chunk_bytes,
        "cpu",
        1 << 20,
        2,
        fail_every_nth=2,
    )
    keyer = kvtier.ChunkKeyer.from_layout("m", layout)
    good, bad = tokens_for(2 * ct, 1), tokens_for(2 * ct, 2)
    op = tier.store(b"".join(keyer.keys(good)), np.arange(4))  # transfer 1: succeeds
    op.transfer.wait(10.0)
    op = tier.store(b"".join(keyer.keys(bad)), np.arange(4, 8))  # transfer 2: injected failure
    with pytest.raises(kvtier.errors.KVTierIOError, match="injected"):
        op.transfer.wait(10.0)
    assert tier.lookup(b"".join(keyer.keys(bad))) == 0
    st = tier.stats()
    assert st["chunks_failed"] == 2 and st["index"]["entries"] == 2 and st["index"]["writing"] == 0
    assert st["blocks"]["used_blocks"] == 2  # the failed chunks' blocks went back

    op = tier.load(b"".join(keyer.keys(good)), np.arange(10, 14))  # transfer 3: succeeds
    op.transfer.wait(10.0)
    op = tier.load(b"".join(keyer.keys(good)), np.arange(20, 24))  # transfer 4: fails
    with pytest.raises(kvtier.errors.KVTierIOError):
        op.transfer.wait(10.0)
    st = tier.stats()
    assert st["index"]["pinned"] == 0 and st["chunks_loaded"] == 2
    assert tier.lookup(b"".join(keyer.keys(good))) == 2  # the cached chunks are intact


def test_load_after_held_chunks_and_lookup_tiers():
    """skip_chunks: the caller holds the leading chunks; only the ones after them are copied,
    into the pages given. lookup_tiers: where each leading chunk is, without a prefetch."""
    model = KVModel("vllm", torch.float32, 16)
    ppc = model.layout.pages_per_chunk
    cache = KVCache(model.layout, cpu_bytes=64 * model.layout.chunk_bytes)
    ct = model.layout.chunk_tokens
    a = tokens_for(3 * ct, 7)
    cache.store(a, list(range(3 * ppc))).wait()
    assert cache.lookup_tiers(a) == ["cpu"] * 3 and cache.lookup_tiers(tokens_for(ct, 99)) == []
    dst = list(range(30, 30 + 2 * ppc))
    before = model.snapshot()  # page bytes (the random KV may hold NaN patterns)
    h = cache.load(a, dst, skip_chunks=1)
    assert h.wait() == 2 * ct
    after = model.snapshot()
    for src_p, dst_p in zip(range(ppc, 3 * ppc), dst):  # chunks 1 and 2, not chunk 0
        assert after[dst_p] == before[src_p], f"page {dst_p} != source page {src_p}"
    assert cache.load(a, list(range(40, 40 + ppc)), skip_chunks=3).wait() == 0
    with pytest.raises(ValueError, match="skip_chunks"):
        cache.load(a, dst, skip_chunks=-1)


def test_store_after_skipped_chunks():
    """store(skip_chunks=n): the pages start at chunk n (the leading chunks' pages are gone, as
    a sliding window's are); the keys still chain from the sequence's start."""
    model = KVModel("vllm", torch.float32, 16)
    ppc = model.layout.pages_per_chunk
    cache = KVCache(model.layout, cpu_bytes=64 * model.layout.chunk_bytes)
    ct = model.layout.chunk_tokens
    a = tokens_for(4 * ct, 8)
    assert cache.store(a, list(range(10, 10 + 2 * ppc)), skip_chunks=2).wait() == 2
    assert cache.lookup(a) == 0  # chunks 0 and 1 were never stored
    assert cache.lookup_tiers(a) == []
    before = model.snapshot()
    dst = list(range(40, 40 + 2 * ppc))
    assert cache.load(a, dst, skip_chunks=2).wait() == 2 * ct
    after = model.snapshot()
    for src_p, dst_p in zip(range(10, 10 + 2 * ppc), dst):
        assert after[dst_p] == before[src_p], f"page {dst_p} != source page {src_p}"
    # A sequence that shares the first chunks only does not meet the stored ones.
    b = a[: 2 * ct] + tokens_for(2 * ct, 9)
    assert cache.load(b, dst, skip_chunks=2).wait() == 0
    with pytest.raises(ValueError, match="skip_chunks"):
        cache.store(a, dst, skip_chunks=-1)
    # A sliding-window layer resumes where the chunks its window needs are cached.
    assert cache.lookup_window(a, window_tokens=ct + 1) == 4 * ct  # chunks 2 and 3 suffice
    assert cache.lookup_window(a, window_tokens=2 * ct + 1) == 4 * ct  # the 2 * ct tokens before
    assert cache.lookup_window(a, window_tokens=2 * ct + 2) == 0  # needs a token of chunk 1: gone
    assert cache.lookup_window(a, window_tokens=ct + 1, max_tokens=3 * ct) == 3 * ct
    assert cache.lookup_window(a, window_tokens=1) == 4 * ct
    with pytest.raises(ValueError, match="window_tokens"):
        cache.lookup_window(a, window_tokens=0)
    with pytest.raises(ValueError, match="page_ids"):
        cache.store(a, list(range(ppc)), skip_chunks=2)  # chunks 2 and 3 need 2 chunks of pages


def test_a_cache_dropped_mid_load_ends_its_copies_before_its_tensors_go():
    # The layout is released with the cache's attributes before the tier is: a cache dropped with
    # a load still running must wait for it, or the copy writes into freed tensors (heap
    # corruption). 64 MiB a load keeps the copy running well past the drop.
    kv = [torch.zeros(2, 256, 64, 8, 128, dtype=torch.float16) for _ in range(2)]
    layout = Layout.from_vllm(kv, chunk_tokens=64 * 64)
    cache = KVCache(layout, cpu_bytes=2 * layout.chunk_bytes)
    tokens = list(range(2 * layout.chunk_tokens))
    cache.store(tokens, list(range(0, 128))).wait()
    tier = cache.tier
    cache.load(tokens, list(range(128, 256)))
    del cache  # the load is not waited for: dropping the cache must
    assert tier.stats()["in_flight"] == 0
