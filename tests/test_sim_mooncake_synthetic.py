"""kvtier.sim.mooncake_synthetic: the generated Mooncake-format trace is deterministic for a seed,
in the format the trace reader takes, and reuses prefixes (system prompts, multi-turn sessions)."""

from __future__ import annotations

import itertools
import json
import statistics

import pytest
from kvtier.sim import SimConfig, Simulator
from kvtier.sim.mooncake_synthetic import MooncakeSynthetic, synthetic_requests, write_mooncake_trace
from kvtier.sim.trace import load_trace


def test_deterministic_for_a_seed():
    gen = MooncakeSynthetic()
    a = gen.records(300, seed=3)
    assert a == gen.records(300, seed=3) == MooncakeSynthetic().records(300, seed=3)
    assert a != gen.records(300, seed=4)
    assert synthetic_requests(300, seed=3) == synthetic_requests(300, seed=3)


def test_records_are_mooncake_lines_the_reader_takes(tmp_path):
    path = write_mooncake_trace(tmp_path / "t.jsonl", 400, seed=1)
    lines = path.read_text().splitlines()
    assert len(lines) == 400
    last = -1
    for text in lines:
        r = json.loads(text)
        assert set(r) == {"timestamp", "input_length", "output_length", "hash_ids"}
        assert all(type(r[k]) is int for k in ("timestamp", "input_length", "output_length"))
        assert all(type(h) is int and h >= 0 for h in r["hash_ids"])
        assert r["input_length"] > 0 and r["output_length"] > 0
        assert len(r["hash_ids"]) == -(-r["input_length"] // 512)  # one id a 512-token block, the last partial
        assert r["timestamp"] >= last
        last = r["timestamp"]
    from_file = load_trace(path, chunk_tokens=256, fmt="mooncake")
    assert from_file == synthetic_requests(400, seed=1, chunk_tokens=256)


def test_reuse_is_real_and_an_infinite_cache_sees_it():
    reqs = synthetic_requests(600, seed=2, chunk_tokens=512)
    seen: set[int] = set()
    reused = total = 0
    for r in reqs:
        reused += sum(c in seen for c in r.chunks)
        total += len(r.chunks)
        seen.update(r.chunks)
    assert reused / total > 0.4
    big = Simulator(SimConfig(chunk_tokens=512, gpu_bytes=1 << 44, cpu_bytes=0, replay="fast")).run(reqs)
    assert big.hit_ratio("gpu") == pytest.approx(reused / total)


def test_prefixes_come_from_system_prompts_and_earlier_turns():
    gen = MooncakeSynthetic()
    recs = gen.records(1000, seed=5)
    full = [tuple(r["hash_ids"][: r["input_length"] // 512]) for r in recs]
    # a follow-up: every full block of an earlier prompt, then more
    follow_ups = sum(
        any(len(p) < len(full[j]) and full[j][: len(p)] == p for p in full[max(0, j - 400) : j] if p)
        for j in range(len(full))
    )
    assert follow_ups > 0.3 * len(recs)
    # the first blocks name the system prompt: a few of them, the most popular opening far more sessions
    firsts = [r["hash_ids"][0] for r in recs]
    counts = sorted((firsts.count(h) for h in set(firsts) if firsts.count(h) > 1), reverse=True)
    assert 2 <= len(counts) <= gen.system_prompts
    assert counts[0] > 2 * counts[-1]


def test_arrivals_are_poisson_at_the_rate():
    recs = MooncakeSynthetic(rate_per_s=10.0).records(4000, seed=0)
    gaps = [(b["timestamp"] - a["timestamp"]) / 1000 for a, b in itertools.pairwise(recs)]
    assert statistics.mean(gaps) == pytest.approx(0.1, rel=0.08)
    assert statistics.pstdev(gaps) == pytest.approx(0.1, rel=0.12)  # exponential: sd = mean
    assert statistics.mean(r["input_length"] for r in MooncakeSynthetic().records(2000, seed=0)) > 8000


@pytest.mark.parametrize(
    "kw, names",
    [
        ({"rate_per_s": 0.0}, "rate_per_s"),
        ({"system_tokens": (500, 100)}, "system_tokens"),
        ({"continue_p": 1.5}, "continue_p"),
        ({"block_tokens": 0}, "block_tokens"),
        ({"max_input_tokens": 100}, "max_input_tokens"),
    ],
)
def test_bad_settings_are_named(kw, names):
    with pytest.raises(ValueError, match=names):
        MooncakeSynthetic(**kw)


def test_bad_counts_and_chunks_are_named():
    with pytest.raises(ValueError, match="positive number of requests"):
        MooncakeSynthetic().records(0)
    with pytest.raises(ValueError, match="chunk_tokens=384 must be positive and divide block_tokens=512"):
        synthetic_requests(10, chunk_tokens=384)
