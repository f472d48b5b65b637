"""bench_sim_link: at what peer link speed peers start to cut TTFT -- a simulation, not a measurement.

Workload ``llama3_8b_link_sweep``: the shared Mooncake trace through 8 simulated instances of
Llama-3-8B (40 GiB of GPU KV pool and 128 GiB of DRAM each, no disk), the cost model calibrated
from bench/results as docs/sim.md's worked example is (H100, bench_e2e run ``_r9``). For each
routing and each link speed between hosts: peers on (``kvtier sim --peers``, every instance on its
own host), against the baseline of the same deployment with peers off, simulated in the same run.
Cases ``<routing>_link_<speed>gbps_ttft_p50`` / ``_p90``: simulated TTFT (ms, lower is better, so
ratio = baseline / value: above 1, peers cut TTFT); each case also carries both hit ratios. The
TTFTs are the simulator's, priced for the H100 host; the machine is the CPU that ran the simulation.

    python bench/bench_sim_link.py [--trace ../shared/data/mooncake_synthetic_trace.jsonl] \
        [--speeds 1,2,4,8,12.5,25,50,100] [--routing round_robin,least_loaded] [--out bench/results]

``kvtier sim ... --sweep-link 1,2,4`` runs one routing's sweep from the command line.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench_report import publish
from kvtier.sim import MODEL_PRESETS, Calibration, SimConfig, load_trace, trace_summary
from kvtier.sim.report import link_crossover, link_sweep, link_sweep_rows, link_sweep_table, rich_print

GIB = 1 << 30
ROOT = Path(__file__).resolve().parents[1]
E2E = ROOT / "bench" / "results" / "bench_e2e-llama3_8b_ttft_one_step_prefill_vllm_layout_r9-h100-2026-11-27.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", default=str(ROOT.parent / "shared" / "data" / "mooncake_synthetic_trace.jsonl"))
    ap.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    ap.add_argument("--speeds", default="1,2,4,8,12.5,25,50,100", help="link speeds between hosts, GB/s")
    ap.add_argument("--routing", default="round_robin,least_loaded")
    ap.add_argument("--calibrate", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--e2e", default=str(E2E), help="the bench_e2e run that calibrates the prefill")
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    model = MODEL_PRESETS["llama3_8b"]
    hw = Calibration(args.calibrate).hardware(model=model, e2e_file=args.e2e)
    reqs = load_trace(args.trace, chunk_tokens=256, limit=args.limit)
    s = trace_summary(reqs)
    speeds = [float(x) for x in args.speeds.split(",")]
    results, crossovers = [], {}
    for routing in args.routing.split(","):
        cfg = SimConfig(model=model, gpu_bytes=40 * GIB, cpu_bytes=128 * GIB, instances=8, routing=routing, hardware=hw)
        t0 = time.perf_counter()
        baseline, rows = link_sweep(reqs, cfg, [g * 1e9 for g in speeds])
        wall = time.perf_counter() - t0
        rich_print(link_sweep_table(baseline, rows, title=f"{routing}: peers on, against peers off"))
        cross = link_crossover(baseline, rows)
        crossovers[routing] = cross / 1e9 if cross else None
        print(f"{routing}: peers' median TTFT beats peers off from {crossovers[routing]} GB/s ({wall:.1f} s)")
        for d in link_sweep_rows(baseline, rows):
            for q in ("p50", "p90"):
                value, base = d[f"ttft_{q}_s"] * 1e3, d[f"baseline_ttft_{q}_s"] * 1e3
                results.append(
                    {
                        "case": f"{routing}_link_{d['link_gbps']:g}gbps_ttft_{q}",
                        "value": round(value, 1),
                        "unit": "ms",
                        "baseline": f"{routing}_peers_off_ttft_{q}",
                        "baseline_value": round(base, 1),
                        "ratio": round(base / value, 3),
                        "hit_ratio": round(d["hit_ratio"], 4),
                        "baseline_hit_ratio": round(d["baseline_hit_ratio"], 4),
                        "note": f"simulated TTFT {q} (kvtier.sim), not measured: {s['requests']} requests, "
                        f"8 instances (40 GiB GPU, 128 GiB DRAM), {routing}, peers over a "
                        f"{d['link_gbps']:g} GB/s + {hw.link_latency_s * 1e6:g} us link against peers off "
                        f"in the same run",
                    }
                )
    publish(
        "bench_sim_link",
        "llama3_8b_link_sweep",
        "cpu",
        results,
        args.out,
        simulated=True,
        trace=Path(args.trace).name,
        requests=s["requests"],
        calibration=hw.sources,
        cost_model=hw.values(),
        crossover_gbps_p50=crossovers,
    )


if __name__ == "__main__":
    main()
