"""`kvtier sim`: replay a trace through simulated tiers and print hit ratios, TTFT and traffic."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import replace

from kvtier.routing import DEFAULT_BALANCE, DEFAULT_SLACK_S
from kvtier.sim.cost import MODEL_PRESETS, CalibratedPlanner, Calibration, HardwareCost

_GIB = 1 << 30
HOT_PREFIX_REQUESTS = 2000  # the default of --trace hot_prefix
SYNTHETIC_REQUESTS = 4000  # the default of --trace synthetic: the size of Mooncake's published trace


def add_parser(sub) -> None:
    """Register `kvtier sim` on the `kvtier` command's subparsers."""
    p = sub.add_parser(
        "sim",
        help="simulate a trace through GPU / CPU / disk tiers and peers (capacity planning)",
        description="Replay a request trace (Mooncake or token-id JSONL) through simulated "
        "kvtier instances and report hit ratio per tier, TTFT and bytes moved.",
    )
    p.add_argument(
        "--trace",
        required=True,
        help="trace file (JSONL, Mooncake or {'tokens': [...]} lines), or 'synthetic[:N]': N requests "
        f"(default {SYNTHETIC_REQUESTS}) of the built-in Mooncake-format generator (docs/sim.md), or "
        f"'hot_prefix[:N]': N requests (default {HOT_PREFIX_REQUESTS}) of the hot-prefix generator "
        "(shared system prompts, multi-turn sessions) at --load of the cluster's capacity",
    )
    p.add_argument(
        "--load",
        type=float,
        default=0.7,
        help="--trace hot_prefix: arrival rate as a fraction of the cluster's cold-prefill capacity (default 0.7)",
    )
    p.add_argument("--seed", type=int, default=None, help="seed of --trace synthetic (default 0)")
    p.add_argument("--format", default="auto", choices=("auto", "mooncake", "tokens"))
    p.add_argument("--block-tokens", type=int, default=512, help="tokens per Mooncake hash block (default 512)")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    p.add_argument("--model", default="llama3_8b", choices=sorted(MODEL_PRESETS), help="model shape")
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--page-tokens", type=int, default=16)
    p.add_argument("--gpu-gib", type=float, default=16.0, help="GPU KV pool per instance, GiB")
    p.add_argument("--cpu-gib", type=float, default=64.0, help="CPU tier per instance, GiB (0: none)")
    p.add_argument("--disk-gib", type=float, default=0.0, help="disk tier per instance, GiB (0: none)")
    p.add_argument(
        "--cpu-eviction",
        default="lru",
        choices=("lru", "s3fifo", "lfu", "all"),
        help="CPU tier eviction order ('all': one run per policy)",
    )
    p.add_argument("--admit-min-seen", type=int, default=2, help="disk admission: seen by >= N requests")
    p.add_argument("--instances", type=int, default=1)
    p.add_argument(
        "--routing",
        default="kv_load",
        choices=("kv_load", "round_robin", "least_loaded", "cache_aware"),
        help="kv_load (default): seconds the cached prefix saves minus --balance x queued seconds beyond --queue-slack",
    )
    p.add_argument(
        "--balance",
        type=float,
        default=DEFAULT_BALANCE,
        help=f"kv_load: weight of an instance's queued seconds against the seconds its prefix saves "
        f"(default {DEFAULT_BALANCE:g})",
    )
    p.add_argument(
        "--queue-slack",
        type=float,
        default=DEFAULT_SLACK_S,
        help=f"kv_load: seconds of queue beyond the shortest one that count as none (default {DEFAULT_SLACK_S:g})",
    )
    p.add_argument("--peers", action="store_true", help="instances pull missing prefixes from each other's CPU tier")
    p.add_argument("--peer-disk", action="store_true", help="peers also serve their disk tier")
    p.add_argument(
        "--link-gbps",
        type=float,
        default=None,
        metavar="GB/s",
        help="the peers' link between hosts, GB/s (10^9 bytes/s); overrides the calibrated or default value",
    )
    p.add_argument(
        "--link-latency-us",
        type=float,
        default=None,
        metavar="US",
        help="the latency of a pull over that link, microseconds (once per request that pulls)",
    )
    p.add_argument(
        "--hosts",
        type=int,
        default=None,
        metavar="N",
        help="the instances run on N hosts, instance i on host i %% N (default: one host each, so every pull "
        "crosses hosts); pulls from a peer on the same host take the same-host link",
    )
    p.add_argument(
        "--local-link-gbps",
        type=float,
        default=None,
        metavar="GB/s",
        help="the link between peers on the same host, GB/s (default: the link between hosts)",
    )
    p.add_argument(
        "--local-link-latency-us",
        type=float,
        default=None,
        metavar="US",
        help="the latency of a same-host pull, microseconds (default: the link between hosts')",
    )
    p.add_argument(
        "--planner",
        action="store_true",
        help="load or recompute each lower-tier chunk as the (calibrated) cost model says",
    )
    p.add_argument(
        "--write-through",
        action="store_true",
        help="store committed chunks in the CPU tier at once (PagedKVPool write_through)",
    )
    p.add_argument(
        "--deterministic-writeback",
        action="store_true",
        help="model the engine's deterministic_writeback mode (every wait for disk write-backs "
        "waits for all of them; the engine's hits are then reproduced exactly)",
    )
    wt = p.add_mutually_exclusive_group()
    wt.add_argument(
        "--disk-writeback-at-eviction",
        action="store_true",
        help="write admitted chunks to disk when the CPU tier evicts them (the engine's "
        "disk.write_through: false). Default: write-through, as the engine's default: admitted "
        "chunks reach the disk as they land in the CPU tier, so evictions free blocks without "
        "write-backs (off with --deterministic-writeback, as in the engine)",
    )
    wt.add_argument(
        "--disk-write-through",
        action="store_true",
        help="the default (accepted for older command lines; does nothing)",
    )
    p.add_argument(
        "--max-writebacks",
        type=int,
        default=64,
        metavar="N",
        help="the disk tier's write-back bound (the engine's disk_max_writebacks_in_flight, 64)",
    )
    p.add_argument(
        "--replay",
        default="timestamps",
        choices=("timestamps", "fast"),
        help="arrivals from the trace (queueing) or one request after another",
    )
    p.add_argument(
        "--calibrate",
        default=None,
        metavar="DIR",
        help="calibrate the cost model from kvtier bench JSON files in DIR (e.g. bench/results)",
    )
    p.add_argument(
        "--e2e",
        default=None,
        metavar="JSON",
        help="the bench_e2e run whose 4096-token recompute sets the GEMM rate (and, for a one-step-prefill "
        "run, whose 4096-token GPU hit sets a hit's fixed step cost). Default: the run in DIR with "
        "the newest 'date', on that date one of bench_e2e's default configuration (one-step prefill, "
        "vllm KV layout, copy method auto, write-back bound 64) before variants, then one whose "
        "loads overlap the step (load_compute_overlap), then one with repeated hits (reps_s), "
        "then the last file name",
    )
    p.add_argument("--gpu-tag", default="h200", help="file tag of the GPU copy bench to calibrate from")
    p.add_argument("--disk-tag", default="h200host", help="file tag of the GPU host's disk bench")
    p.add_argument("--no-ablation", action="store_true", help="skip the runs without disk / CPU / cache")
    p.add_argument(
        "--sweep",
        default=None,
        choices=("gpu", "cpu", "disk"),
        help="also sweep this tier's capacity (per policy) and plot hit ratio and TTFT",
    )
    p.add_argument("--sweep-gib", default="8,16,32,64,128", help="capacities of the sweep, GiB")
    p.add_argument(
        "--sweep-link",
        default=None,
        metavar="GB/s,...",
        help="also run with peers at each of these link speeds between hosts (GB/s), beside the same "
        "deployment without peers, and print where peers start to cut TTFT",
    )
    p.add_argument("--plot", default=None, metavar="PNG", help="write the sweep's plot here (needs matplotlib)")
    p.add_argument("--json", default=None, metavar="FILE", help="write all results as JSON")
    p.set_defaults(func=run)


def _gib(x: float, name: str) -> int:
    if x < 0:
        raise SystemExit(f"kvtier sim: --{name} must be >= 0, got {x}")
    return int(x * _GIB)


def _link_overrides(args: argparse.Namespace) -> dict:
    """HardwareCost fields the link flags set, validated (ValueError naming the flag)."""
    out = {}
    for flag, attr, scale, low in (
        ("link_gbps", "link_bw", 1e9, "positive"),
        ("link_latency_us", "link_latency_s", 1e-6, "non-negative"),
        ("local_link_gbps", "local_link_bw", 1e9, "positive"),
        ("local_link_latency_us", "local_link_latency_s", 1e-6, "non-negative"),
    ):
        v = getattr(args, flag)
        if v is None:
            continue
        if not math.isfinite(v) or v < 0 or (v == 0 and low == "positive"):
            raise ValueError(f"--{flag.replace('_', '-')} must be a {low} number, got {v}")
        out[attr] = v * scale
    return out


def _link_speeds(text: str) -> list[float]:
    """``--sweep-link`` "1,2,12.5" -> bytes/s (ValueError naming the flag)."""
    speeds = []
    for x in text.split(","):
        try:
            v = float(x)
        except ValueError:
            v = math.nan
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"--sweep-link takes positive link speeds in GB/s, separated by commas; got {x.strip()!r}")
        speeds.append(v * 1e9)
    return speeds


def run(args: argparse.Namespace) -> int:
    """Run `kvtier sim`; returns the exit status (2: bad trace, configuration or calibration)."""
    from kvtier.sim.engine import SimConfig, tier_ablation
    from kvtier.sim.report import (
        capacity_sweep,
        link_crossover,
        link_sweep,
        link_sweep_rows,
        link_sweep_table,
        plot_sweep,
        print_results,
        rich_print,
    )
    from kvtier.sim.trace import TraceError, trace_summary

    try:
        links = _link_overrides(args)
        speeds = _link_speeds(args.sweep_link) if args.sweep_link is not None else None
        if args.hosts is not None and not 1 <= args.hosts <= args.instances:
            raise ValueError(f"--hosts must be from 1 to --instances ({args.instances}), got {args.hosts}")
        reqs = _requests(args)
    except (TraceError, ValueError) as e:
        print(f"kvtier sim: {e}", file=sys.stderr)
        return 2
    hw = HardwareCost()
    model = MODEL_PRESETS[args.model]
    if args.calibrate:
        if not os.path.isdir(args.calibrate):
            print(
                f"kvtier sim: --calibrate {args.calibrate}: no such directory (kvtier's bench results are in "
                f"bench/results of a clone of its repository, not in the installed package)",
                file=sys.stderr,
            )
            return 2
        try:
            hw = Calibration(args.calibrate).hardware(
                gpu_tag=args.gpu_tag,
                disk_tag=args.disk_tag,
                model=model,
                e2e_file=args.e2e or _latest_e2e(args.calibrate),
            )
        except (FileNotFoundError, ValueError) as e:
            print(f"kvtier sim: calibration failed: {e}", file=sys.stderr)
            return 2
    if links:  # the command line outranks the calibration
        flags = {
            "link_bw": "--link-gbps",
            "link_latency_s": "--link-latency-us",
            "local_link_bw": "--local-link-gbps",
            "local_link_latency_s": "--local-link-latency-us",
        }
        hw = replace(hw, **links, sources={**hw.sources, **{k: f"{flags[k]} (command line)" for k in links}})
    try:
        cfg = SimConfig(
            model=model,
            chunk_tokens=args.chunk_tokens,
            page_tokens=args.page_tokens,
            gpu_bytes=_gib(args.gpu_gib, "gpu-gib"),
            cpu_bytes=_gib(args.cpu_gib, "cpu-gib"),
            disk_bytes=_gib(args.disk_gib, "disk-gib"),
            cpu_eviction="lru" if args.cpu_eviction == "all" else args.cpu_eviction,
            disk_admit_min_seen=args.admit_min_seen,
            instances=args.instances,
            routing=args.routing,
            routing_balance=args.balance,
            routing_slack_s=args.queue_slack,
            peers=args.peers,
            peer_disk=args.peer_disk,
            hosts=args.hosts,
            write_through=args.write_through,
            deterministic_writeback=args.deterministic_writeback,
            disk_write_through=not args.disk_writeback_at_eviction,
            hardware=hw,
            replay=args.replay,
            max_demotions_in_flight=args.max_writebacks,
            planner=CalibratedPlanner(hw, model) if args.planner else None,
        )
        if reqs is None:  # hot_prefix: its rate follows the cluster's capacity
            from kvtier.sim.hot_prefix import hot_prefix_at_load

            n = _generated_count(args.trace, "hot_prefix", HOT_PREFIX_REQUESTS)
            if args.limit is not None:
                n = min(n, args.limit)
            reqs = hot_prefix_at_load(n, args.load, cfg, seed=args.seed or 0)
    except ValueError as e:
        print(f"kvtier sim: {e}", file=sys.stderr)
        return 2
    s = trace_summary(reqs)
    print(
        f"trace: {s['requests']} requests, {s['chunks']} chunks of {args.chunk_tokens} tokens "
        f"({s['distinct_chunks']} distinct), {s['span_s']:.0f} s; model {model.name}, "
        f"{cfg.chunk_bytes / (1 << 20):.1f} MiB a chunk; per instance: "
        f"GPU {cfg.gpu_pages // (cfg.chunk_tokens // cfg.page_tokens)}"
        f" chunks, CPU {cfg.cpu_chunks}, disk {cfg.disk_slots}"
        + (_disk_writes(cfg) if cfg.disk_slots else "")
        + f"; {cfg.instances} instance(s), {cfg.routing}"
    )
    if hw.sources:
        print("cost model calibrated from: " + "; ".join(f"{k} <- {v}" for k, v in hw.sources.items()))
    v = hw.values()
    after = v.get("attention_after_prefix_tflops")
    print(
        f"cost model: weights {v['weights_tflops']} TFLOP/s, attention {v['attention_tflops']} TFLOP/s"
        + (
            " (after a cached prefix: " + ", ".join(f"{r} at {t} new tokens" for t, r in after.items()) + ")"
            if after
            else ""
        )
        + f"; a hit's step {v['hit_forward_ms']} ms"
        + (" (the longer of it and the GEMMs, plus attention)" if v["hit_step_overlaps"] else "")
        + f"; CPU->GPU {v['h2d_gbps']} GB/s{' (beside the step)' if v['load_compute_overlap'] else ''}, "
        f"GPU->CPU {v['d2h_gbps']} GB/s; disk read {v['disk_read_gbps']} / write {v['disk_write_gbps']} GB/s; "
        f"peer link {v['link_gbps']} GB/s"
        + (f" + {hw.link_latency_s * 1e6:g} us" if args.peers or speeds else "")
        + (
            f"; {cfg.hosts} hosts, same-host link {hw.same_host_link()[0] / 1e9:g} GB/s + "
            f"{hw.same_host_link()[1] * 1e6:g} us"
            if cfg.hosts is not None and cfg.hosts < cfg.instances
            else ""
        )
    )
    policies = ("lru", "s3fifo", "lfu") if args.cpu_eviction == "all" else (cfg.cpu_eviction,)
    results = {}
    for pol in policies:
        c = replace(cfg, cpu_eviction=pol)
        if args.no_ablation:
            from kvtier.sim.engine import Simulator

            runs = {"all tiers": Simulator(c).run(reqs)}
        else:
            runs = tier_ablation(reqs, c)
        for name, r in runs.items():
            results[f"{pol}: {name}" if len(policies) > 1 else name] = r
    title = f"kvtier sim ({args.replay} replay" + (f", CPU tier {policies[0]})" if len(policies) == 1 else ")")
    print_results(results, title=title)
    wall = sum(r.wall_s for r in results.values())
    print(f"simulated {len(results)} run(s) of {len(reqs)} requests in {wall:.2f} s")
    out = {
        "trace": args.trace,
        "summary": s,
        "calibration": hw.sources,
        "cost_model": hw.values(),
        "runs": {k: v.to_dict() for k, v in results.items()},
    }
    if _synthetic_count(args.trace) or _generated_count(args.trace, "hot_prefix", HOT_PREFIX_REQUESTS):
        out["seed"] = args.seed or 0
    if _generated_count(args.trace, "hot_prefix", HOT_PREFIX_REQUESTS):
        out["load"] = args.load
    if args.sweep:
        sizes = [int(float(x) * _GIB) for x in args.sweep_gib.split(",") if x.strip()]
        sweep = capacity_sweep(reqs, cfg, args.sweep, sizes, policies=("lru", "s3fifo", "lfu"))
        out["sweep"] = {
            "tier": args.sweep,
            "runs": {pol: [(sz, _brief(r)) for sz, r in rows] for pol, rows in sweep.items()},
        }
        print_results(
            {f"{pol} {args.sweep}={sz / _GIB:g} GiB": r for pol, rows in sweep.items() for sz, r in rows},
            title=f"{args.sweep.upper()} capacity sweep",
            traffic=False,
        )
        if args.plot:
            try:
                plot_sweep(sweep, args.sweep, args.plot, title=f"{os.path.basename(args.trace)}: {args.sweep} sweep")
            except RuntimeError as e:
                print(f"kvtier sim: {e}", file=sys.stderr)
                return 2
            print(f"wrote {args.plot}")
    if speeds:
        baseline, rows = link_sweep(reqs, cfg, speeds)
        rich_print(link_sweep_table(baseline, rows, title=f"peer link sweep ({cfg.instances} instances, {model.name})"))
        cross = link_crossover(baseline, rows)
        print(
            "peers' median TTFT beats no peers "
            + (f"from {cross / 1e9:g} GB/s on (the slowest such link of the sweep)" if cross else "at no link swept")
        )
        out["link_sweep"] = {
            "hosts": cfg.instances if cfg.hosts is None else cfg.hosts,
            "rows": link_sweep_rows(baseline, rows),
            "crossover_gbps_p50": cross / 1e9 if cross else None,
        }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
        print(f"wrote {args.json}")
    return 0


def _disk_writes(cfg) -> str:
    """How admitted chunks reach the disk in ``cfg``'s runs, as the engine would write them."""
    if cfg.disk_write_through and not cfg.deterministic_writeback:
        return " (write-through)"
    return " (write-back at eviction)"


def _synthetic_count(trace: str) -> int | None:
    """N for ``synthetic[:N]``, None for a file name; ValueError for a bad N."""
    return _generated_count(trace, "synthetic", SYNTHETIC_REQUESTS)


def _generated_count(trace: str, generator: str, default: int) -> int | None:
    """N for ``<generator>[:N]``, None for anything else; ValueError for a bad N."""
    name, sep, count = trace.partition(":")
    if name != generator:
        return None
    if not sep:
        return default
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"--trace {generator}:N needs N, a positive number of requests, got {count!r}")
    return int(count)


def _requests(args: argparse.Namespace) -> list:
    """The requests of ``--trace``: the built-in generator's or a file's."""
    from kvtier.sim.mooncake_synthetic import MooncakeSynthetic, synthetic_requests
    from kvtier.sim.trace import load_trace

    if _generated_count(args.trace, "hot_prefix", HOT_PREFIX_REQUESTS):
        if args.format == "tokens":
            raise ValueError("--trace hot_prefix is generated, not read with --format tokens")
        if not (args.load > 0 and args.load < float("inf")):
            raise ValueError(f"--load must be a positive fraction of capacity, got {args.load!r}")
        return None  # generated once the cluster (its capacity) is known
    n = _synthetic_count(args.trace)
    if n is None:
        if args.seed is not None:
            raise ValueError(f"--seed applies to --trace synthetic only, not to the file {args.trace!r}")
        return load_trace(
            args.trace,
            chunk_tokens=args.chunk_tokens,
            block_tokens=args.block_tokens,
            fmt=args.format,
            limit=args.limit,
        )
    if args.format == "tokens":
        raise ValueError("--trace synthetic is in Mooncake's format, not --format tokens")
    if args.limit is not None:
        n = min(n, args.limit)
    return synthetic_requests(
        n, seed=args.seed or 0, chunk_tokens=args.chunk_tokens, config=MooncakeSynthetic(block_tokens=args.block_tokens)
    )


def _brief(r) -> dict:
    d = r.to_dict()
    d.pop("tiers")  # per-instance counters: in the main runs only
    return d


def _latest_e2e(bench_dir: str) -> str | None:
    """The bench_e2e run ``--e2e`` defaults to, chosen by what each result document records
    rather than by its file name, in this order:

    1. the newest ``date``;
    2. a run of bench_e2e's default configuration before variants: one-step prefill, ``kv_layout``
       vllm, ``method`` auto, the disk's write-back bound 64 (the engine as it ships), without
       torch's experimental ``TORCH_CUDNN_SDPA_AVOID_RECOMPILE`` (``torch_cudnn_sdpa_avoid_recompile``);
    3. the newer engine and bench, key by key: loads that overlap the step
       (``load_compute_overlap``), then hits that are the median of several requests
       (``reps_s``), then attention split after a cached prefix (``attention_split_min_queries``),
       then a warm-up whose off-bucket length ran in a scratch pool (``warm_off_bucket`` is
       ``"scratch_pool"``);
    4. the file name.

    Tiny-model runs are never chosen; None when ``bench_dir`` has no other bench_e2e run."""
    import glob

    from kvtier.sim.cost import one_step_prefill
    from kvtier.sim.validate import hit_reps

    best, best_key = None, None
    for f in sorted(glob.glob(os.path.join(bench_dir, "bench_e2e-*.json"))):
        try:
            with open(f) as fh:
                doc = json.load(fh)
        except (OSError, ValueError):
            continue
        if "tiny" in os.path.basename(f) or doc.get("workload", "").startswith("tiny"):
            continue
        default = (
            one_step_prefill(doc)
            and doc.get("kv_layout") == "vllm"
            and doc.get("method", "auto") == "auto"
            and int(doc.get("disk_max_writebacks_in_flight", 64)) == 64
            and not doc.get("torch_cudnn_sdpa_avoid_recompile")
        )
        newer = (
            bool(doc.get("load_compute_overlap")),
            hit_reps(doc) > 1 if "results" in doc else False,
            "attention_split_min_queries" in doc,
            doc.get("warm_off_bucket") == "scratch_pool",
        )
        key = (str(doc.get("date", "")), default, newer, os.path.basename(f))
        if best_key is None or key > best_key:
            best, best_key = f, key
    return best
