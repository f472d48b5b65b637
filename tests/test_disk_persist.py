"""Persist: the CPU tier's chunks reach the disk tier without being evicted, at close() and on a
timer, so a restart on the same disk directory serves them; a process SIGKILLed after one timer
run still leaves them for the next process. Failures of the persist at close are counted, never
raised, and close still drains and releases.

Runs the disk tier on pytest's tmp_path (which must accept O_DIRECT).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _util import toks, wrap_cpu_tiers
from kvtier import KVCache, Layout
from kvtier.config import KVTierConfig
from kvtier.errors import FailedPreconditionError, InvalidArgumentError

N_PROMPTS = 10  # of 4 chunks each: 40 chunks
CHUNKS = 4


def make_kv(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    kv = [torch.randn(2, 64, 16, 2, 64, generator=gen) for _ in range(2)]
    return kv, Layout.from_vllm(kv, chunk_tokens=32)  # 2 pages per chunk


def open_cache(layout, d, **kw) -> KVCache:
    # A CPU tier far larger than what is stored: nothing is ever evicted, so write-back alone
    # would put nothing on disk.
    kw.setdefault("disk_persist_interval_s", 0)
    return KVCache(
        layout,
        cpu_bytes=64 * layout.chunk_bytes,
        disk_dir=str(d),
        disk_bytes=128 * layout.chunk_bytes + (1 << 20),
        **kw,
    )


def store_prompts(cache, kv, layout) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """N_PROMPTS prompts of CHUNKS chunks, each stored once from pages 0..7 refilled for it;
    returns the prompts and the bytes each one's pages held."""
    prompts, contents = [], []
    for i in range(N_PROMPTS):
        for t in kv:
            t[:, :8] = torch.randn(t[:, :8].shape, generator=torch.Generator().manual_seed(1000 + i))
        p = toks(CHUNKS * layout.chunk_tokens, i)
        cache.store(p, list(range(8))).wait()
        prompts.append(p)
        contents.append([t[:, q].clone() for t in kv for q in range(8)])
    return prompts, contents


def served_from_disk(layout, kv, d, prompts, contents) -> int:
    """Chunks a fresh cache on `d` finds on disk and loads back bit-exact."""
    n = 0
    with open_cache(layout, d) as cache:
        for p, want in zip(prompts, contents):
            tiers = cache.lookup_tiers(p)
            assert set(tiers) <= {"disk"}, tiers  # a fresh CPU tier: everything comes from disk
            h = cache.load(p, list(range(32, 40)))
            got = h.wait() // layout.chunk_tokens
            loaded = [t[:, q].clone() for t in kv for q in range(32, 40)]
            per_chunk = 2  # pages
            for c in range(got):
                idx = [layer * 8 + c * per_chunk + k for layer in range(len(kv)) for k in range(per_chunk)]
                assert all(torch.equal(loaded[i], want[i]) for i in idx), f"chunk {c} differs"
            n += got
    return n


def test_close_persists_the_cpu_tier_and_a_restart_serves_it(tmp_path):
    kv, layout = make_kv()
    with open_cache(layout, tmp_path) as cache:
        prompts, contents = store_prompts(cache, kv, layout)
        st = cache.stats()["disk"]
        assert st["demotions_written"] == 0 and st["slots_used"] == 0  # nothing evicted
    assert served_from_disk(layout, kv, tmp_path, prompts, contents) == N_PROMPTS * CHUNKS


def test_without_persist_on_close_a_restart_finds_nothing(tmp_path):
    kv, layout = make_kv()
    with open_cache(layout, tmp_path, disk_persist_on_close=False) as cache:
        prompts, _ = store_prompts(cache, kv, layout)
    with open_cache(layout, tmp_path) as cache:
        assert sum(cache.lookup(p) for p in prompts) == 0


def test_persist_counts_and_writes_nothing_twice(tmp_path):
    kv, layout = make_kv()
    with open_cache(layout, tmp_path) as cache:
        store_prompts(cache, kv, layout)
        n = N_PROMPTS * CHUNKS
        first = cache.persist()
        assert first == {
            "written": n,
            "skipped": 0,
            "failed": 0,
            "not_started": 0,
            "still_running": 0,
            "deadline_exceeded": False,
        }
        again = cache.persist(timeout_s=10)
        assert again["written"] == 0 and again["skipped"] == n
        st = cache.stats()
        assert st["disk"]["persist_written"] == n and st["disk"]["persist_runs"] == 2
        assert st["index"]["pinned"] == 0 and st["index"]["ready"] == n  # still in the CPU tier
        for bad in (-1, float("nan"), "1", True):
            with pytest.raises(InvalidArgumentError, match="timeout_s"):
                cache.persist(timeout_s=bad)
    with pytest.raises(InvalidArgumentError, match="closed"):
        cache.persist()
    _, small = make_kv()
    with (
        KVCache(small, cpu_bytes=4 * small.chunk_bytes) as no_disk,
        pytest.raises(FailedPreconditionError, match="disk tier"),
    ):
        no_disk.persist()


def test_persist_respects_the_disk_capacity(tmp_path):
    kv, layout = make_kv()
    with KVCache(
        layout,
        cpu_bytes=64 * layout.chunk_bytes,
        disk_dir=str(tmp_path),
        disk_bytes=8 * (layout.chunk_bytes + 8192),
        disk_persist_interval_s=0,
    ) as cache:
        store_prompts(cache, kv, layout)
        slots = cache.stats()["disk"]["slots_total"]
        r = cache.persist()
        assert r["written"] == slots and r["not_started"] == N_PROMPTS * CHUNKS - slots
        assert cache.stats()["disk"]["evictions"] == 0  # none written only to be evicted


class _FailingPersist:
    """The tier with persist() raising once ``failing``: the fault close() must survive."""

    def __init__(self, tier) -> None:
        self._tier = tier
        self.failing = False
        self.drained = False

    def persist(self, timeout_s):
        if not self.failing:
            return self._tier.persist(timeout_s)
        raise OSError(28, "No space left on device")

    def drain(self, timeout_s):
        self.drained = self.failing
        return self._tier.drain(timeout_s)

    def __getattr__(self, name):
        return getattr(self._tier, name)


def test_a_failing_persist_at_close_is_counted_and_close_still_releases(tmp_path, caplog, monkeypatch):
    kv, layout = make_kv()
    tiers = []
    wrap_cpu_tiers(monkeypatch, lambda t: tiers.append(_FailingPersist(t)) or tiers[-1])
    cache = open_cache(layout, tmp_path)
    store_prompts(cache, kv, layout)
    tier = tiers[0]
    tier.failing = True
    cache.close()  # must not raise
    assert tier.drained and cache.tier is None
    assert cache.bookkeeping_errors == 1
    assert any("persist" in r.getMessage() for r in caplog.records)


CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np, torch
    from kvtier import KVCache, Layout

    d = sys.argv[1]
    gen = torch.Generator().manual_seed(0)
    kv = [torch.randn(2, 64, 16, 2, 64, generator=gen) for _ in range(2)]
    layout = Layout.from_vllm(kv, chunk_tokens=32)
    cache = KVCache(layout, cpu_bytes=64 * layout.chunk_bytes, disk_dir=d,
                    disk_bytes=128 * layout.chunk_bytes + (1 << 20), disk_persist_interval_s=0.2)
    toks = np.random.default_rng(7).integers(0, 50000, 8 * 32).tolist()
    cache.store(toks, list(range(16))).wait()
    print("stored", flush=True)
    deadline = time.monotonic() + 60
    while cache.stats()["disk"]["persist_written"] < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    print("persisted" if cache.stats()["disk"]["persist_written"] >= 8 else "timeout", flush=True)
    time.sleep(600)  # killed here, never closed
    """
)


@pytest.mark.multiproc
def test_sigkill_after_one_persist_interval_leaves_the_chunks_for_the_next_process(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        lines = [proc.stdout.readline().strip() for _ in range(2)]  # the child's own deadline: 60 s
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert lines == ["stored", "persisted"], (lines, err)
    kv, layout = make_kv()
    want = [t[:, q].clone() for t in kv for q in range(16)]
    toks_ = np.random.default_rng(7).integers(0, 50000, 8 * 32).tolist()
    with open_cache(layout, tmp_path) as cache:
        assert cache.stats()["disk"]["recovered_slots"] == 8
        assert cache.lookup_tiers(toks_) == ["disk"] * 8
        assert cache.load(toks_, list(range(32, 48))).wait() == 8 * 32
        assert all(torch.equal(x, y) for x, y in zip([t[:, q] for t in kv for q in range(32, 48)], want))


def test_config_persist_keys_reach_the_cache(tmp_path):
    cfg = KVTierConfig.load(
        disk={
            "dir": str(tmp_path),
            "bytes": "64MiB",
            "persist_interval_s": 0,
            "persist_on_close": False,
            "reset_on_mismatch": True,
        }
    )
    kw = cfg.cache_kwargs()
    assert kw["disk_persist_interval_s"] == 0 and kw["disk_persist_on_close"] is False
    assert kw["disk_reset_on_mismatch"] is True
    assert KVTierConfig.load().disk.persist_interval_s == 60 and KVTierConfig.load().disk.persist_on_close
    with pytest.raises(InvalidArgumentError, match=r"disk.persist_interval_s"):
        KVTierConfig.load(disk={"persist_interval_s": -1})
    with pytest.raises(InvalidArgumentError, match="disk_persist_interval_s"):
        open_cache(make_kv()[1], tmp_path, disk_persist_interval_s=-1)
