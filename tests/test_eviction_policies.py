"""The CPU tier's built-in eviction policies, picked by name through ``_core.CpuTier``.

A one-pass scan of cold chunks flushes a hot working set under LRU but not under S3-FIFO or LFU,
and the hot chunks that survive load back bit-exact. CPU layout; runs everywhere.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import kvtier
from kvtier import Layout, _core

POLICIES = ["lru", "s3fifo", "lfu"]
CAPACITY_CHUNKS = 32
HOT = 8  # the working set: each chunk read a few times
SCAN = 200  # cold chunks, stored once and never read
TIMEOUT_S = 30.0


def make_kv(num_pages=64, layers=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kv = [torch.randn(2, num_pages, 16, 2, 16, generator=gen) for _ in range(layers)]
    return kv, Layout.from_vllm(kv, chunk_tokens=32)  # 2 pages per chunk


def make_tier(layout: Layout, capacity_chunks: int, **kwargs):
    return _core.CpuTier(
        layout.to_core_segments(),
        -1,
        layout.pages_per_chunk,
        [list(layout.layer_segments(i)) for i in range(layout.num_layers)],
        capacity_chunks * layout.chunk_bytes,
        **kwargs,
    )


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def pages(first_page: int, n: int) -> np.ndarray:
    return np.arange(first_page, first_page + n, dtype=np.int64)


def finish(op) -> int:
    if op.transfer is not None:
        op.transfer.wait(TIMEOUT_S)
    return op.chunks


def page_bytes(kv, page: int) -> list:
    return [t[:, page].clone() for t in kv]


def run_hot_set_then_scan(policy: str | None):
    """Stores HOT chunks and reads each 3 times, then stores SCAN cold chunks in batches of 8."""
    kv, layout = make_kv()
    ppc = layout.pages_per_chunk
    kwargs = {} if policy is None else {"eviction_policy": policy}
    tier = make_tier(layout, CAPACITY_CHUNKS, **kwargs)
    assert tier.capacity_chunks == CAPACITY_CHUNKS
    for i in range(HOT):  # hot chunk i comes from pages [2i, 2i+2)
        assert finish(tier.store(key(i), pages(i * ppc, ppc))) == 1
    for _ in range(3):
        for i in range(HOT):  # each read is its own prefix: one chunk
            assert finish(tier.load(key(i), pages(32, ppc))) == 1
    batch = 8
    for start in range(0, SCAN, batch):  # the scan reuses source pages 16..31 for its bytes
        keys = b"".join(key(1000 + start + j) for j in range(batch))
        op = tier.store(keys, pages(16, batch * ppc))
        assert finish(op) == batch and op.skipped_full == 0
    return kv, layout, tier


@pytest.mark.parametrize("policy", [None, *POLICIES])
def test_one_pass_scan_flushes_the_hot_set_only_under_lru(policy):
    kv, layout, tier = run_hot_set_then_scan(policy)
    ppc = layout.pages_per_chunk
    hot_left = [i for i in range(HOT) if tier.lookup(key(i)) == 1]
    cold_left = sum(tier.lookup(key(1000 + j)) for j in range(SCAN))
    stats = tier.stats()
    assert stats["index"]["entries"] == CAPACITY_CHUNKS
    assert stats["index"]["evictions"] == HOT + SCAN - CAPACITY_CHUNKS
    if policy in (None, "lru"):  # the default is LRU
        assert hot_left == []
        assert cold_left == CAPACITY_CHUNKS
    else:
        assert hot_left == list(range(HOT)), f"{policy} let the scan evict hot chunks"
        assert cold_left == CAPACITY_CHUNKS - HOT
        for i in hot_left:  # and what survived is the right bytes
            dst = 40 + i * ppc
            assert finish(tier.load(key(i), pages(dst, ppc))) == 1
            for p in range(ppc):
                src_page = i * ppc + p
                assert all(torch.equal(a, b) for a, b in zip(page_bytes(kv, dst + p), page_bytes(kv, src_page)))


@pytest.mark.parametrize("policy", POLICIES)
def test_pinned_chunks_survive_under_every_policy(policy):
    """A chunk being loaded is pinned: blob readers hold it while stores churn the pool."""
    _, layout = make_kv()
    ppc = layout.pages_per_chunk
    tier = make_tier(layout, 4, eviction_policy=policy)
    for i in range(4):
        finish(tier.store(key(i), pages(i * ppc, ppc)))
    views = tier.acquire_blobs(key(0) + key(1))  # pins chunks 0 and 1
    assert len(views) == 2
    for j in range(20):
        finish(tier.store(key(100 + j), pages(16, ppc)))
        assert tier.lookup(key(0) + key(1)) == 2
    tier.release_blobs(key(0) + key(1))


@pytest.mark.parametrize("bad", ["", "LRU", "arc", "s3-fifo"])
def test_unknown_policy_is_a_value_error_naming_the_choices(bad):
    _, layout = make_kv()
    with pytest.raises(kvtier.InvalidArgumentError) as info:
        make_tier(layout, 4, eviction_policy=bad)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "eviction_policy" in message and f"'{bad}'" in message
    for allowed in POLICIES:
        assert f"'{allowed}'" in message
    # Nothing was left half-built: a good name still works right after.
    tier = make_tier(layout, 4, eviction_policy="s3fifo")
    assert finish(tier.store(key(1), pages(0, layout.pages_per_chunk))) == 1
    assert tier.lookup(key(1)) == 1


def test_policy_must_be_a_string():
    _, layout = make_kv()
    with pytest.raises(TypeError):
        make_tier(layout, 4, eviction_policy=3)
