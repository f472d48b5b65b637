"""Python policy hooks replace built-ins without rebuilding: GPU-pool eviction, disk admission,
prefetch, and a failing hook that must not break the cache."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import kvtier
from _util import toks
from kvtier.policies import AdmissionPolicy, EvictionPolicy, LRUEviction, PrefetchAll, SeenAtLeast, pick_victims
from kvtier.pool import PagedKVPool


def run_requests(pool, prompts):
    for prompt in prompts:
        s = pool.begin(prompt)
        pool.commit(s, prompt)
        pool.release(s)


def test_custom_gpu_eviction_policy_changes_what_stays():
    class MostRecentFirst:
        def choose_victims(self, candidates, pages_needed):
            return [c.key for c in sorted(candidates, key=lambda c: -c.last_use)]

    assert isinstance(MostRecentFirst(), EvictionPolicy) and isinstance(LRUEviction(), EvictionPolicy)
    a, b, c = list(range(8)), list(range(100, 108)), list(range(200, 208))  # one chunk each
    kept = {}
    for name, policy in (("lru", None), ("mru", MostRecentFirst())):
        pool = PagedKVPool(
            num_layers=1,
            kv_heads=1,
            head_dim=8,
            num_pages=4,
            page_tokens=4,
            chunk_tokens=8,
            dtype=torch.float32,
            cpu_bytes=0,
            eviction_policy=policy,
        )
        run_requests(pool, [a, b, c])  # c needs a's or b's pages
        keys = {k: pool.keyer.keys(t)[0] for k, t in (("a", a), ("b", b))}
        kept[name] = sorted(n for n, k in keys.items() if k in pool._chunks)
    assert kept == {"lru": ["b"], "mru": ["a"]}


def tiered(tmp_path, cpu_chunks=2):
    kv = [torch.randn(2, 64, 16, 2, 64) for _ in range(2)]
    layout = kvtier.Layout.from_vllm(kv, chunk_tokens=32)
    cache = kvtier.KVCache(
        layout,
        cpu_bytes=cpu_chunks * layout.chunk_bytes,
        disk_dir=str(tmp_path),
        disk_bytes=32 * layout.chunk_bytes + (1 << 20),
        disk_admit_min_seen=99,
    )
    return kv, layout, cache


def test_admission_hook_decides_what_goes_to_disk(tmp_path):
    _kv, layout, cache = tiered(tmp_path)
    ct = layout.chunk_tokens
    a, b = toks(ct, 1), toks(ct, 2)
    wanted = set(cache.keyer.keys(a))
    calls = []

    class OnlyA:
        def admit(self, keys, seen):
            calls.append((list(keys), list(seen)))
            return [k in wanted for k in keys]

    assert isinstance(OnlyA(), AdmissionPolicy) and isinstance(SeenAtLeast(), AdmissionPolicy)
    cache.tier.set_admission_hook(OnlyA().admit)
    cache.store(a, [0, 1]).wait()
    cache.store(b, [2, 3]).wait()
    cache.store(toks(2 * ct, 3), [4, 5, 6, 7]).wait()  # evicts a and b
    cache.drain()
    assert [len(k) for k, _ in calls] and all(s == [1] * len(s) for _, s in calls)
    disk = cache.stats()["disk"]
    assert disk["demotions_written"] == 1 and disk["demotions_rejected"] == 1
    assert cache.lookup(a) == ct and cache.lookup(b) == 0
    cache.tier.set_admission_hook(None)  # back to the built-in rule (seen >= 99: nothing)


def test_failing_admission_hook_admits_nothing_and_the_cache_keeps_serving(tmp_path, capsys):
    _kv, layout, cache = tiered(tmp_path)
    ct = layout.chunk_tokens

    def broken(keys, seen):
        raise RuntimeError("policy bug")

    cache.tier.set_admission_hook(broken)
    a = toks(ct, 1)
    cache.store(a, [0, 1]).wait()
    cache.store(toks(2 * ct, 2), [2, 3, 4, 5]).wait()
    cache.drain()
    assert "policy bug" in capsys.readouterr().err
    assert cache.stats()["disk"]["demotions_rejected"] == 1
    assert cache.lookup(toks(2 * ct, 2)) == 2 * ct


def test_prefetch_reads_disk_chunks_into_the_cpu_tier_ahead_of_the_load(tmp_path):
    kv, layout, cache = tiered(tmp_path, cpu_chunks=3)
    cache.tier.set_admission_hook(SeenAtLeast(1).admit)
    ct = layout.chunk_tokens
    a = toks(2 * ct, 1)
    original = [t[:, 0:4].clone() for t in kv]
    cache.store(a, [0, 1, 2, 3]).wait()
    cache.store(toks(3 * ct, 2), list(range(10, 16))).wait()  # a goes to disk
    cache.drain()
    keys = b"".join(cache.keyer.keys(a))
    assert cache.tier.lookup_tiers(keys) == bytes([2, 2])
    policy = PrefetchAll()
    n = policy.prefetch(2, ["disk", "disk"])
    assert cache.tier.prefetch(keys[: 16 * n]) == 2
    cache.drain()
    assert cache.tier.lookup_tiers(keys) == bytes([1, 1])
    assert cache.stats()["disk"]["chunks_prefetched"] == 2
    assert cache.load(a, [40, 41, 42, 43]).wait() == 2 * ct
    for t, o in zip(kv, original):
        assert torch.equal(t[:, 40:44], o)


def test_kvcache_wires_policies_and_prefetches_on_lookup(tmp_path):
    kv = [torch.randn(2, 64, 16, 2, 64) for _ in range(2)]
    layout = kvtier.Layout.from_vllm(kv, chunk_tokens=32)
    ct = layout.chunk_tokens
    cache = kvtier.KVCache(
        layout,
        cpu_bytes=3 * layout.chunk_bytes,
        disk_dir=str(tmp_path),
        disk_bytes=32 * layout.chunk_bytes + (1 << 20),
        eviction_policy="s3fifo",
        admission_policy=SeenAtLeast(1),
    )
    a = toks(2 * ct, 1)
    cache.store(a, [0, 1, 2, 3]).wait()
    cache.store(toks(3 * ct, 2), list(range(10, 16))).wait()  # a -> disk (admitted by the policy)
    cache.drain()
    assert cache.stats()["disk"]["demotions_written"] >= 2
    assert cache.lookup(a) == 2 * ct  # finds a on disk and starts reading it back
    cache.drain()
    st = cache.stats()
    assert st["disk"]["chunks_prefetched"] == 2
    keys = b"".join(cache.keyer.keys(a))
    assert cache.tier.lookup_tiers(keys) == bytes([1, 1])  # in the CPU tier before any load
    with pytest.raises(ValueError, match="eviction_policy"):
        kvtier.KVCache(layout, cpu_bytes=3 * layout.chunk_bytes, eviction_policy="random")


@pytest.mark.parametrize("deterministic", [True, False])
def test_a_prefetch_never_evicts_the_chunks_it_has_just_read(tmp_path, deterministic):
    # Two of the pool's three blocks are pinned by a reader: the prefetch of a two-chunk prefix has
    # room for one. It keeps the head: reserving the second chunk must not evict the first, whose
    # read may already have landed.
    kv = [torch.randn(2, 64, 16, 2, 64) for _ in range(2)]
    layout = kvtier.Layout.from_vllm(kv, chunk_tokens=32)
    cache = kvtier.KVCache(
        layout,
        cpu_bytes=3 * layout.chunk_bytes,
        disk_dir=str(tmp_path),
        disk_bytes=32 * layout.chunk_bytes + (1 << 20),
        deterministic_writeback=deterministic,
    )
    ct = layout.chunk_tokens
    a, b = toks(2 * ct, 1), toks(3 * ct, 2)
    a_keys = set(cache.keyer.keys(a))
    # Only a goes to disk: b's evictions free their blocks at once.
    cache.tier.set_admission_hook(lambda keys, seen: [k in a_keys for k in keys])
    cache.store(a, [0, 1, 2, 3]).wait()
    cache.store(b, list(range(10, 16))).wait()  # a -> disk
    cache.drain()
    keys = b"".join(cache.keyer.keys(a))
    b_tail = b"".join(cache.keyer.keys(b)[1:])
    assert cache.tier.lookup_tiers(keys) == bytes([2, 2])
    pinned = cache.tier.acquire_blobs(b_tail)
    assert len(pinned) == 2
    assert cache.tier.prefetch(keys) == 1
    cache.drain()
    assert cache.tier.lookup_tiers(keys) == bytes([1, 2])
    assert cache.stats()["disk"]["chunks_prefetched"] == 1
    cache.tier.release_blobs(b_tail)
    assert cache.load(a, [40, 41, 42, 43]).wait() == 2 * ct  # the tail from disk, behind the head
    cache.close()


@settings(max_examples=200, deadline=None)
@given(
    pages=st.lists(st.integers(1, 8), max_size=40),
    needed=st.integers(0, 80),
)
def test_pick_victims_without_a_policy_is_the_built_in_lru(pages, needed):
    from dataclasses import dataclass

    @dataclass
    class Chunk:
        key: bytes
        pages: int
        last_use: int = 0
        uses: int = 1

    chunks = [Chunk(i.to_bytes(16, "little"), p, last_use=i) for i, p in enumerate(pages)]
    lazy = pick_victims(iter(chunks), needed, lambda c: c.pages)
    assert lazy == pick_victims(chunks, needed, lambda c: c.pages, LRUEviction())
    freed = sum(c.pages for c in lazy)
    assert freed >= min(needed, sum(pages))  # enough pages, or every candidate
    assert lazy == chunks[: len(lazy)]  # least recently used first
    assert not lazy or freed - lazy[-1].pages < needed  # no more than needed
