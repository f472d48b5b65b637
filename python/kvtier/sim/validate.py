"""Predict bench_e2e's measured TTFTs with the simulator: same steps, same capacities.

bench/bench_e2e.py serves one prompt per length (4k, 16k, 32k tokens, Llama-3-8B-shaped, 256-token
chunks) through a fresh PagedKVPool + CPU + disk tiers, in a fixed order of steps: a warm-up
prompt, the prompt recomputed, hit in GPU pages, pushed out of the GPU (a pool-sized filler) and
hit in the CPU tier, pushed out of the CPU tier (a filler stored straight into it) and hit on
disk, the planner's calibration, the disk hit again with the load-or-recompute planner (and with
the split planner, where the document has those cases), and a half-prefix hit.
:func:`e2e_predictions` replays exactly those steps through the simulated tiers (so each case
finds the tier state the bench found, write-backs included) and prices each measured request
with the cost model. What varies between result documents is read from the document itself
(:func:`bench_version`, :func:`hit_reps` and the keys named below).

Calibration (:func:`compare_e2e`): tier bandwidths and the attention rate from bench_copy_py /
bench_disk / bench_p2p; the GEMM rate from the recompute TTFT at ONE prompt length
(``calibrate_tokens``). Everything else is a prediction. :func:`compare_e2e_runs` and
:func:`cross_run_table` do it for every H100 run in a directory (each calibrated on its own
recompute) and compare the medians across runs.

One-step-prefill runs (the JSON has ``prefill``): the same steps; the calibration also takes the
run's GPU hit at ``calibrate_tokens`` (a step's fixed cost over a cached prefix,
``HardwareCost.hit_forward_s``), declared as calibration in the rows, and loads are priced with
every write-back their promotion started (``writebacks_share_disk``). Chunked-prefill runs (no
``prefill``) are priced without either.

Runs whose engine overlaps a load's copy with the step (the JSON has ``load_compute_overlap``)
are priced with ``HardwareCost.load_compute_overlap`` (see kvtier.sim.engine.request_service_s);
runs without the key keep the serial form. Runs whose GPU and CPU hits are the median of several
requests (``reps_s``) are replayed with as many. docs/sim.md compares the predictions with the
H100 runs.
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass
from itertools import count

from kvtier.sim.cost import MODEL_PRESETS, Calibration, HardwareCost, ModelShape
from kvtier.sim.engine import (
    prefill_step_s,
    request_copy_s,
    request_load_parts_s,
    request_service_s,
)
from kvtier.sim.tiers import SimCpuTier, SimGpuPool

__all__ = [
    "DEFAULT_STEPS",
    "E2E_CASES",
    "E2ERow",
    "bench_version",
    "claimed_cases",
    "compare_e2e",
    "compare_e2e_runs",
    "cross_run_table",
    "e2e_predictions",
    "format_cross_run_table",
    "format_table",
    "hit_reps",
    "short_run_name",
]

PAGE, CHUNK = 16, 256
E2E_CASES = ("recompute", "gpu_hit", "cpu_hit", "disk_hit", "disk_hit_planned", "disk_hit_split", "half_prefix_gpu_hit")
# bench_e2e's steps where a result document does not record them (bench_version): a disk tier of
# (k, extra) = (4, 8), i.e. 4 * pool_tokens // 256 + 8 chunks' slots + 1 MiB, and a second
# recompute of a fresh prompt right after the first.
DEFAULT_STEPS = {"disk_chunks": (4, 8), "second_recompute": True}


def _keys(ids, tokens: int) -> list:
    return ids[: tokens // CHUNK]


def e2e_predictions(
    n: int,
    hw: HardwareCost,
    model: ModelShape | None = None,
    *,
    planner_flops_per_s: float | None = None,
    disk_gbps: float = 1.2,
    cpu_gbps: float = 50.0,
    second_recompute: bool = False,
    split: bool = False,
    disk_chunks: tuple[int, int] = (2, 4),
    max_writebacks: int = 64,
    hit_reps: int = 1,
    warm_half: bool = False,
    warm_off_bucket: bool = False,
) -> dict[str, dict]:
    """Simulate bench_e2e's steps for an ``n``-token prompt; returns per case the predicted TTFT
    (``ttft_s``) and what the request found (gpu / lower / disk chunks, write-backs waited for).

    ``planner_flops_per_s``: the planner's ModelCost throughput, which bench_e2e sets from its own
    measured recompute at this length (an input of the benchmarked system, not a calibration of
    the simulator); None: from the simulator's predicted recompute. ``disk_gbps`` /
    ``cpu_gbps``: the planner's bandwidths, as the bench set them. ``second_recompute``: a second,
    fresh prompt recomputed right after the first. ``split``: the disk_hit_split step (after
    disk_hit_planned: the disk hit again with bench_e2e's SplitCostModelPlanner, the same inputs).
    ``disk_chunks``: the disk tier's size as (k, extra): ``k * pool_tokens // 256 + extra``
    chunks' slots + 1 MiB (:func:`bench_version`). ``max_writebacks``: the disk's write-back
    bound (the run's ``disk_max_writebacks_in_flight``). ``hit_reps``: requests per GPU-hit and
    CPU-hit case, the case being their median (``reps_s`` in the JSON), each CPU hit after its
    own push out of the GPU. ``warm_half``: the warm-up prompt is served again, and a
    half-prefix request of it, before the half-prefix case (runs whose JSON has
    ``attention_split_min_queries``). ``warm_off_bucket``: a prompt of ``n - 512`` tokens is
    served in the run's pool after the warm-up prompt (``"warm_off_bucket": true``; a run that
    serves it in a scratch pool, ``"scratch_pool"``, leaves nothing to replay).
    A case's detail gives ``copy_s`` (the load's scatter into GPU pages) and ``step_s`` (the
    step after the cached prefix), the parts that overlap under ``hw.load_compute_overlap``.
    """
    from kvtier.planner import CostModelPlanner, ModelCost, SplitCostModelPlanner

    model = model or MODEL_PRESETS["llama3_8b"]
    kvt = model.kv_bytes_per_token
    block = CHUNK * kvt
    pool_tokens = 2 * (n + CHUNK)
    num_pages = pool_tokens // PAGE
    cpu_chunks = (pool_tokens // CHUNK + 4) * block // ((block + 4095) // 4096 * 4096)
    disk_bytes = (disk_chunks[0] * pool_tokens // CHUNK + disk_chunks[1]) * (block + 4096) + (1 << 20)
    slot = 4096 + (block + 4095) // 4096 * 4096
    per_wait = max(1, min(64, int(200e-6 * hw.disk_write_bw // slot)))  # 32 MiB chunks: 1
    cpu = SimCpuTier(
        cpu_chunks,
        disk_slots=(disk_bytes - 4096) // slot,
        disk_admit_min_seen=1,
        writebacks_per_wait=per_wait,
        max_demotions_in_flight=max_writebacks,
    )
    pool = SimGpuPool(num_pages, page_tokens=PAGE, chunk_tokens=CHUNK, cpu=cpu, chunk_bytes=block)
    fresh = count()

    def tokens(m: int) -> list:
        return [next(fresh) for _ in range(m // CHUNK)]  # ids of the full chunks of m new tokens

    out: dict[str, dict] = {}
    reps: dict[str, list[dict]] = {}

    def generate(ids: list, m: int, case: str | None = None) -> None:
        """Engine.generate([prompt], 1): begin(prompt[:-1]) -> prefill -> commit(prompt) -> release.
        A case served more than once (hit_reps) keeps every request's TTFT and the median's detail."""
        b = pool.begin(_keys(ids, m - 1), m)
        if b.rejected:
            raise RuntimeError(f"the simulated pool cannot hold a {m}-token prompt")
        cached = (b.gpu_hits + b.lower_hits) * CHUNK
        ttft = request_service_s(hw, model, CHUNK, block, b, m)
        pages_s, load_s = request_load_parts_s(hw, block, b)
        # the step after the cached prefix (a split plan's: the one after its loaded tail)
        step_s = prefill_step_s(hw, model, min((b.gpu_hits + b.split_head + b.lower_hits) * CHUNK, m - 1), m)
        pool.finish(b, _keys(ids, m))
        if case:
            d = {
                "ttft_s": ttft,
                "pages_s": pages_s,
                "load_s": load_s,
                "copy_s": request_copy_s(hw, block, b),
                "step_s": step_s,
                "gpu_chunks": b.gpu_hits,
                "lower_chunks": b.lower_hits,
                "disk_chunks": b.disk_hits,
                "computed_tokens": m - cached,
                "split_head_chunks": b.split_head,
                "planned_recompute_chunks": b.planned_recompute,
                "writebacks_waited": b.critical_writebacks,
                "writebacks_started_by_load": b.load_disk_writes,
                "offloaded_chunks": b.offloaded,
            }
            runs = sorted(reps.setdefault(case, []) + [d], key=lambda r: r["ttft_s"])
            reps[case] = runs
            out[case] = dict(runs[len(runs) // 2], reps_s=[r["ttft_s"] for r in runs])  # the bench's median

    def push_out_of_gpu() -> None:
        b = pool.begin(tokens(pool_tokens), pool_tokens)
        pool.finish(b, [])

    def push_out_of_cpu() -> None:
        ids = tokens(pool_tokens)
        b = pool.begin(ids, pool_tokens)
        cpu.store(ids)
        pool.finish(b, [])

    prompt = tokens(n) + [next(fresh)]  # n // CHUNK full chunks (+ a spare id never used whole)
    warm = tokens(n)
    generate(warm, n)  # warm-up prompt
    if warm_off_bucket:
        generate(tokens(n - 2 * CHUNK), n - 2 * CHUNK)
    generate(prompt, n, "recompute")
    if second_recompute:
        generate(tokens(n), n)
    for _ in range(hit_reps):
        generate(prompt, n, "gpu_hit")
    for _ in range(hit_reps):
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
    cost = ModelCost(model.params, model.layers, model.hidden, flops)
    pool.planner = CostModelPlanner(cost, bandwidth={"cpu": cpu_gbps * 1e9, "disk": disk_gbps * 1e9})
    push_out_of_gpu()
    push_out_of_cpu()
    generate(prompt, n, "disk_hit_planned")
    if split:
        pool.planner = SplitCostModelPlanner(cost, bandwidth=dict(pool.planner.bandwidth))
        push_out_of_gpu()
        push_out_of_cpu()
        generate(prompt, n, "disk_hit_split")
    pool.planner = None
    if warm_half:  # the first calls of the half-prefix attention shapes, on the warm-up prompt
        generate(warm, n)
        generate(warm[: n // 2 // CHUNK] + tokens(n - n // 2), n)
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


def bench_version(doc: dict) -> dict:
    """The steps of the bench_e2e run a result document comes from, as :func:`e2e_predictions`
    takes them: ``disk_chunks`` and ``second_recompute`` as the document records them
    (``disk_tier_chunks``, ``second_recompute``), else :data:`DEFAULT_STEPS`; ``split``: whether
    it has disk_hit_split cases."""
    k, extra = doc.get("disk_tier_chunks", DEFAULT_STEPS["disk_chunks"])
    return {
        "disk_chunks": (int(k), int(extra)),
        "second_recompute": bool(doc.get("second_recompute", DEFAULT_STEPS["second_recompute"])),
        "split": any(r["case"].startswith("ttft_disk_hit_split_") for r in doc["results"]),
    }


def hit_reps(doc: dict) -> int:
    """Requests per GPU-hit and CPU-hit case of a bench_e2e run: the length of their ``reps_s``,
    1 where the document has none."""
    return max((len(r["reps_s"]) for r in doc["results"] if r.get("reps_s")), default=1)


def compare_e2e(
    bench_dir: str,
    *,
    e2e_glob: str = "bench_e2e-llama3_8b_ttft-h100-*.json",
    calibrate_tokens: int = 4096,
    gpu_tag: str = "h200",
    disk_tag: str = "h200host",
) -> tuple[list[E2ERow], HardwareCost]:
    """Calibrate from bench_dir's JSON files (the GEMM rate from this run's recompute at
    ``calibrate_tokens``) and predict every TTFT case of the (last) bench_e2e file matching
    ``e2e_glob``."""
    files = sorted(glob.glob(os.path.join(bench_dir, e2e_glob)))
    if not files:
        raise FileNotFoundError(f"no {e2e_glob} in {bench_dir}")
    model = MODEL_PRESETS["llama3_8b"]
    hw = Calibration(bench_dir).hardware(
        gpu_tag=gpu_tag, disk_tag=disk_tag, model=model, e2e_file=files[-1], calibrate_tokens=calibrate_tokens
    )
    with open(files[-1]) as f:
        doc = json.load(f)
    version = bench_version(doc)
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

    def predict(n: int, hw: HardwareCost) -> dict:
        probe = ModelCost(model.params, model.layers, model.hidden, 1.0)
        flops = probe.prefill_seconds(0, n) / measured[("recompute", n)]  # bench_e2e's planner input
        disk_gbps, cpu_gbps = planner_bw.get(n, (1.2, 50.0))
        return e2e_predictions(
            n,
            hw,
            model,
            planner_flops_per_s=flops,
            disk_gbps=disk_gbps,
            cpu_gbps=cpu_gbps,
            second_recompute=version["second_recompute"],
            split=version["split"] and ("disk_hit_split", n) in measured,
            disk_chunks=version["disk_chunks"],
            max_writebacks=int(doc.get("disk_max_writebacks_in_flight", 64)),
            hit_reps=hit_reps(doc),
            warm_half="attention_split_min_queries" in doc,
            warm_off_bucket=doc.get("warm_off_bucket") is True,
        )

    preds: dict[int, dict] = {}
    if ("recompute", calibrate_tokens) in measured:
        # The calibration's recompute may have waited for chunk moves (the offload of GPU victims
        # its prompt displaced); the GEMM rate comes from the rest of its TTFT.
        preds[calibrate_tokens] = predict(calibrate_tokens, hw)
        moves = preds[calibrate_tokens]["recompute"]["pages_s"]
        if moves > 0:
            hw = Calibration(bench_dir).hardware(
                gpu_tag=gpu_tag,
                disk_tag=disk_tag,
                model=model,
                e2e_file=files[-1],
                calibrate_tokens=calibrate_tokens,
                recompute_moves_s=moves,
            )
            del preds[calibrate_tokens]  # priced with the rate before the correction
    for n in sorted({k[1] for k in measured}):
        pred = preds[n] if n in preds else predict(n, hw)
        for case in E2E_CASES:
            if (case, n) not in measured:
                continue
            role = (
                "calibration"
                if n == calibrate_tokens
                and (case == "recompute" or (case == "gpu_hit" and "hit_forward_s" in hw.sources))
                else "prediction"
            )
            rows.append(E2ERow(case, n, measured[(case, n)], pred[case]["ttft_s"], role, pred[case]))
    return rows, hw


def compare_e2e_runs(
    bench_dir: str, *, e2e_glob: str = "bench_e2e-llama3_8b_ttft*-h100-*.json", calibrate_tokens: int = 4096
) -> dict[str, list[E2ERow]]:
    """:func:`compare_e2e` for every bench_e2e run matching ``e2e_glob``, each calibrated from its
    own recompute at ``calibrate_tokens``: {file name: rows}."""
    files = sorted(glob.glob(os.path.join(bench_dir, e2e_glob)))
    if not files:
        raise FileNotFoundError(f"no {e2e_glob} in {bench_dir}")
    return {
        os.path.basename(f): compare_e2e(bench_dir, e2e_glob=os.path.basename(f), calibrate_tokens=calibrate_tokens)[0]
        for f in files
    }


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    k = len(s) // 2
    return s[k] if len(s) % 2 else (s[k - 1] + s[k]) / 2


def cross_run_table(runs: dict[str, list[E2ERow]]) -> list[dict]:
    """Per (case, tokens) over the runs: the measured and predicted TTFTs of each run, the error
    of each run's prediction against its own measurement, and the medians across runs (the
    median prediction against the median measurement: ``median_error``)."""
    cases: dict[tuple[str, int], dict] = {}
    for name, rows in runs.items():
        for r in rows:
            c = cases.setdefault((r.case, r.tokens), {"case": r.case, "tokens": r.tokens, "runs": {}})
            c["runs"][name] = {
                "measured_s": r.measured_s,
                "predicted_s": r.predicted_s,
                "error": r.error,
                "role": r.role,
            }
    out = []
    for key in sorted(cases, key=lambda k: (k[1], E2E_CASES.index(k[0]))):
        c = cases[key]
        meas = [v["measured_s"] for v in c["runs"].values()]
        pred = [v["predicted_s"] for v in c["runs"].values()]
        c["median_measured_s"] = _median(meas)
        c["median_predicted_s"] = _median(pred)
        c["median_error"] = c["median_predicted_s"] / c["median_measured_s"] - 1.0
        c["spread"] = max(meas) / min(meas) - 1.0  # the measurements' own spread across runs
        for v in c["runs"].values():
            v["error_vs_median"] = v["predicted_s"] / c["median_measured_s"] - 1.0
        out.append(c)
    return out


def short_run_name(name: str) -> str:
    """A bench_e2e file's short name in tables: what its workload adds to llama3_8b_ttft
    ("first" for the plain one); one-step-prefill runs by KV layout and copy method."""
    s = name.split("ttft", 1)[1].split("-h100")[0].lstrip("_")
    if s.startswith("one_step_prefill"):
        return s[len("one_step_prefill") :].lstrip("_").replace("_layout", "") or "cross_layer"
    return s or "first"


def format_cross_run_table(table: list[dict], names: list[str]) -> str:
    """A markdown table: per case, each run's measured / predicted and error, then the medians."""
    short = [short_run_name(n) for n in names]
    head = "| case | tokens | " + " | ".join(f"{s}: meas / pred (err)" for s in short)
    head += " | spread | median meas / pred | median err |"
    lines = [head, "|---|---:|" + "---:|" * (len(names) + 3)]
    for c in table:
        cells = []
        for n in names:
            v = c["runs"].get(n)
            cells.append("—" if v is None else f"{v['measured_s']:.3f} / {v['predicted_s']:.3f} ({v['error']:+.0%})")
        lines.append(
            f"| {c['case']} | {c['tokens']} | "
            + " | ".join(cells)
            + f" | {c['spread']:.0%} | {c['median_measured_s']:.3f} / {c['median_predicted_s']:.3f}"
            f" | {c['median_error']:+.1%} |"
        )
    return "\n".join(lines)


def format_table(rows: list[E2ERow]) -> str:
    """A markdown table of the comparison."""
    lines = [
        "| case | tokens | measured (s) | predicted (s) | error | role | what the request found |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        d = r.detail
        found = (
            f"gpu {d['gpu_chunks']}, lower {d['lower_chunks']} (disk {d['disk_chunks']}), "
            f"computed {d['computed_tokens']} tok"
        )
        if d.get("writebacks_waited"):
            found += f", waited for {d['writebacks_waited']} write-backs"
            if d.get("writebacks_started_by_load", 0) > d["writebacks_waited"]:
                found += f" ({d['writebacks_started_by_load']} started)"
        if d.get("split_head_chunks"):
            found += f", split: head of {d['split_head_chunks']} chunks recomputed while the tail loaded"
        elif d.get("planned_recompute_chunks"):
            found += f", planner recomputed {d['planned_recompute_chunks']} chunks"
        lines.append(
            f"| {r.case} | {r.tokens} | {r.measured_s:.4f} | {r.predicted_s:.4f} | {r.error:+.1%} | "
            f"{r.role} | {found} |"
        )
    return "\n".join(lines)


def claimed_cases(table: list[dict]) -> list[dict]:
    """The cross-run rows that are predictions (a case that calibrates every run is not)."""
    return [c for c in table if any(v["role"] == "prediction" for v in c["runs"].values())]


def write_cross_run_report(
    bench_dir: str,
    json_path: str,
    png_path: str | None = None,
    *,
    runs: list[str] | None = None,
    calibrate_tokens: int = 4096,
    title_note: str | None = None,
) -> dict:
    """Write a cross-run report (docs/sim_e2e_validation*.json, and a .png scatter): every run's
    rows and the cross-run medians of the bench_e2e files ``runs`` in ``bench_dir`` (default:
    every H100 run there)."""
    from kvtier.sim.cost import Calibration

    names = runs or [
        os.path.basename(f) for f in sorted(glob.glob(os.path.join(bench_dir, "bench_e2e-llama3_8b_ttft*-h100-*.json")))
    ]
    per_run, doc_runs = {}, {}
    for name in names:
        rows, hw = compare_e2e(bench_dir, e2e_glob=name, calibrate_tokens=calibrate_tokens)
        per_run[name] = rows
        preds = [r for r in rows if r.role == "prediction"]
        doc_runs[name] = {
            "weights_rate": hw.weights_rate,
            "hit_forward_s": hw.hit_forward_s,
            "h2d_bw": hw.h2d_bw,
            "disk_read_bw": hw.disk_read_bw,
            "disk_write_bw": hw.disk_write_bw,
            "within_15pct": sum(1 for r in preds if abs(r.error) <= 0.15),
            "predictions": len(preds),
            "rows": [
                {
                    "case": r.case,
                    "tokens": r.tokens,
                    "measured_s": r.measured_s,
                    "predicted_s": round(r.predicted_s, 4),
                    "error": round(r.error, 4),
                    "role": r.role,
                    "found": r.detail,
                }
                for r in rows
            ],
        }
    table = cross_run_table(per_run)
    claimed = claimed_cases(table)
    hw0 = Calibration(bench_dir).hardware(
        model=MODEL_PRESETS["llama3_8b"], e2e_file=os.path.join(bench_dir, names[0]), calibrate_tokens=calibrate_tokens
    )
    doc = {
        "calibrate_tokens": calibrate_tokens,
        "calibration_of_the_first_run": hw0.sources,
        "hardware_of_the_first_run": {
            k: getattr(hw0, k)
            for k in (
                "attention_rate",
                "h2d_bw",
                "d2h_bw",
                "disk_read_bw",
                "disk_write_bw",
                "disk_latency_s",
                "hit_forward_s",
                "writebacks_share_disk",
            )
        },
        "runs": doc_runs,
        "cross_run": {
            "within_15pct_of_median": sum(1 for c in claimed if abs(c["median_error"]) <= 0.15),
            "cases": len(claimed),
            "rows": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in c.items()} for c in table],
        },
    }
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=1)
    if png_path:
        from kvtier.sim.report import _pyplot

        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(7, 6))
        lo, hi = 0.02, 10.0
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        ax.fill_between([lo, hi], [lo * 0.85, hi * 0.85], [lo * 1.15, hi * 1.15], color="0.9", label="±15%")
        for i, name in enumerate(names):
            rs = [r for r in per_run[name] if r.role == "prediction"]
            ax.scatter(
                [r.measured_s for r in rs],
                [r.predicted_s for r in rs],
                s=12,
                alpha=0.6,
                label=short_run_name(name),
                marker="o^sv"[i % 4],
            )
        ax.scatter(
            [c["median_measured_s"] for c in claimed],
            [c["median_predicted_s"] for c in claimed],
            s=40,
            facecolors="none",
            edgecolors="red",
            label="median across runs",
        )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel("measured TTFT (s), H100")
        ax.set_ylabel("simulated TTFT (s)")
        words = {2: "two", 3: "three", 4: "four"}
        ax.set_title(
            f"bench_e2e TTFT: simulator vs {words.get(len(names), len(names))} H100 runs"
            + (f" ({title_note})" if title_note else "")
        )
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(png_path, dpi=110)
        plt.close(fig)
    return doc
