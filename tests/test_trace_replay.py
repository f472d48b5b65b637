"""Replay of the Mooncake synthetic trace through the real engine (GPU pool + CPU + disk tiers).

Each 512-token block of the trace becomes a real chunk of CT synthetic tokens (KV scaled down to
a few hundred bytes a chunk). Checks: no errors, every tier within its capacity, every cached page
holding its block's bytes, and, with capacities large enough to never evict, hits equal to an
independently computed infinite-cache prefix-hit ceiling. Prints the hit ratio per tier.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from kvtier.pool import PagedKVPool

TRACE = Path(
    os.environ.get("KVTIER_TEST_TRACE")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "mooncake_synthetic_trace.jsonl"
)
CT = 8  # tokens standing for one 512-token block


def load_trace(limit=None):
    if not TRACE.exists():
        pytest.skip(f"trace not found at {TRACE}")
    with open(TRACE) as f:
        rows = [json.loads(line) for line in f]
    return rows[:limit] if limit else rows


def request_tokens(row) -> list[int]:
    """CT tokens per block; the last block is partial when the prompt does not fill it."""
    ids = row["hash_ids"]
    tokens = []
    for i, h in enumerate(ids):
        n = CT
        if i == len(ids) - 1 and row["input_length"] % 512:
            n = max(1, min(CT - 1, math.ceil(row["input_length"] % 512 / 512 * CT)))
        tokens.extend(h * CT + j for j in range(n))
    return tokens


def ceiling_hits(rows) -> int:
    """Infinite cache: a request hits its leading full blocks that any earlier request held."""
    seen: set[int] = set()
    hits = 0
    for row in rows:
        ids = row["hash_ids"]
        full = len(ids) - (1 if row["input_length"] % 512 else 0)
        n = 0
        while n < full and ids[n] in seen:
            n += 1
        hits += n
        seen.update(ids[:full])
    return hits


def block_value(token0: int) -> float:
    return float(token0 % 1_000_003)


def replay(rows, pool: PagedKVPool) -> dict:
    full_chunks = 0
    for row in rows:
        toks = request_tokens(row)
        seq = pool.begin(toks)
        seq.wait()
        cached_pages = seq.cached_tokens // CT
        if cached_pages:
            got = pool.kv[seq.page_table[:cached_pages], 0, 0, 0, 0, 0]
            want = torch.tensor([block_value(toks[i * CT]) for i in range(cached_pages)], dtype=pool.kv.dtype)
            assert torch.equal(got, want), f"request at t={row['timestamp']} got wrong cached KV"
        for j in range(cached_pages, len(seq.page_table)):  # "prefill" the rest
            pool.kv[seq.page_table[j]] = block_value(toks[j * CT])
        pool.commit(seq, toks)
        pool.release(seq)
        full_chunks += len(toks) // CT
    st = pool.stats()
    st["full_chunks"] = full_chunks
    return st


def make_pool(tmp_path, gpu_chunks, cpu_chunks, disk_chunks):
    kw = dict(
        num_layers=1,
        kv_heads=1,
        head_dim=8,
        num_pages=gpu_chunks,
        page_tokens=CT,
        chunk_tokens=CT,
        dtype=torch.float32,
        cpu_bytes=cpu_chunks * 4096,
    )
    if disk_chunks:
        kw.update(disk_dir=str(tmp_path), disk_bytes=(disk_chunks + 2) * 8192, disk_admit_min_seen=1)
    return PagedKVPool(**kw)


@pytest.mark.slow
def test_trace_replay_through_all_tiers(tmp_path):
    rows = load_trace()
    pool = make_pool(tmp_path, gpu_chunks=2048, cpu_chunks=4096, disk_chunks=16384)
    st = replay(rows, pool)
    lower = st["lower"]
    total = st["full_chunks"]
    disk_hits = lower["disk"]["chunks_promoted"]
    cpu_hits = st["lower_hit_chunks"] - disk_hits
    print(
        f"\ntrace replay: {len(rows)} requests, {total} full chunks; hit ratio "
        f"gpu {st['gpu_hit_chunks'] / total:.3f}, cpu {cpu_hits / total:.3f}, disk {disk_hits / total:.3f}, "
        f"ceiling {ceiling_hits(rows) / total:.3f}"
    )
    assert st["gpu_hit_chunks"] > 0 and cpu_hits > 0 and disk_hits > 0
    assert st["gpu_hit_chunks"] + st["lower_hit_chunks"] <= ceiling_hits(rows)
    assert st["pages_free"] + sum(1 for _ in pool._chunks) == st["pages_total"]  # 1 page a chunk
    assert lower["blocks"]["used_blocks"] <= lower["capacity_chunks"]
    assert lower["disk"]["slots_used"] <= lower["disk"]["slots_total"]
    assert lower["disk"]["corrupt_detected"] == 0
    pool.close()


def test_replay_without_eviction_meets_the_prefix_ceiling_exactly(tmp_path):
    rows = load_trace(limit=int(os.environ.get("KVTIER_REPLAY_ROWS", "600")))
    blocks = sum(len(r["hash_ids"]) for r in rows)
    pool = make_pool(tmp_path, gpu_chunks=blocks + 64, cpu_chunks=4, disk_chunks=0)
    st = replay(rows, pool)
    assert st["evicted_chunks"] == 0
    assert st["gpu_hit_chunks"] + st["lower_hit_chunks"] == ceiling_hits(rows)
    pool.close()
