"""CacheConfig.deterministic_writeback through KVCache (the next call finds the write-backs ended,
no drain), its validation, and its mirror in kvtier.sim (SimCpuTier, SimConfig).

The engine-vs-simulator comparisons that this mode makes exact are in tests/test_sim_engine.py;
csrc/engine/cpu_tier_test.cc slows the disk down to show the asynchronous default differ.
"""

from __future__ import annotations

import pytest
from kvtier.errors import InvalidArgumentError
from kvtier.sim import SimConfig
from kvtier.sim.tiers import SimCpuTier

torch = pytest.importorskip("torch")

from _util import toks
from kvtier import CacheConfig, KVCache, Layout


def test_next_call_finds_the_write_backs_ended_without_a_drain(tmp_path, disk_backend):
    kv = [torch.randn(2, 64, 16, 2, 64) for _ in range(2)]
    layout = Layout.from_vllm(kv, chunk_tokens=32)  # 2 pages a chunk
    ct = layout.chunk_tokens
    cache = KVCache(
        layout,
        cpu_bytes=4 * layout.chunk_bytes,
        disk_dir=str(tmp_path),
        disk_bytes=64 * layout.chunk_bytes + (1 << 20),
        disk_backend=disk_backend,
        deterministic_writeback=True,
    )
    with cache:
        a, x, b = toks(2 * ct, 1), toks(2 * ct, 2), toks(2 * ct, 3)
        cache.store(a, list(range(4))).wait()
        cache.store(a, list(range(4))).wait()  # seen twice: admitted to disk when evicted
        cache.store(x, list(range(4, 8))).wait()  # seen once: dropped when evicted
        # b's blocks come from x; a's chunks are evicted on the way: their write-backs start as
        # the store returns and run while the caller goes on.
        assert cache.store(b, list(range(8, 12))).wait() == 2
        assert cache.lookup(b) == 2 * ct  # the next call: it waits for them first
        st = cache.stats()["disk"]
        assert st["demotions_written"] == 2 and st["slots_used"] == 2, st
        assert cache.lookup_tiers(a) == ["disk", "disk"]


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_bad_value_is_refused_naming_the_option(value):
    with pytest.raises(InvalidArgumentError, match="deterministic_writeback"):
        CacheConfig(deterministic_writeback=value)


def test_off_by_default():
    assert CacheConfig().deterministic_writeback is False
    assert SimConfig().deterministic_writeback is False


def test_sim_config_refuses_a_bad_value():
    with pytest.raises(ValueError, match="deterministic_writeback"):
        SimConfig(deterministic_writeback="yes")


def test_sim_tier_waits_for_every_write_back_in_deterministic_mode():
    """A pool of 4 chunks, all admitted, under a write-back bound of 2: the store that evicts
    them waits for write-backs. With one ending a 200 us poll (writebacks_per_wait=1) it waits
    four times; in deterministic mode each wait ends both in flight: two waits."""

    def run(**kw):
        tier = SimCpuTier(4, disk_slots=16, disk_admit_min_seen=1, max_demotions_in_flight=2, **kw)
        tier.store([0, 1, 2, 3])
        tier.store([10, 11, 12, 13])
        return tier.counters

    polled, every = run(writebacks_per_wait=1), run(writebacks_per_wait=1, deterministic_writeback=True)
    assert (polled.backpressure_waits, every.backpressure_waits) == (4, 2)
    assert polled.critical_writebacks == every.critical_writebacks == 4
    assert polled.demotions_written == every.demotions_written == 4


@pytest.mark.parametrize("deterministic", [False, True])
def test_sim_tier_polls_before_it_retries_as_the_engine_does(deterministic):
    """CpuTier::WaitForBlock's order, in both modes: retry; start the staged write-backs; if any is
    in flight, sleep one poll (in which write-backs end); retry. Here the eviction stages chunks 0
    and 1; 0 is on disk already, so starting the write-backs gives its block back at once, but 1
    is still being written and the engine sleeps its poll before it retries: the store waits for
    that write-back (a simulator that retried right after starting them waited for none)."""
    tier = SimCpuTier(
        2,
        disk_slots=16,
        disk_admit_min_seen=1,
        max_demotions_in_flight=2,
        writebacks_per_wait=1,
        deterministic_writeback=deterministic,
    )
    tier.store([0, 1])
    tier.disk.write(0)  # as after a promotion: the pool's copy of 0 is on disk too
    assert tier.store([2]) == 1
    c = tier.counters
    assert (c.backpressure_waits, c.critical_writebacks) == (1, 1)
    assert (c.demotions_written, c.disk_writes) == (2, 1)  # 0: AlreadyExists, 1: written
