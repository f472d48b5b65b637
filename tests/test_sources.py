"""A KVCache with a ChunkSource of the test's own (kvtier.sources), no kvtier.p2p: what the cache
asks it and tells it, and the public views the layers above the cache use."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from kvtier import ChunkSource, KVCache, Layout, sources
from kvtier.errors import FailedPreconditionError
from kvtier.pool import PagedKVPool

CT = 16  # chunk tokens; pages of 16 tokens: one page a chunk


class Upstream:
    """A source holding the chunks of ``other`` (another cache over the same layout): a lookup
    counts the leading keys ``other`` holds; a load copies them into this cache's tier first."""

    def __init__(self, cache: KVCache, other: KVCache) -> None:
        self.cache, self.other = cache, other
        self.stored: list[bytes] = []
        self.asked: list[list[bytes]] = []
        self.closed = False

    def lookup(self, keys):
        self.asked.append(list(keys))
        return self.other.tier.lookup(b"".join(keys))

    def load(self, keys, pages, stream):
        local = self.cache.tier.lookup(b"".join(keys))
        for k in keys[local:]:
            blobs = self.other.tier.acquire_blobs(k)
            if not blobs:
                break
            try:
                view = self.cache.tier.begin_put(k)
                view[:] = blobs[0]
                view.release()
                self.cache.tier.commit_put(k)
            finally:
                self.other.tier.release_blobs(k)
        return self.cache.tier.load(b"".join(keys), pages, stream)

    def note_stored(self, keys):
        self.stored.extend(keys)

    def pull_rate(self):
        return None

    def stats(self):
        return {"stored": len(self.stored)}

    def close(self):
        self.closed = True


def make_layout(seed: int):
    gen = torch.Generator().manual_seed(seed)
    kv = [torch.randn(2, 8, CT, 2, 8, generator=gen) for _ in range(2)]
    return kv, Layout.from_vllm(kv, chunk_tokens=CT)


def test_a_cache_asks_its_source_after_its_tiers_and_loads_through_it():
    kv_a, layout_a = make_layout(1)
    kv_b, layout_b = make_layout(2)
    a = KVCache(layout_a, cpu_bytes=1 << 20, method="cpu")
    made = []
    b = KVCache(
        layout_b, cpu_bytes=1 << 20, method="cpu", peers=lambda cache: made.append(Upstream(cache, a)) or made[-1]
    )
    src = made[0]
    assert b.peers is src and isinstance(src, ChunkSource) and src.cache is b
    tokens = list(range(3 * CT))
    a.store(tokens, [0, 1, 2]).wait()
    for la, lb in zip(kv_a, kv_b):
        lb[:, 5] = la[:, 0]  # b computed the first chunk itself
    b.store(tokens[:CT], [5]).wait()
    assert src.stored == b.keyer.keys(tokens[:CT])
    assert b.lookup(tokens) == 3 * CT
    assert src.asked == [b.keyer.keys(tokens)[1:]]  # only what b's tiers miss
    assert b.lookup_tiers(tokens) == ["cpu"]  # local tiers only
    assert b.load(tokens, [3, 4, 5]).wait() == 3 * CT
    for la, lb in zip(kv_a, kv_b):
        assert torch.equal(lb[:, 3:6], la[:, 0:3])
    assert b.stats()["peers"] == {"stored": 1}
    b.close()
    assert src.closed and b.tier is None
    a.close()


def test_public_views_of_a_cache():
    _, layout = make_layout(3)
    cache = KVCache(layout, cpu_bytes=1 << 20, method="cpu")
    assert cache.peers is None and cache.bookkeeping_errors == 0
    assert cache.tier.capacity_chunks == cache.stats()["capacity_chunks"]
    assert cache.keyer.keys(list(range(2 * CT))) == cache.keyer.keys(list(range(2 * CT + 3)))
    assert cache.stream_handle() == 0 and cache.stream_handle(7) == 7  # a CPU layout: no stream
    cache.close()


def test_a_pool_passes_a_source_factory_to_its_cache():
    made = []

    def factory(cache):
        made.append(Upstream(cache, cache))
        return made[-1]

    pool = PagedKVPool(
        num_layers=1,
        kv_heads=1,
        head_dim=8,
        num_pages=8,
        page_tokens=CT,
        chunk_tokens=CT,
        dtype=torch.float32,
        cpu_bytes=1 << 20,
        peers=factory,
    )
    assert pool.cache.peers is made[0]
    with pool.scratch_pages(3) as pages:
        assert len(pages) == 3 and pool.stats()["pages_free"] == 5
    assert pool.stats()["pages_free"] == 8
    pool.close()
    assert made[0].closed


def test_peer_settings_without_a_backend_name_the_way_out(monkeypatch):
    monkeypatch.setattr(sources, "_backend", None)
    with pytest.raises(FailedPreconditionError, match="peers backend"):
        sources.start_source(object(), {"listen": "127.0.0.1:0"})
