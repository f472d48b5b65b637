"""kvtier.sim's disk queue: a request's disk reads wait for the background writes on its instance's
disk (write-through writes, write-backs no request waited for), at most the writes the disk has in
flight (the write-back bound), and the hits do not change.

One instance, GPU and CPU tiers of 4 and 8 chunks, every chunk admitted (seen once), disk
write-through: four requests of 4 fresh chunks, a second apart, push the first request's chunks
out to disk only (each request after the first offloads the previous one's chunks, which are
written through in the background); a fifth request of the first one's chunks then reads them
from disk. A chunk's write takes 0.1 s, its read 1 ms.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from kvtier.sim import SimConfig, Simulator
from kvtier.sim.cost import HardwareCost, ModelShape
from kvtier.sim.trace import Request

TINY = ModelShape("tiny", 1e6, 1, 64, 1, 2, 2)  # 8 bytes a token: 4 KiB a 512-token chunk
HW = HardwareCost(
    weights_rate=1e15,
    attention_rate=1e15,
    h2d_bw=1e12,
    d2h_bw=1e12,
    disk_read_bw=4096 / 1e-3,
    disk_write_bw=4096 / 0.1,
    disk_latency_s=0.0,
)
WRITE_S = 0.1  # one chunk's write
PROMPT = 4  # chunks a request


def cfg(**kw) -> SimConfig:
    base = dict(
        model=TINY,
        chunk_tokens=512,
        page_tokens=512,
        gpu_bytes=PROMPT * 4096,
        cpu_bytes=2 * PROMPT * 4096,
        disk_bytes=1000 * 8192,
        disk_admit_min_seen=1,
        hardware=HW,
    )
    base.update(kw)
    return SimConfig(**base)


def requests(last_after_s: float) -> list[Request]:
    """Prompts A, B, C, D a second apart, then A again ``last_after_s`` after D."""
    out = [
        Request(
            arrival_s=float(i), input_length=PROMPT * 512, output_length=1, chunks=tuple(range(10 * i, 10 * i + PROMPT))
        )
        for i in range(4)
    ]
    out.append(replace(out[0], arrival_s=3.0 + last_after_s))
    return out


def test_disk_reads_wait_for_the_write_through_writes_before_them():
    soon, late = (Simulator(cfg()).run(requests(d)) for d in (0.05, 10.0))
    for r in (soon, late):
        assert r.disk_hits == PROMPT and r.tiers["instance0"]["write_through_written"] > 0
    assert (soon.gpu_hits, soon.cpu_hits, soon.disk_hits) == (late.gpu_hits, late.cpu_hits, late.disk_hits)
    # D's victims (C) are written through from t = 3 s (plus a negligible offload): 0.4 s of writes.
    # The fifth request's reads start at 3.05 s and wait for the 0.35 s left of them.
    assert late.disk_waits == 0 and late.disk_wait_s == 0.0
    assert soon.disk_waits == 1
    assert soon.disk_wait_s == pytest.approx(PROMPT * WRITE_S - 0.05, abs=1e-6)
    assert soon.ttft[-1] - late.ttft[-1] == pytest.approx(soon.disk_wait_s, abs=1e-9)
    assert soon.ttft[:4] == late.ttft[:4]
    assert soon.to_dict()["disk_queue"] == {"requests_waited": 1, "wait_s": soon.disk_wait_s}


def test_the_wait_is_at_most_the_writes_in_flight():
    """Beyond the write-back bound the writes wait in the tier, not on the disk."""
    r = Simulator(cfg(max_demotions_in_flight=2)).run(requests(0.05))
    assert r.disk_wait_s == pytest.approx(2 * WRITE_S, abs=1e-6)


def test_without_a_disk_nothing_waits():
    r = Simulator(cfg(disk_bytes=0)).run(requests(0.05))
    assert r.disk_hits == 0 and r.disk_waits == 0
