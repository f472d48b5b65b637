"""Predict bench_e2e's measured TTFTs with the simulator: same steps, same capacities.

bench/bench_e2e.py serves one prompt per length (4k, 16k, 32k tokens, Llama-3-8B-shaped, 256-token
chunks) through a fresh PagedKVPool + CPU + disk tiers, in a fixed order of steps: a warm-up
prompt, the prompt recomputed, hit in GPU pages, pushed out of the GPU (a pool-sized filler) and
hit in the CPU tier, pushed out of the CPU tier (a filler stored straight into it) and hit on
disk, the planner's calibration, the disk hit again with the load-or-recompute planner, and a
half-prefix hit. :func:`e2e_predictions` replays exactly those steps through the simulated tiers
(so each case finds the tier state the bench found, write-backs included) and prices each
measured request with the cost model.

Calibration (:func:`compare_e2e`): tier bandwidths and the attention rate from bench_copy_py /
bench_disk / bench_p2p; the GEMM rate from the recompute TTFT at ONE prompt length
(``calibrate_tokens``). Everything else is a prediction.
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass
from itertools import count

from kvtier.sim.cost import MODEL_PRESETS, Calibration, HardwareCost, ModelShape
from kvtier.sim.engine import request_load_s
from kvtier.sim.tiers import SimCpuTier, SimGpuPool

__all__ = ["E2E_CASES", "E2ERow", "compare_e2e", "e2e_predictions", "format_table"]

PAGE, CHUNK = 16, 256
E2E_CASES = ("recompute", "gpu_hit", "cpu_hit", "disk_hit", "disk_hit_planned", "half_prefix_gpu_hit")


def _keys(ids, tokens: int) -> list:
    return ids[: tokens // CHUNK]


def e2e_predictions(n: int, hw: HardwareCost, model: ModelShape | None = None, *,
                    planner_flops_per_s: float | None = None, disk_gbps: float = 1.2,
                    cpu_gbps: float = 50.0, second_recompute: bool = False) -> dict[str, dict]:
    """Simulate bench_e2e's steps for an ``n``-token prompt; returns per case the predicted TTFT
    (``ttft_s``) and what the request found (gpu / lower / disk chunks, write-backs waited for).

    ``planner_flops_per_s``: the planner's ModelCost throughput, which bench_e2e sets from its own
    measured recompute at this length (an input of the benchmarked system, not a calibration of
    the simulator); None: from the simulator's predicted recompute. ``disk_gbps`` /
    ``cpu_gbps``: the planner's bandwidths, as the bench set them. ``second_recompute``: the
    bench version (from 2026-11-27 01:13) that recomputes a second, fresh prompt right after the
    first.
    """
    from kvtier.planner import CostModelPlanner, ModelCost

    model = model or MODEL_PRESETS["llama3_8b"]
    kvt = model.kv_bytes_per_token
    block = CHUNK * kvt
    pool_tokens = 2 * (n + CHUNK)
    num_pages = pool_tokens // PAGE
    cpu_chunks = (pool_tokens // CHUNK + 4) * block // ((block + 4095) // 4096 * 4096)
    disk_bytes = (2 * pool_tokens // CHUNK + 4) * (block + 4096) + (1 << 20)
    slot = 4096 + (block + 4095) // 4096 * 4096
    per_wait = max(1, min(64, int(200e-6 * hw.disk_write_bw // slot)))  # 32 MiB chunks: 1
    cpu = SimCpuTier(cpu_chunks, disk_slots=(disk_bytes - 4096) // slot, disk_admit_min_seen=1,
                     writebacks_per_wait=per_wait)
    pool = SimGpuPool(num_pages, page_tokens=PAGE, chunk_tokens=CHUNK, cpu=cpu, chunk_bytes=block)
    fresh = count()

    def tokens(m: int) -> list:
        return [next(fresh) for _ in range(m // CHUNK)]  # ids of the full chunks of m new tokens

    out: dict[str, dict] = {}

    def generate(ids: list, m: int, case: str | None = None) -> None:
        """Engine.generate([prompt], 1): begin(prompt[:-1]) -> prefill -> commit(prompt) -> release."""
        b = pool.begin(_keys(ids, m - 1), m)
        if b.rejected:
            raise RuntimeError(f"the simulated pool cannot hold a {m}-token prompt")
        cached = (b.gpu_hits + b.lower_hits) * CHUNK
        ttft = request_load_s(hw, block, b) + hw.prefill_s(model, cached, m)
        pool.finish(b, _keys(ids, m))
        if case:
            out[case] = {"ttft_s": ttft, "gpu_chunks": b.gpu_hits, "lower_chunks": b.lower_hits,
                         "disk_chunks": b.disk_hits, "computed_tokens": m - cached,
                         "planned_recompute_chunks": b.planned_recompute, "writebacks_waited": b.critical_writebacks,
                         "offloaded_chunks": b.offloaded}

    def push_out_of_gpu() -> None:
        b = pool.begin(tokens(pool_tokens), pool_tokens)
        pool.finish(b, [])

    def push_out_of_cpu() -> None:
        ids = tokens(pool_tokens)
        b = pool.begin(ids, pool_tokens)
        cpu.store(ids)
        pool.finish(b, [])

    prompt = tokens(n) + [next(fresh)]  # n // CHUNK full chunks (+ a spare id never used whole)
    generate(tokens(n), n)  # warm-up prompt
    generate(prompt, n, "recompute")
    if second_recompute:
        generate(tokens(n), n)
    generate(prompt, n, "gpu_hit")
    push_out_of_gpu()
    generate(prompt, n, "cpu_hit")
    push_out_of_gpu()
    push_out_of_cpu()
    generate(prompt, n, "disk_hit")
    # planner.calibrate(pool): 4 chunks' pages, a store of 4 random chunks, 3 loads of them.
    r = pool.allocate_pages(4 * CHUNK // PAGE)
    cal = tokens(4 * CHUNK)
    cpu.store(cal)
    for _ in range(3):
        cpu.load(cal)
    pool.free_pages(4 * CHUNK // PAGE)
    del r
    flops = planner_flops_per_s
    if flops is None:
        probe = ModelCost(model.params, model.layers, model.hidden, 1.0)
        flops = probe.prefill_seconds(0, n) / out["recompute"]["ttft_s"]
    pool.planner = CostModelPlanner(ModelCost(model.params, model.layers, model.hidden, flops),
                                    bandwidth={"cpu": cpu_gbps * 1e9, "disk": disk_gbps * 1e9})
    push_out_of_gpu()
    push_out_of_cpu()
    generate(prompt, n, "disk_hit_planned")
    pool.planner = None
    half = prompt[: n // 2 // CHUNK] + tokens(n - n // 2)
    push_out_of_gpu()
    generate(prompt, n)
    generate(half, n, "half_prefix_gpu_hit")
    return out


@dataclass
class E2ERow:
    """One bench_e2e case: measured vs predicted TTFT."""

    case: str
    tokens: int
    measured_s: float
    predicted_s: float
    role: str  # "calibration" or "prediction"
    detail: dict

    @property
    def error(self) -> float:
        """predicted / measured - 1."""
        return self.predicted_s / self.measured_s - 1.0


def compare_e2e(bench_dir: str, *, e2e_glob: str = "bench_e2e-llama3_8b_ttft-h100-*.json",
                calibrate_tokens: int = 4096, gpu_tag: str = "h200", disk_tag: str = "h200host"
                ) -> tuple[list[E2ERow], HardwareCost]:
    """Calibrate from bench_dir's JSON files and predict every TTFT case of the bench_e2e file."""
    files = sorted(glob.glob(os.path.join(bench_dir, e2e_glob)))
    if not files:
        raise FileNotFoundError(f"no {e2e_glob} in {bench_dir}")
    model = MODEL_PRESETS["llama3_8b"]
    hw = Calibration(bench_dir).hardware(gpu_tag=gpu_tag, disk_tag=disk_tag, model=model, e2e_file=files[-1],
                                         calibrate_tokens=calibrate_tokens)
    with open(files[-1]) as f:
        doc = json.load(f)
    measured: dict[tuple[str, int], float] = {}
    planner_bw: dict[int, tuple[float, float]] = {}
    for r in doc["results"]:
        if not r["case"].startswith("ttft_"):
            continue
        name, n = r["case"][5:].rsplit("_", 1)
        measured[(name, int(n))] = r["value"]
        measured[("recompute", int(n))] = r["baseline_value"]
        m = re.search(r"disk ([0-9.]+) GB/s, cpu calibrated ([0-9.]+) GB/s", r.get("note", ""))
        if name == "disk_hit_planned" and m:
            planner_bw[int(n)] = (float(m.group(1)), float(m.group(2)))
    rows = []
    from kvtier.planner import ModelCost

    for n in sorted({k[1] for k in measured}):
        probe = ModelCost(model.params, model.layers, model.hidden, 1.0)
        flops = probe.prefill_seconds(0, n) / measured[("recompute", n)]  # bench_e2e's planner input
        disk_gbps, cpu_gbps = planner_bw.get(n, (1.2, 50.0))
        # The bench version that calibrates the planner's disk rate from the disk hit also adds a
        # second recompute: recognise it by that rate (the disk hit's bytes over its TTFT).
        disk_hit = measured.get(("disk_hit", n))
        own_rate = disk_hit and round((n - 1) // CHUNK * CHUNK * model.kv_bytes_per_token / disk_hit / 1e9, 3)
        pred = e2e_predictions(n, hw, model, planner_flops_per_s=flops, disk_gbps=disk_gbps, cpu_gbps=cpu_gbps,
                               second_recompute=bool(own_rate) and abs(own_rate - disk_gbps) < 2e-3)
        for case in E2E_CASES:
            if (case, n) not in measured:
                continue
            role = "calibration" if case == "recompute" and n == calibrate_tokens else "prediction"
            rows.append(E2ERow(case, n, measured[(case, n)], pred[case]["ttft_s"], role, pred[case]))
    return rows, hw


def format_table(rows: list[E2ERow]) -> str:
    """A markdown table of the comparison."""
    lines = ["| case | tokens | measured (s) | predicted (s) | error | role | what the request found |",
             "|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        d = r.detail
        found = (f"gpu {d['gpu_chunks']}, lower {d['lower_chunks']} (disk {d['disk_chunks']}), "
                 f"computed {d['computed_tokens']} tok")
        if d.get("writebacks_waited"):
            found += f", waited for {d['writebacks_waited']} write-backs"
        if d.get("planned_recompute_chunks"):
            found += f", planner recomputed {d['planned_recompute_chunks']} chunks"
        lines.append(f"| {r.case} | {r.tokens} | {r.measured_s:.4f} | {r.predicted_s:.4f} | {r.error:+.1%} | "
                     f"{r.role} | {found} |")
    return "\n".join(lines)
