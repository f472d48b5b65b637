"""kvtier.sim.trace: Mooncake and token-id traces, prefix chaining, clear errors on bad lines."""

from __future__ import annotations

import itertools
import json

import pytest
from kvtier.sim.trace import TraceError, load_trace, synthetic_trace, trace_summary


def write(tmp_path, lines, name="t.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return p


def mc(ts, n, ids, out=1):
    return {"timestamp": ts, "input_length": n, "output_length": out, "hash_ids": ids}


def test_mooncake_blocks_become_prefix_chained_chunks(tmp_path):
    p = write(tmp_path, [mc(0, 1024, [1, 2]), mc(5, 1500, [1, 2, 3]), mc(9, 1024, [7, 2])])
    a, b, c = load_trace(p, chunk_tokens=512)
    assert a.chunks == b.chunks[:2]  # a shared prefix shares chunk ids
    assert len(b.chunks) == 2  # 1500 tokens: two full 512-token blocks; the partial one has no chunk
    assert c.chunks[1] != a.chunks[1]  # same hash id 2, different prefix: a different chunk
    assert (a.arrival_s, b.arrival_s, b.input_length, b.line) == (0.0, 0.005, 1500, 2)


def test_mooncake_block_splits_into_smaller_chunks(tmp_path):
    p = write(tmp_path, [mc(0, 1300, [4, 5, 6]), mc(1, 512, [4])])
    a, b = load_trace(p, chunk_tokens=256)
    assert len(a.chunks) == 5  # 1300 // 256
    assert b.chunks == a.chunks[:2]


def test_token_format_chains_chunks(tmp_path):
    p = write(
        tmp_path,
        [
            {"tokens": list(range(10)), "timestamp": 3},
            {"tokens": list(range(8)) + [99, 98]},
            {"tokens": [0, 1, 2, 3, 9, 9, 9, 9]},
        ],
    )
    a, b, c = load_trace(p, chunk_tokens=4)
    assert len(a.chunks) == 2 and b.chunks == a.chunks and c.chunks[0] == a.chunks[0] and c.chunks[1] != a.chunks[1]
    assert b.arrival_s == a.arrival_s == 0.003  # a line without timestamp arrives with the previous one


@pytest.mark.parametrize(
    "line, field",
    [
        ('{"timestamp": 0, "input_length": 10, "hash_ids": [1]', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"timestamp": 0, "hash_ids": [1]}', "'input_length'"),
        ('{"timestamp": 0, "input_length": "many", "hash_ids": [1]}', "'input_length'"),
        ('{"timestamp": -4, "input_length": 10, "hash_ids": [1]}', "'timestamp'"),
        ('{"timestamp": 0, "input_length": 1100, "hash_ids": [1, 2]}', "'hash_ids'"),
        ('{"timestamp": 0, "input_length": 10, "hash_ids": [1, "x"]}', "'hash_ids'"),
        ('{"tokens": [1, -2]}', "'tokens'"),
        ('{"timestamp": 0, "input_length": 10}', "'hash_ids'"),
        ('{"prompt": "hello"}', "neither 'hash_ids'"),
    ],
)
def test_bad_line_names_line_and_field(tmp_path, line, field):
    p = write(tmp_path, [mc(0, 512, [1]), line])
    with pytest.raises(TraceError) as e:
        load_trace(p)
    assert f"{p}:2:" in str(e.value) and field in str(e.value)


def test_timestamps_must_not_go_back(tmp_path):
    p = write(tmp_path, [mc(10, 512, [1]), mc(5, 512, [1])])
    with pytest.raises(TraceError, match=r":2: field 'timestamp' goes back"):
        load_trace(p)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(TraceError, match="no requests"):
        load_trace(write(tmp_path, ["", ""]))
    with pytest.raises(TraceError, match="cannot open"):
        load_trace(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="divide"):
        load_trace(write(tmp_path, [mc(0, 512, [1])]), chunk_tokens=300)


def test_limit_and_summary(tmp_path):
    p = write(tmp_path, [mc(i, 1024, [1, i + 2]) for i in range(5)])
    reqs = load_trace(p, limit=3)
    assert len(reqs) == 3
    assert trace_summary(reqs) == {"requests": 3, "chunks": 6, "distinct_chunks": 4, "span_s": 0.002}


def test_synthetic_trace_is_deterministic_and_shares_prefixes():
    a = synthetic_trace(300, seed=3)
    assert a == synthetic_trace(300, seed=3) and a != synthetic_trace(300, seed=4)
    s = trace_summary(a)
    assert s["distinct_chunks"] < 0.8 * s["chunks"]  # reuse is there to find
    assert all(x.arrival_s <= y.arrival_s for x, y in itertools.pairwise(a))
