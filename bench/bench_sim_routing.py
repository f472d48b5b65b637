"""bench_sim_routing: routing policies compared on TTFT and hit ratio -- a simulation, not a measurement.

Workload ``llama3_8b_routing``: 8 simulated Llama-3-8B instances, the cost model calibrated from
bench/results as docs/sim.md's worked example is (H100, bench_e2e run ``_r9``), two traces:

- ``shared``: the shared Mooncake trace at its own arrival times, 40 GiB GPU, 128 GiB DRAM and
  64 GiB disk per instance (the README's `kvtier sim` deployment).
- ``hot_prefix_<load>``: the hot-prefix generator (kvtier.sim.hot_prefix, 2,000 requests, seed 1)
  at 30/50/70/90% of the cluster's cold-prefill capacity, 4 GiB GPU and 16 GiB DRAM per instance.

Cases ``<trace>_<policy>_ttft_<q>``: simulated TTFT (ms, lower is better: ratio = baseline /
value) against least_loaded on the same trace in the same run; each case carries the hit ratio of
both and the GPU+CPU share of it (hits that save time under the cost model: a disk hit costs more
than recomputing its chunk there). kv_load runs at its default balance and at ``--balances``.

    python bench/bench_sim_routing.py [--trace ../shared/data/mooncake_synthetic_trace.jsonl] [--out bench/results]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from bench_report import publish
from kvtier.sim import MODEL_PRESETS, Calibration, SimConfig, Simulator, load_trace
from kvtier.sim.hot_prefix import hot_prefix_at_load

GIB = 1 << 30
ROOT = Path(__file__).resolve().parents[1]
E2E = ROOT / "bench" / "results" / "bench_e2e-llama3_8b_ttft_one_step_prefill_vllm_layout_r9-h100-2026-11-27.json"
LOADS = (0.3, 0.5, 0.7, 0.9)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", default=str(ROOT.parent / "shared" / "data" / "mooncake_synthetic_trace.jsonl"))
    ap.add_argument("--hot-requests", type=int, default=2000)
    ap.add_argument("--balances", default="0.5", help="kv_load balances run besides the default")
    ap.add_argument("--calibrate", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--e2e", default=str(E2E))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "sim_routing.png"))
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    model = MODEL_PRESETS["llama3_8b"]
    hw = Calibration(args.calibrate).hardware(model=model, e2e_file=args.e2e)
    default_balance = SimConfig().routing_balance
    policies = [("round_robin", None), ("least_loaded", None), ("cache_aware", None), ("kv_load", default_balance)]
    policies += [("kv_load", float(b)) for b in args.balances.split(",") if b.strip()]
    shared = SimConfig(
        model=model, gpu_bytes=40 * GIB, cpu_bytes=128 * GIB, disk_bytes=64 * GIB, instances=8, hardware=hw
    )
    hot = SimConfig(model=model, gpu_bytes=4 * GIB, cpu_bytes=16 * GIB, instances=8, hardware=hw)
    traces = [("shared", shared, load_trace(args.trace, chunk_tokens=256))]
    traces += [
        (f"hot_prefix_{round(load * 100)}", hot, hot_prefix_at_load(args.hot_requests, load, hot, seed=1))
        for load in LOADS
    ]
    results, table = [], []
    t0 = time.perf_counter()
    for tname, cfg, reqs in traces:
        runs = {}
        for name, bal in policies:
            label = name if bal is None or bal == default_balance else f"{name}_b{bal:g}"
            c = replace(cfg, routing=name, routing_balance=bal if bal is not None else default_balance)
            runs[label] = Simulator(c).run(reqs)
        base = runs["least_loaded"]
        bp = base.ttft_percentiles()
        for label, r in runs.items():
            p = r.ttft_percentiles()
            useful = r.hit_ratio("gpu") + r.hit_ratio("cpu")
            row = {
                "trace": tname,
                "policy": label,
                "hit_ratio": round(r.hit_ratio(), 4),
                "gpu_cpu_hit_ratio": round(useful, 4),
                **{f"ttft_{q}_ms": round(p[q] * 1e3, 1) for q in ("p50", "p90", "p99")},
            }
            table.append(row)
            print(row, flush=True)
            for q in ("p50", "p90", "p99"):
                results.append(
                    {
                        "case": f"{tname}_{label}_ttft_{q}",
                        "value": round(p[q] * 1e3, 1),
                        "unit": "ms",
                        "baseline": f"{tname}_least_loaded_ttft_{q}",
                        "baseline_value": round(bp[q] * 1e3, 1),
                        "ratio": round(bp[q] / p[q], 3),
                        "hit_ratio": row["hit_ratio"],
                        "gpu_cpu_hit_ratio": row["gpu_cpu_hit_ratio"],
                        "baseline_hit_ratio": round(base.hit_ratio(), 4),
                        "note": f"simulated TTFT {q} (kvtier.sim), not measured: {len(reqs)} requests, 8 instances "
                        f"({cfg.gpu_bytes // GIB} GiB GPU, {cfg.cpu_bytes // GIB} GiB DRAM, {cfg.disk_bytes // GIB} "
                        f"GiB disk), {label} against least_loaded in the same run",
                    }
                )
    print(f"{len(table)} runs in {time.perf_counter() - t0:.1f} s")
    if args.plot:
        _plot(table, args.plot)
    publish(
        "bench_sim_routing",
        "llama3_8b_routing",
        "cpu",
        results,
        args.out,
        simulated=True,
        trace=Path(args.trace).name,
        hot_prefix={"requests": args.hot_requests, "seed": 1, "loads": list(LOADS)},
        default_balance=default_balance,
        calibration=hw.sources,
        cost_model=hw.values(),
        table=table,
    )


def _plot(table: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    hot = [r for r in table if r["trace"].startswith("hot_prefix")]
    loads = sorted({int(r["trace"].rsplit("_", 1)[1]) for r in hot})
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for label in dict.fromkeys(r["policy"] for r in hot):
        rows = {int(r["trace"].rsplit("_", 1)[1]): r for r in hot if r["policy"] == label}
        for ax, key in zip(axes, ("ttft_p50_ms", "ttft_p99_ms", "hit_ratio"), strict=True):
            ax.plot(loads, [rows[x][key] for x in loads], marker="o", label=label)
            ax.set_title(f"hot_prefix: {key}")
            ax.set_xlabel("load, % of cold-prefill capacity")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
