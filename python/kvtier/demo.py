"""`kvtier demo`: time to first token of one prompt served four ways — a miss (full recompute)
and hits of its long shared prefix from GPU pages, the CPU tier and the disk tier — on a small
randomly initialised Llama built locally (no download), with identical generated tokens.

The prompt is a long "system prompt" plus a short question. Between cases the demo pushes the
prefix down one tier with filler requests (their pages are taken, their KV is never read): first
out of the GPU pool (offloaded to the CPU tier), then out of the CPU tier (written back to disk).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time

__all__ = ["add_demo_parser", "main", "run_demo"]

# Sized so that recompute clearly costs more than loading, and the whole demo stays well under a
# minute on a 2-core CPU or one GPU.
PRESETS = {
    "cpu": {
        "vocab": 8192,
        "hidden": 512,
        "layers": 8,
        "heads": 8,
        "kv_heads": 2,
        "intermediate": 1408,
        "prefix_tokens": 2048,
    },
    "cuda": {
        "vocab": 32000,
        "hidden": 1024,
        "layers": 16,
        "heads": 16,
        "kv_heads": 4,
        "intermediate": 2816,
        "prefix_tokens": 8192,
    },
}
CASES = (("miss", "miss: recompute"), ("gpu", "hit: GPU pages"), ("cpu", "hit: CPU tier"), ("disk", "hit: disk tier"))
_TO_CPU, _TO_DISK = "push the prefix out of the GPU pool", "push the prefix out of the CPU tier"
_NEEDS_TORCH = (
    "kvtier demo needs PyTorch: pip install torch==2.13.0 "
    "(or the build for this machine's CUDA: https://pytorch.org/get-started/locally/)"
)
_DESCRIPTION = (
    "Time to first token of one prompt served four ways: a miss (full recompute), and hits of its "
    "long shared prefix from GPU pages, the CPU tier and the disk tier, on a small random Llama "
    "built locally (no download). The generated tokens must be identical in all four."
)


def run_demo(
    *,
    device: str | None = None,
    prefix_tokens: int | None = None,
    question_tokens: int = 64,
    new_tokens: int = 16,
    vocab: int | None = None,
    hidden: int | None = None,
    layers: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    page_tokens: int = 16,
    chunk_tokens: int = 256,
    disk_dir: str | None = None,
    seed: int = 0,
    threads: int | None = 1,
    progress: bool = False,
) -> dict:
    """Run the four cases and return what they measured (the ``--json`` output).

    ``None`` arguments take the preset of the device (``PRESETS``); ``device`` None means cuda
    if torch sees one, else cpu. ``disk_dir`` None: a temporary directory, removed at the end.
    ``threads``: torch's CPU threads while the demo runs (restored after; None: torch's default).
    One by default: with two on a 2-core machine that has any other load, OpenMP's barriers
    spin and every TTFT swings up to tenfold (docs/architecture.md, "Measurements behind the
    design").
    Returns a dict with ``cases`` (per case: ``ttft_s``, ``gpu_hit_tokens``, ``cpu_hit_tokens``,
    ``disk_hit_tokens``, ``computed_tokens``, ``tokens``, ``identical``), ``identical_tokens``
    and the settings.
    """
    import torch

    from kvtier.errors import InvalidArgumentError
    from kvtier.examples.paged_llama import Engine, Llama, LlamaConfig, reference_generate

    t_start = time.perf_counter()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = PRESETS["cuda" if device.startswith("cuda") else "cpu"]
    given = {
        "vocab": vocab,
        "hidden": hidden,
        "layers": layers,
        "heads": heads,
        "kv_heads": kv_heads,
        "intermediate": intermediate,
        "prefix_tokens": prefix_tokens,
    }
    s = {k: preset[k] if v is None else v for k, v in given.items()}
    prefix_tokens = s.pop("prefix_tokens")
    config = LlamaConfig(**s)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    n_prompt = prefix_tokens + question_tokens
    if prefix_tokens < chunk_tokens or question_tokens <= 0 or new_tokens <= 0:
        raise InvalidArgumentError(
            f"prefix_tokens={prefix_tokens} must hold a chunk ({chunk_tokens} tokens); question_tokens="
            f"{question_tokens} and new_tokens={new_tokens} must be positive"
        )

    stages = ["build the model", "warm up", CASES[0][1], CASES[1][1], _TO_CPU, CASES[2][1], _TO_DISK, CASES[3][1]]
    with contextlib.ExitStack() as cleanup, _progress(len(stages), enabled=progress) as stage:
        if threads is not None:
            cleanup.callback(torch.set_num_threads, torch.get_num_threads())
            torch.set_num_threads(threads)
        if device.startswith("cuda"):
            # Some of torch's GPU kernels reduce in a varying order: the same bf16 forward can
            # give other greedy tokens from run to run, with or without kvtier, while the restored
            # KV is bit-identical. Deterministic kernels make the comparison fair.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
            cleanup.callback(torch.use_deterministic_algorithms, torch.are_deterministic_algorithms_enabled())
            torch.use_deterministic_algorithms(True)
        stage(stages[0])
        model = Llama(config, seed=seed, dtype=dtype, device=device)
        params = sum(p.numel() for p in model.parameters())

        # The pool holds one request (prompt + new tokens) and a chunk to spare; the CPU tier as
        # many chunks as the pool, so one pool-sized filler pushes every older chunk to disk.
        pool_chunks = math.ceil((n_prompt + new_tokens) / chunk_tokens) + 1
        elem = torch.tensor([], dtype=dtype).element_size()
        chunk_bytes = config.layers * 2 * chunk_tokens * config.kv_heads * config.head_dim * elem
        block_bytes = -(-chunk_bytes // 4096) * 4096  # CPU-tier blocks are 4 KiB aligned (O_DIRECT)
        cpu_bytes = pool_chunks * block_bytes
        temporary = disk_dir is None
        pool, disk_dir = _make_pool(
            cleanup,
            disk_dir,
            {
                **model.kv_geometry(),
                "num_pages": pool_chunks * chunk_tokens // page_tokens,
                "page_tokens": page_tokens,
                "chunk_tokens": chunk_tokens,
                "cpu_bytes": cpu_bytes,
                # disk: the prefix and a filler's worth, each chunk in a slot with a 4 KiB header
                "disk_bytes": (2 * pool_chunks + 2) * (block_bytes + 4096) + (1 << 20),
                "disk_admit_min_seen": 1,  # write back at first eviction: one run reaches every tier
                "model_id": f"kvtier-demo-{seed}",
            },
        )
        cleanup.callback(pool.close)
        engine = Engine(model, pool)

        gen = torch.Generator().manual_seed(seed + 1)
        system = torch.randint(0, config.vocab, (prefix_tokens,), generator=gen).tolist()
        question = torch.randint(0, config.vocab, (question_tokens,), generator=gen).tolist()
        prompt = system + question

        stage(stages[1])  # first calls of each kernel; no pool, nothing cached
        # On a GPU the first calls of each shape may pick other kernels than later ones (and give
        # other bf16 tokens than the hits): warm up at the prompt's length.
        warm_len = len(prompt) if device != "cpu" else chunk_tokens + 8
        warm = torch.randint(0, config.vocab, (warm_len,), generator=gen).tolist()
        reference_generate(model, warm, 2, prefill_tokens=engine.prefill_tokens)

        cases = []
        for name, label in CASES:
            if name == "cpu":
                stage(_TO_CPU)
                _push_out_of_gpu(pool, gen, config.vocab)
            elif name == "disk":
                stage(_TO_DISK)
                _push_out_of_cpu(pool, gen, config.vocab)
            stage(label)
            _sync(device)
            promoted = _disk_promoted(pool)
            (g,) = engine.generate([prompt], new_tokens)
            disk_hit = (_disk_promoted(pool) - promoted) * chunk_tokens
            cases.append(
                {
                    "case": name,
                    "ttft_s": g.ttft_s,
                    "gpu_hit_tokens": g.gpu_hit_tokens,
                    "cpu_hit_tokens": g.lower_hit_tokens - disk_hit,
                    "disk_hit_tokens": disk_hit,
                    "computed_tokens": n_prompt - g.cached_tokens,
                    "tokens": g.tokens,
                }
            )
        lower = pool.stats()["lower"]
        stage("done")

    miss = cases[0]
    for c in cases:
        c["speedup"] = miss["ttft_s"] / c["ttft_s"]
        c["identical"] = c["tokens"] == miss["tokens"]
    return {
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "model": {
            "vocab": config.vocab,
            "hidden": config.hidden,
            "layers": config.layers,
            "heads": config.heads,
            "kv_heads": config.kv_heads,
            "intermediate": config.intermediate,
            "params": params,
        },
        "prefix_tokens": prefix_tokens,
        "question_tokens": question_tokens,
        "new_tokens": new_tokens,
        "page_tokens": page_tokens,
        "chunk_tokens": chunk_tokens,
        "kv_bytes_per_token": chunk_bytes // chunk_tokens,
        "prefix_kv_bytes": prefix_tokens // chunk_tokens * chunk_bytes,
        "disk_dir": disk_dir,
        "disk_dir_removed": temporary,
        "disk_backend": lower["disk"]["backend"],
        "cpu_tier_pinned": lower["pinned"],
        "copy_method": lower["method"],
        "cases": cases,
        "identical_tokens": all(c["identical"] for c in cases),
        "wall_s": time.perf_counter() - t_start,
    }


def _make_pool(cleanup: contextlib.ExitStack, disk_dir: str | None, kwargs: dict):
    """A PagedKVPool with CPU and disk tiers. Without ``disk_dir``: a temporary directory in the
    system's temp folder, or under ~/.cache where that one refuses O_DIRECT (tmpfs before Linux 6.6)."""
    from kvtier.errors import InvalidArgumentError
    from kvtier.pool import PagedKVPool

    if disk_dir is not None:
        return PagedKVPool(**kwargs, disk_dir=disk_dir), disk_dir
    parents = [None, os.path.join(os.path.expanduser("~"), ".cache")]
    for i, parent in enumerate(parents):
        if parent is not None:
            os.makedirs(parent, exist_ok=True)
        tmp = tempfile.TemporaryDirectory(prefix="kvtier-demo-", dir=parent)
        try:
            pool = PagedKVPool(**kwargs, disk_dir=tmp.name)
        except InvalidArgumentError as e:
            tmp.cleanup()
            if "O_DIRECT" not in str(e) or i == len(parents) - 1:
                raise
            continue
        cleanup.callback(tmp.cleanup)
        return pool, tmp.name
    raise AssertionError("unreachable")


def _filler(gen, vocab: int, n: int) -> list[int]:
    import torch

    return torch.randint(0, vocab, (n,), generator=gen).tolist()


def _push_out_of_gpu(pool, gen, vocab: int) -> None:
    """A request as large as the pool takes every page: the pool evicts every cached chunk,
    offloading to the CPU tier those it lacks. Never committed, so its pages are just freed."""
    seq = pool.begin(_filler(gen, vocab, pool.num_pages * pool.page_tokens))
    pool.release(seq)


def _push_out_of_cpu(pool, gen, vocab: int) -> None:
    """Store as many filler chunks as the CPU tier holds (from the pages of a pool-sized filler
    request, which also empties the GPU pool): once its free blocks are used, the tier evicts
    its older chunks, the prefix among them, writing them back to disk; wait for those writes."""
    tokens = _filler(gen, vocab, pool.num_pages * pool.page_tokens)
    seq = pool.begin(tokens)
    try:
        pool.cache.store(tokens, seq.page_table).wait()
        pool.cache.drain()
    finally:
        pool.release(seq)


def _disk_promoted(pool) -> int:
    return pool.stats()["lower"]["disk"]["chunks_promoted"]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


@contextlib.contextmanager
def _progress(total: int, *, enabled: bool):
    """A rich progress bar over the demo's stages. Yields ``stage(description)``, to call as each
    stage starts, and with "done" at the end; a no-op when disabled or without rich."""
    try:
        if not enabled:
            raise ImportError
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )
    except ImportError:
        yield lambda description: None
        return
    columns = (TextColumn("{task.description:<38}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as bar:
        task = bar.add_task("", total=total)
        started = False

        def stage(description: str) -> None:
            nonlocal started
            if started:
                bar.advance(task)
            started = True
            bar.update(task, description=description)

        yield stage


_COLUMNS = ("case", "GPU", "CPU", "disk", "computed", "TTFT", "speedup", "tokens")
_TITLE = "Time to first token (TTFT), same prompt"
_CAPTION = "GPU, CPU, disk: prompt tokens whose KV came from that tier"


def _row(c: dict) -> list[str]:
    hits = [str(c[k]) for k in ("gpu_hit_tokens", "cpu_hit_tokens", "disk_hit_tokens", "computed_tokens")]
    return [
        dict(CASES)[c["case"]],
        *hits,
        f"{c['ttft_s'] * 1e3:.0f} ms",
        f"{c['speedup']:.1f}x",
        "= miss" if c["identical"] else "DIFFERENT",
    ]


def format_report(r: dict) -> str:
    """The result as plain text (printed where rich is not installed)."""
    widths = (16, 6, 6, 6, 9, 9, 8, 9)

    def line(cells) -> str:
        return "".join(f"{x:<{w}}" if i in (0, 7) else f"{x:>{w - 1}} " for i, (x, w) in enumerate(zip(cells, widths)))

    body = [line(_COLUMNS)] + [line(_row(c)) for c in r["cases"]]
    return "\n".join([_headline(r), "", _TITLE, *body, _CAPTION, "", _footer(r)])


def print_report(r: dict) -> None:
    """The result as a rich table (plain text without rich)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(format_report(r))
        return
    console = Console()
    console.print(_headline(r), highlight=False)
    table = Table(title=_TITLE, caption=_CAPTION, title_justify="left", caption_justify="left")
    for name in _COLUMNS:
        table.add_column(name, justify="left" if name in ("case", "tokens") else "right")
    for c in r["cases"]:
        cells = _row(c)
        cells[-1] = f"[green]{cells[-1]}[/green]" if c["identical"] else f"[bold red]{cells[-1]}[/bold red]"
        table.add_row(*cells)
    console.print(table)
    console.print(_footer(r), highlight=False)


def _headline(r: dict) -> str:
    m = r["model"]
    where = "" if r["device"].startswith("cuda") else '\n(no GPU here: the pool\'s "GPU" pages are in host memory)'
    kv_mib = r["prefix_kv_bytes"] / 2**20
    return (
        f"Random Llama, {m['params'] / 1e6:.0f}M params ({m['layers']} layers, hidden {m['hidden']}, "
        f"{m['heads']}/{m['kv_heads']} heads), {r['dtype']} on {r['device']}.{where}\n"
        f"Prompt: {r['prefix_tokens']}-token shared prefix ({kv_mib:.1f} MiB of KV) + "
        f"{r['question_tokens']}-token question.\nDisk tier: {r['disk_backend']}, {r['disk_dir']}"
        + (" (temporary)" if r["disk_dir_removed"] else "")
    )


def _footer(r: dict) -> str:
    same = "identical in all four cases" if r["identical_tokens"] else "NOT identical: a bug"
    toks = r["cases"][0]["tokens"]
    shown = ", ".join(map(str, toks[:4])) + (", ..." if len(toks) > 4 else "")
    return f"Generated {len(toks)} tokens [{shown}], {same}.\nDemo wall time: {r['wall_s']:.1f} s."


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    p.add_argument(
        "--prefix-tokens", type=int, default=None, help="shared prefix length (default: 2048 on cpu, 8192 on cuda)"
    )
    p.add_argument("--question-tokens", type=int, default=64, help="tokens after the shared prefix")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per case")
    for flag in ("vocab", "hidden", "layers", "heads", "kv-heads", "intermediate"):
        p.add_argument(f"--{flag}", type=int, default=None, help="model shape (default: the device's preset)")
    p.add_argument("--page-tokens", type=int, default=16)
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--disk-dir", default=None, help="directory for the disk tier (default: a temporary one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: steadier timings on a small, shared machine)",
    )
    p.add_argument("--json", action="store_true", help="print the measurements as JSON, no progress bar")


def _cmd_demo(args: argparse.Namespace) -> int:
    try:
        import torch  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
        print(_NEEDS_TORCH, file=sys.stderr)
        return 2
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "func", "command")}
    result = run_demo(**settings, progress=not args.json)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result)
    return 0 if result["identical_tokens"] else 1


def add_demo_parser(subparsers) -> None:
    """Register ``kvtier demo`` on the ``kvtier`` command's subparsers."""
    p = subparsers.add_parser(
        "demo", help="time to first token: a miss vs prefix hits from GPU, CPU, disk", description=_DESCRIPTION
    )
    _add_arguments(p)
    p.set_defaults(func=_cmd_demo)


def main(argv: list[str] | None = None) -> int:
    """``python -m kvtier.demo [options]``, the same as ``kvtier demo``."""
    p = argparse.ArgumentParser(prog="kvtier demo", description=_DESCRIPTION)
    _add_arguments(p)
    return _cmd_demo(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
