"""The Python mirrors of the CPU tier's C++ eviction orders (kvtier.sim.cpu_orders) against the C++
built-ins themselves: one random sequence of stores and loads into a small real CpuTier (host
memory, no disk) and into a SimCpuTier of the same capacity; after every operation both must hold
exactly the same chunks. Long enough for LFU's aging and S3-FIFO's ghost to matter.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvtier.cache import KVCache
from kvtier.layout import Layout
from kvtier.sim.tiers import SimCpuTier

CT = 8
CAPACITY = 24
UNIVERSE = 80


def key(i: int) -> bytes:
    return i.to_bytes(8, "little") * 2


@pytest.mark.parametrize("order", ["lru", "s3fifo", "lfu"])
@pytest.mark.parametrize("seed", [1, 2])
def test_cpu_order_mirror_matches_the_cpp_builtin_op_by_op(order, seed):
    kv = torch.zeros(16, 1, 2, CT, 1, 8)
    cache = KVCache(Layout.from_cross_layer(kv, chunk_tokens=CT), cpu_bytes=CAPACITY * 4096, eviction_policy=order)
    tier = cache.tier
    sim = SimCpuTier(CAPACITY, eviction_policy=order)
    rng = random.Random(seed)
    hot = list(range(10))  # a few often reused chunks, the rest a long tail
    pages = np.arange(16, dtype=np.int64)
    evicted_seen = False
    try:
        for step in range(1500):
            n = rng.randint(1, 4)
            ids = [rng.choice(hot) if rng.random() < 0.4 else rng.randrange(UNIVERSE) for _ in range(n)]
            ids = list(dict.fromkeys(ids))  # the engine's page ids must not repeat; keys need not
            blob = b"".join(key(i) for i in ids)
            if rng.random() < 0.5:
                op = tier.store(blob, pages[: len(ids)], 0)
                sim.store(ids)
            else:
                op = tier.load(blob, pages[: len(ids)], 0)
                got, _ = sim.load(ids)
                assert op.chunks == got, f"step {step}: load found {op.chunks} in C++, {got} in the mirror"
            if op.transfer is not None:
                op.transfer.wait(30.0)
            held = {i for i in range(UNIVERSE) if tier.lookup(key(i)) == 1}
            assert held == {i for i in range(UNIVERSE) if sim.contains(i)}, f"step {step} ({order})"
            evicted_seen |= len(held) == CAPACITY
        assert evicted_seen and sim.counters.evictions > 300
    finally:
        cache.close()
