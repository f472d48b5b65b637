"""disk.write_through: the CPU tier writes each admitted chunk to disk soon after it arrives, so a
later eviction finds it written and frees its block without waiting on the disk.

Each test runs the same steps with write-through off beside it where that shows the difference
(the check must be able to fail). Runs the disk tier on pytest's tmp_path (which must accept
O_DIRECT).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from _util import toks
from kvtier import KVCache, Layout

CHUNKS = 4  # per prompt


def make_kv(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    kv = [torch.randn(2, 64, 16, 2, 64, generator=gen) for _ in range(2)]
    return kv, Layout.from_vllm(kv, chunk_tokens=32)  # 2 pages per chunk


def open_cache(layout, d, *, cpu_chunks: int, disk_bytes: int | None = None, **kw) -> KVCache:
    # No persist (at close or on a timer): what reaches the disk got there by write-through or
    # write-back alone.
    return KVCache(
        layout,
        cpu_bytes=cpu_chunks * layout.chunk_bytes,
        disk_dir=str(d),
        disk_bytes=disk_bytes or 128 * layout.chunk_bytes + (1 << 20),
        disk_persist_interval_s=0,
        disk_persist_on_close=False,
        **kw,
    )


def store(cache, kv, layout, i: int) -> tuple[list[int], list[torch.Tensor]]:
    """Prompt i (CHUNKS chunks) stored from pages 0..7 refilled for it; its pages' bytes."""
    for t in kv:
        t[:, :8] = torch.randn(t[:, :8].shape, generator=torch.Generator().manual_seed(1000 + i))
    p = toks(CHUNKS * layout.chunk_tokens, i)
    cache.store(p, list(range(8))).wait()
    return p, [t[:, q].clone() for t in kv for q in range(8)]


def loads_exact(cache, kv, layout, prompt, want) -> int:
    """Chunks of ``prompt`` the cache loads (into pages 32..39) equal to ``want``."""
    got = cache.load(prompt, list(range(32, 40))).wait() // layout.chunk_tokens
    loaded = [t[:, q].clone() for t in kv for q in range(32, 40)]
    for c in range(got):
        idx = [layer * 8 + c * 2 + k for layer in range(len(kv)) for k in range(2)]
        assert all(torch.equal(loaded[i], want[i]) for i in idx), f"chunk {c} differs"
    return got


@pytest.mark.parametrize("write_through", [True, False])
def test_stored_chunks_reach_the_disk_while_they_stay_in_the_cpu_tier(tmp_path, write_through):
    kv, layout = make_kv()
    prompts = []
    # A CPU tier that never evicts: write-back alone puts nothing on disk.
    with open_cache(layout, tmp_path, cpu_chunks=64, disk_admit_min_seen=1, disk_write_through=write_through) as c:
        for i in range(5):
            prompts.append(store(c, kv, layout, i))
        c.drain()
        disk = c.stats()["disk"]
        assert disk["write_through_written"] == (5 * CHUNKS if write_through else 0)
        assert disk["write_through_failed"] == 0 and disk["write_through_queued"] == 0
        assert disk["demotions_written"] == 0  # nothing was evicted
        assert all(c.lookup_tiers(p) == ["cpu"] * CHUNKS for p, _ in prompts)
    # A fresh process's view: only what was written is on disk, and it is the stored bytes.
    with open_cache(layout, tmp_path, cpu_chunks=64) as fresh:
        served = sum(loads_exact(fresh, kv, layout, p, want) for p, want in prompts)
    assert served == (5 * CHUNKS if write_through else 0)


def test_a_full_tier_evicts_written_chunks_without_writing_them_again(tmp_path):
    kv, layout = make_kv()
    prompts = []
    with open_cache(layout, tmp_path, cpu_chunks=8, disk_admit_min_seen=1, disk_write_through=True) as c:
        for i in range(10):  # 40 chunks through a tier of 8
            prompts.append(store(c, kv, layout, i))
            c.drain()
        st = c.stats()
        assert st["index"]["evictions"] >= 30
        assert st["disk"]["write_through_written"] == 10 * CHUNKS
        assert st["disk"]["writes"] == 10 * CHUNKS  # each chunk written once: evictions added none
        assert st["disk"]["demotions_failed"] == 0
        # Every chunk comes back bit-exact, the evicted ones from disk.
        assert sum(loads_exact(c, kv, layout, p, want) for p, want in prompts) == 10 * CHUNKS


def test_a_chunk_the_disk_evicted_is_not_written_again_on_each_hit(tmp_path):
    """Write-through writes a chunk once while it is in the CPU tier: a disk smaller than the
    tier evicts some of them, and hits on those do not write them again (each such write would
    evict another chunk from the disk, which its next hit would write again)."""
    kv, layout = make_kv()
    small_disk = 8 * layout.chunk_bytes
    with open_cache(
        layout, tmp_path, cpu_chunks=64, disk_bytes=small_disk, disk_admit_min_seen=1, disk_write_through=True
    ) as c:
        prompts = []
        for i in range(4):  # 16 chunks, a disk of 8
            # One prompt's writes at a time: each finds a slot that is not being written (a
            # write refused while every slot is would be failed, not written).
            prompts.append(store(c, kv, layout, i))
            c.drain()
        disk = c.stats()["disk"]
        written = disk["write_through_written"]
        assert written == 4 * CHUNKS and disk["write_through_failed"] == 0
        media = [bytes(c.tier.media(b"".join(c.keyer.keys(p)))) for p, _ in prompts]
        assert any(m == 1 for ms in media for m in ms), media  # in the CPU tier only: the disk evicted it
        for _ in range(3):
            assert sum(loads_exact(c, kv, layout, p, want) for p, want in prompts) == 4 * CHUNKS
            c.drain()
        assert c.stats()["disk"]["write_through_written"] == written


def test_write_through_applies_the_admission_count(tmp_path):
    kv, layout = make_kv()
    with open_cache(layout, tmp_path, cpu_chunks=64, disk_admit_min_seen=2, disk_write_through=True) as c:
        p, want = store(c, kv, layout, 0)
        c.drain()
        assert c.stats()["disk"]["write_through_written"] == 0  # seen once: not admitted
        assert loads_exact(c, kv, layout, p, want) == CHUNKS  # a hit: seen twice
        c.drain()
        assert c.stats()["disk"]["write_through_written"] == CHUNKS


def test_write_through_is_off_with_deterministic_writeback(tmp_path):
    kv, layout = make_kv()
    with open_cache(
        layout, tmp_path, cpu_chunks=64, disk_admit_min_seen=1, disk_write_through=True, deterministic_writeback=True
    ) as c:
        p, _ = store(c, kv, layout, 0)
        c.drain()
        assert c.stats()["disk"]["write_through_written"] == 0
        assert c.stats()["disk"]["writes"] == 0
        assert c.lookup_tiers(p) == ["cpu"] * CHUNKS


def test_write_through_is_on_by_default(tmp_path):
    kv, layout = make_kv()
    with open_cache(layout, tmp_path, cpu_chunks=64, disk_admit_min_seen=1) as c:
        store(c, kv, layout, 0)
        c.drain()
        assert c.stats()["disk"]["write_through_written"] == CHUNKS
