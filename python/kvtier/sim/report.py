"""Simulation outputs: a terminal table (rich), capacity sweeps, and PNG plots (matplotlib,
optional: imported only when a plot is asked for)."""

from __future__ import annotations

from dataclasses import replace

from kvtier.sim.engine import SimConfig, SimResult, Simulator
from kvtier.sim.trace import Request

__all__ = [
    "capacity_sweep",
    "human_bytes",
    "link_crossover",
    "link_sweep",
    "link_sweep_rows",
    "link_sweep_table",
    "plot_sweep",
    "print_results",
    "results_table",
    "rich_print",
    "traffic_table",
]


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def results_table(results: dict[str, SimResult], title: str = "kvtier sim"):
    """A rich Table: one row per named result -- hit ratio per tier and TTFT percentiles."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("run", "gpu", "cpu", "disk", "peer", "total", "TTFT p50", "p90", "p99"):
        t.add_column(col, justify="left" if col == "run" else "right", no_wrap=True)
    for name, r in results.items():
        p = r.ttft_percentiles()
        t.add_row(
            name,
            *(f"{r.hit_ratio(x):.3f}" for x in ("gpu", "cpu", "disk", "peer")),
            f"{r.hit_ratio():.3f}",
            *(_secs(p[q]) for q in ("p50", "p90", "p99")),
        )
    return t


def traffic_table(results: dict[str, SimResult], title: str = "bytes moved"):
    """A rich Table: bytes per path and SSD write volume, one row per named result."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("run", "GPU->CPU", "CPU->GPU", "disk->CPU", "CPU->disk", "peer->CPU", "SSD writes"):
        t.add_column(col, justify="left" if col == "run" else "right", no_wrap=True)
    for name, r in results.items():
        b = r.bytes
        t.add_row(
            name,
            *(
                human_bytes(b.get(k, 0))
                for k in ("gpu_to_cpu", "cpu_to_gpu", "disk_to_cpu", "cpu_to_disk", "peer_to_cpu")
            ),
            human_bytes(r.ssd_write_bytes),
        )
    return t


def _secs(x: float) -> str:
    return f"{x * 1e3:.0f} ms" if x < 1 else f"{x:.2f} s"


def rich_print(renderable, console=None) -> None:
    """Print a rich table, 160 columns wide when the output is not a terminal."""
    from rich.console import Console

    if console is None:
        console = Console()
        if not console.is_terminal:  # a pipe or a file: don't squeeze the table into 80 columns
            console = Console(width=160)
    console.print(renderable)


def print_results(results: dict[str, SimResult], title: str = "kvtier sim", console=None, traffic: bool = True) -> None:
    """Print the hit-ratio / TTFT table and, with ``traffic``, the bytes-moved table."""
    rich_print(results_table(results, title), console)
    if traffic:
        rich_print(traffic_table(results), console)


def capacity_sweep(
    requests: list[Request], cfg: SimConfig, tier: str, sizes: list[int], policies=("lru", "s3fifo", "lfu")
) -> dict[str, list[tuple[int, SimResult]]]:
    """Run ``cfg`` with ``tier`` ("gpu", "cpu" or "disk") at each of ``sizes`` (bytes), per CPU
    eviction policy. Returns {policy: [(size, result), ...]}."""
    if tier not in ("gpu", "cpu", "disk"):
        raise ValueError(f"tier must be 'gpu', 'cpu' or 'disk', got {tier!r}")
    out: dict[str, list[tuple[int, SimResult]]] = {}
    for pol in policies:
        rows = []
        for size in sizes:
            c = replace(cfg, cpu_eviction=pol, **{f"{tier}_bytes": int(size)})
            rows.append((int(size), Simulator(c).run(requests)))
        out[pol] = rows
    return out


def link_sweep(
    requests: list[Request], cfg: SimConfig, link_bws: list[float]
) -> tuple[SimResult, list[tuple[float, SimResult]]]:
    """Peers on at each cross-host link bandwidth of ``link_bws`` (bytes/s), against the same
    deployment with peers off (its baseline, run once: without peers no link is used).

    Same-host pulls (``cfg.hosts``) keep ``cfg.hardware``'s same-host link, which follows the
    swept link unless ``local_link_bw`` is set. A :class:`kvtier.sim.cost.CalibratedPlanner`
    is rebuilt per speed, so that it weighs each link's pulls; another planner is kept as is.
    Returns ``(peers_off, [(link_bw, peers_on), ...])``."""
    from kvtier.sim.cost import CalibratedPlanner

    def with_hw(hw) -> SimConfig:
        planner = cfg.planner
        if isinstance(planner, CalibratedPlanner):
            planner = CalibratedPlanner(hw, planner.model)
        return replace(cfg, hardware=hw, planner=planner)

    baseline = Simulator(replace(with_hw(cfg.hardware), peers=False)).run(requests)
    rows = []
    for bw in link_bws:
        if not bw > 0:
            raise ValueError(f"a link bandwidth must be > 0 bytes/s, got {bw!r}")
        c = replace(with_hw(replace(cfg.hardware, link_bw=float(bw))), peers=True)
        rows.append((float(bw), Simulator(c).run(requests)))
    return baseline, rows


def link_crossover(baseline: SimResult, rows: list[tuple[float, SimResult]], q: str = "p50") -> float | None:
    """The slowest link of ``rows`` from which on peers' TTFT ``q`` beats ``baseline``'s at every
    faster link of the sweep too (None: not at the fastest)."""
    base = baseline.ttft_percentiles()[q]
    best = None
    for bw, r in sorted(rows, key=lambda x: x[0], reverse=True):
        if r.ttft_percentiles()[q] >= base:
            break
        best = bw
    return best


def link_sweep_rows(baseline: SimResult, rows: list[tuple[float, SimResult]]) -> list[dict]:
    """One plain dict a link speed: peers' and the baseline's hit ratio and TTFT p50 / p90 (s),
    and each TTFT's ratio ``baseline / peers`` (above 1: peers ahead)."""
    b = baseline.ttft_percentiles()
    out = []
    for bw, r in rows:
        p = r.ttft_percentiles()
        out.append(
            {
                "link_gbps": bw / 1e9,
                "hit_ratio": r.hit_ratio(),
                "peer_hit_ratio": r.hit_ratio("peer"),
                "ttft_p50_s": p["p50"],
                "ttft_p90_s": p["p90"],
                "baseline_hit_ratio": baseline.hit_ratio(),
                "baseline_ttft_p50_s": b["p50"],
                "baseline_ttft_p90_s": b["p90"],
                "ratio_p50": b["p50"] / p["p50"] if p["p50"] else None,
                "ratio_p90": b["p90"] / p["p90"] if p["p90"] else None,
            }
        )
    return out


def link_sweep_table(baseline: SimResult, rows: list[tuple[float, SimResult]], title: str = "peer link sweep"):
    """A rich Table of :func:`link_sweep`: each link speed with peers, the baseline (peers off)
    beside it, and the ratios (baseline / peers: above 1, peers cut TTFT)."""
    from rich.table import Table

    t = Table(title=title)
    cols = ("link GB/s", "hit", "TTFT p50", "p90", "peers off: hit", "p50", "p90", "ratio p50", "ratio p90")
    for col in cols:
        t.add_column(col, justify="right", no_wrap=True)
    for d in link_sweep_rows(baseline, rows):
        t.add_row(
            f"{d['link_gbps']:g}",
            f"{d['hit_ratio']:.3f}",
            _secs(d["ttft_p50_s"]),
            _secs(d["ttft_p90_s"]),
            f"{d['baseline_hit_ratio']:.3f}",
            _secs(d["baseline_ttft_p50_s"]),
            _secs(d["baseline_ttft_p90_s"]),
            f"{d['ratio_p50']:.2f}",
            f"{d['ratio_p90']:.2f}",
        )
    return t


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError(
            "plotting needs matplotlib, which is not installed: pip install matplotlib (or run without --plot)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(sweep: dict[str, list[tuple[int, SimResult]]], tier: str, path: str, *, title: str = "") -> None:
    """Two panels against the tier's capacity: hit ratio (total and of the tier), TTFT p50/p99."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for pol, rows in sweep.items():
        xs = [s / (1 << 30) for s, _ in rows]
        (line,) = ax1.plot(xs, [r.hit_ratio() for _, r in rows], marker="o", label=f"{pol}: all tiers")
        ax1.plot(
            xs,
            [r.hit_ratio(tier) for _, r in rows],
            marker="x",
            linestyle="--",
            color=line.get_color(),
            label=f"{pol}: {tier} tier",
        )
        p = [r.ttft_percentiles() for _, r in rows]
        ax2.plot(xs, [q["p50"] for q in p], marker="o", color=line.get_color(), label=f"{pol}: p50")
        ax2.plot(xs, [q["p99"] for q in p], marker="x", linestyle="--", color=line.get_color(), label=f"{pol}: p99")
    ax1.set_xlabel(f"{tier.upper()} capacity per instance (GiB)")
    ax1.set_ylabel("hit ratio (chunks)")
    ax1.grid(True, alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.set_xlabel(f"{tier.upper()} capacity per instance (GiB)")
    ax2.set_ylabel("time to first token (s)")
    ax2.set_yscale("log")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
