"""The simulator and the calibrated planner with a codec below the GPU (HardwareCost.codec):
capacity in stored bytes, loads priced by stored bytes plus decode, the calibration from
bench_codec_fidelity's results."""

from __future__ import annotations

import pathlib
from dataclasses import replace
from types import SimpleNamespace

import pytest
from kvtier.planner import CodecCost
from kvtier.sim.cost import MODEL_PRESETS, CalibratedPlanner, Calibration, HardwareCost
from kvtier.sim.engine import SimConfig, Simulator, request_load_parts_s
from kvtier.sim.trace import Request

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "bench" / "results"
MODEL = MODEL_PRESETS["llama3_8b"]
CB = 256 * MODEL.kv_bytes_per_token  # 32 MiB


def begin(**kw):
    fields = dict(offloaded=0, critical_writebacks=0, load_writebacks=0, load_disk_writes=0, disk_hits=0, lower_hits=0)
    return SimpleNamespace(**{**fields, **kw})


def test_calibration_reads_the_codec_bench():
    cal = Calibration(str(RESULTS))
    fp8, src = cal.codec("fp8_bf16scale")
    assert src.startswith("bench_codec_fidelity-") and src.endswith(":fp8_bf16scale")
    assert 1.9 < fp8.ratio < 2.0 and fp8.decode_bytes_per_s > 1e8 and fp8.encode_bytes_per_s > 1e8
    lossless, _ = cal.codec("byteplane_zstd")
    assert lossless.ratio == 1.0  # its slots keep the raw size, whatever it compressed to
    with pytest.raises(FileNotFoundError, match="no_such_codec"):
        cal.codec("no_such_codec")


def test_capacity_in_chunks_grows_by_the_ratio():
    hw = HardwareCost(codec=CodecCost("fp8", ratio=1.9691))
    raw, fp8 = (
        SimConfig(cpu_bytes=64 << 30, disk_bytes=1 << 40),
        SimConfig(cpu_bytes=64 << 30, disk_bytes=1 << 40, hardware=hw),
    )
    assert fp8.stored_chunk_bytes == -(-CB * 10000 // 19691)
    assert 1.95 < fp8.cpu_chunks / raw.cpu_chunks < 1.97
    assert 1.95 < fp8.disk_slots / raw.disk_slots < 1.97


def test_a_disk_hit_moves_stored_bytes_and_pays_the_decode():
    hw = HardwareCost(h2d_bw=50e9, d2h_bw=50e9, disk_read_bw=1.4e9, disk_write_bw=1.4e9, disk_latency_s=0.0)
    cpu_decode = replace(hw, codec=CodecCost("fp8", 2.0, decode_bytes_per_s=0.5e9, encode_bytes_per_s=0.4e9))
    gpu_decode = replace(hw, codec=CodecCost("fp8", 2.0, decode_bytes_per_s=100e9, decode_on_gpu=True))
    b = begin(disk_hits=4, lower_hits=4, offloaded=2)
    pages, load = request_load_parts_s(hw, CB, b)
    assert load == pytest.approx(4 * CB / 1.4e9 + 4 * CB / 50e9)
    pages_c, load_c = request_load_parts_s(cpu_decode, CB, b)
    assert pages_c == pytest.approx(pages + 2 * CB / 0.4e9)  # the offload encodes on the host
    assert load_c == pytest.approx(4 * CB / 2 / 1.4e9 + 4 * CB / 50e9 + 4 * CB / 0.5e9)
    _, load_g = request_load_parts_s(gpu_decode, CB, b)
    assert load_g == pytest.approx(4 * CB / 2 / 1.4e9 + 4 * CB / 2 / 50e9 + 4 * CB / 100e9)
    # On this disk a host decode at 0.5 GB/s costs more than the halved read saves; a GPU one does not.
    assert load_g < load < load_c


def test_calibrated_planner_loads_a_disk_chunk_only_where_the_codec_pays():
    hw = HardwareCost(disk_read_bw=1.4e9, weights_rate=400e12)
    gpu_decode = replace(hw, codec=CodecCost("fp8", 1.97, decode_bytes_per_s=100e9, decode_on_gpu=True))
    pool = SimpleNamespace(chunk_tokens=256, layout=SimpleNamespace(chunk_bytes=CB))
    at = 48  # 12k tokens in: 13.0 ms of prefill against 24.7 ms raw, 12.9 ms as fp8
    assert CalibratedPlanner(hw, MODEL).plan(pool, at, ["disk"]) == 0
    assert CalibratedPlanner(gpu_decode, MODEL).plan(pool, at, ["disk"]) == 1
    assert CalibratedPlanner(gpu_decode, MODEL).load_s("disk", CB) == pytest.approx(
        CB / 1.97 / 50e9 + CB / 100e9 + CB / 1.97 / 1.4e9 + 100e-6, rel=1e-3
    )


def test_a_codec_turns_evictions_into_cpu_hits_in_a_replay():
    # 12 prompts of 16 chunks (512 MiB of KV each) cycled twice over a CPU tier of 4 GiB: raw it
    # holds 128 chunks, fewer than the 192 cycled (LRU: each is evicted before its reuse); as
    # fp8 it holds 252, all of them.
    reqs = [
        Request(arrival_s=0.0, input_length=16 * 256, output_length=1, chunks=tuple(range(p * 100, p * 100 + 16)))
        for _ in range(2)
        for p in range(12)
    ]
    base = dict(model=MODEL, gpu_bytes=1 << 30, cpu_bytes=4 << 30, replay="fast")
    raw = Simulator(SimConfig(**base)).run(reqs)
    fp8 = Simulator(SimConfig(**base, hardware=HardwareCost(codec=CodecCost("fp8", 1.9691)))).run(reqs)
    assert raw.cpu_hits == 0
    assert fp8.cpu_hits == 12 * 16
