"""The simulator's disk write-through against the engine's (``disk.write_through``): the same
stores and loads through a 4-chunk CPU tier over a disk give the same tiers for every chunk and
the same disk writes, and write-back at eviction (the simulator's default) differs from it.

Each call is drained before the next, as the simulator lets writes end between calls. Runs the
engine's disk tier on pytest's tmp_path (which must accept O_DIRECT).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from _util import toks
from kvtier import KVCache, Layout
from kvtier.sim import SimConfig
from kvtier.sim.cpu_tier import SimCpuTier

PROMPTS = 8  # of 2 chunks each, through a CPU tier of 4 chunks
DISK_SLOTS = 64  # no disk eviction: the writes' order cannot matter


def make_layout():
    kv = [torch.zeros(2, 64, 16, 2, 64) for _ in range(2)]
    return Layout.from_vllm(kv, chunk_tokens=32)  # 2 pages per chunk, 16 pages per prompt room


def steps():
    """(op, prompt index): every prompt stored, prompt 0 loaded again after prompt 1 (a hit that
    brings its chunks to an admission count of 2), then the rest."""
    out = [("store", 0), ("store", 1), ("load", 0)]
    out += [("store", i) for i in range(2, PROMPTS)]
    return out


def run_engine(tmp_path, admit: int, write_through: bool):
    layout = make_layout()
    prompts = [toks(2 * layout.chunk_tokens, 100 + i) for i in range(PROMPTS)]
    with KVCache(
        layout,
        cpu_bytes=4 * layout.chunk_bytes,
        disk_dir=str(tmp_path),
        disk_bytes=DISK_SLOTS * (layout.chunk_bytes + 4096) + (1 << 20),
        disk_admit_min_seen=admit,
        disk_write_through=write_through,
        disk_persist_interval_s=0,
        disk_persist_on_close=False,
    ) as c:
        for op, i in steps():
            if op == "store":
                c.store(prompts[i], list(range(4))).wait()
            else:
                assert c.load(prompts[i], list(range(4, 8))).wait() == 2 * layout.chunk_tokens
            c.drain()
        tiers = [c.lookup_tiers(p) for p in prompts]
        return tiers, c.stats()["disk"]["writes"]


def run_sim(admit: int, write_through: bool):
    tier = SimCpuTier(4, disk_slots=DISK_SLOTS, disk_admit_min_seen=admit, disk_write_through=write_through)
    keys = [[(i, 0), (i, 1)] for i in range(PROMPTS)]
    for op, i in steps():
        if op == "store":
            tier.store(keys[i])
        else:
            assert tier.load(keys[i]) == (2, 0)
        tier.drain()
    return [tier.lookup_tiers(k) for k in keys], tier.counters


@pytest.mark.parametrize("admit", [1, 2])
def test_the_simulator_writes_through_as_the_engine_does(tmp_path, admit):
    tiers, writes = run_engine(tmp_path, admit, write_through=True)
    sim_tiers, counters = run_sim(admit, write_through=True)
    assert sim_tiers == tiers
    assert counters.disk_writes == writes
    assert counters.critical_writebacks == 0  # no store waited for the disk
    if admit == 1:
        assert writes == 2 * PROMPTS  # every chunk, once, on arrival
        assert counters.write_through_written == 2 * PROMPTS
    else:
        assert counters.write_through_written == 2  # prompt 0's chunks, at their second sighting


def test_write_back_at_eviction_differs(tmp_path):
    sim_tiers, counters = run_sim(1, write_through=False)
    wt_tiers, wt_counters = run_sim(1, write_through=True)
    assert counters.write_through_written == 0 and counters.critical_writebacks > 0
    # Write-back leaves the last prompts in the pool alone, unwritten; write-through wrote them.
    assert counters.disk_writes < wt_counters.disk_writes
    assert sim_tiers[-1] == wt_tiers[-1] == ["cpu", "cpu"]


def test_sim_config_takes_write_through_as_a_bool():
    assert SimConfig(disk_bytes=1 << 30, disk_write_through=True).disk_write_through is True
    with pytest.raises(ValueError, match="disk_write_through"):
        SimConfig(disk_write_through="yes")
