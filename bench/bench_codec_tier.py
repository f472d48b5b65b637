"""bench_codec_tier: a KVCache whose tiers hold encoded chunks (codec.name), against one that holds
raw chunks (``none``), measured in the same run: chunks per byte of the CPU tier, store and load
rates through the CPU tier (full: its blocks used once before the timed stores, which evict), and
a disk hit after a restart.

    python bench/bench_codec_tier.py [--chunks 16] [--reps 3] [--disk-dir DIR] [--device cuda]
                                     [--matmul-beside] [--out bench/results]

The KV is a Llama-3-8B layer's shape (8 KV heads of 128, bfloat16) over 4 layers in vLLM's
layout on the host, 256-token chunks (4 MiB raw), values drawn normal. Rates are of the raw
chunk bytes (GB/s = 10^9 bytes/s), best of ``--reps``; every case names its baseline, the
``none`` cache's same operation in the same run. Prints one JSON document (/work/shared/BENCH.md)
and with ``--out`` writes it there. Without ``--device`` the KV is on the host, every copy is a
host copy and the codecs run on the CPU; with ``--device cuda`` the KV lives on the GPU and each
codec runs twice, coded on the host (``codec.device: host``: raw chunks cross PCIe) and on the
GPU (``_on_gpu`` cases, ``codec.device: gpu``: encoded chunks cross PCIe). ``--matmul-beside``
adds what each cache's stores and CPU hits cost a model's matmuls running beside them on the
GPU: bf16 matmuls on a stream of their own, their TFLOP/s beside a loop of the cache's operation
against alone (the better of before and after), same run. With ``--device cuda`` the fp8 codec's
fused kernels are also timed alone over the same chunks (``fp8_kernel`` cases): against the
codec's torch path and against a device copy of the same bytes (the bound), same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from kvtier import KVCache, Layout
from kvtier.bench_info import git_commit, machine

LAYERS, HEADS, DIM, PAGE, CHUNK = 4, 8, 128, 16, 256
MATMUL_S = 2.0  # seconds of matmuls per case of --matmul-beside
CODECS = {
    "fp8": {"codec_name": "fp8", "codec_fp8_scale_dtype": "bfloat16"},
    "byteplane_zstd": {"codec_name": "byteplane_zstd", "codec_zstd_level": 1},
    # slots of 3/4 of its largest blob: these chunks' blobs are ~0.68 of it, so every one fits
    "byteplane_zstd_slot75": {"codec_name": "byteplane_zstd", "codec_zstd_level": 1, "codec_slot_fraction": 0.75},
}


def make_kv(chunks: int, device: str):
    pages = 2 * chunks * CHUNK // PAGE  # room for a second copy (the load's destination)
    g = torch.Generator().manual_seed(0)
    kv = [torch.randn(2, pages, PAGE, HEADS, DIM, generator=g).to(torch.bfloat16).to(device) for _ in range(LAYERS)]
    return kv, Layout.from_vllm(kv, chunk_tokens=CHUNK)


def timed(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


class MatmulBeside:
    """bf16 matmuls on a stream of their own, in a thread, as a model's work beside the cache's
    copies: ``rate(seconds, beside)`` is the TFLOP/s they reach while ``beside()`` runs in a loop
    on the calling thread (nothing: alone)."""

    N = 8192

    def __init__(self, device: str) -> None:
        self.a = torch.randn(self.N, self.N, device=device, dtype=torch.bfloat16)
        self.b = torch.randn(self.N, self.N, device=device, dtype=torch.bfloat16)
        self.stream = torch.cuda.Stream(device)

    def rate(self, seconds: float, beside=None) -> float:
        stop = threading.Event()
        done = [0, 0.0]

        def run() -> None:
            with torch.cuda.stream(self.stream):
                torch.mm(self.a, self.b)  # warm
                self.stream.synchronize()
                t0 = time.perf_counter()
                while not stop.is_set():
                    for _ in range(4):
                        torch.mm(self.a, self.b)
                    self.stream.synchronize()
                    done[0] += 4
                done[1] = time.perf_counter() - t0

        th = threading.Thread(target=run)
        th.start()
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            if beside is None:
                time.sleep(0.01)
            else:
                beside()
        stop.set()
        th.join()
        return done[0] * 2 * self.N**3 / done[1] / 1e12


def measure(
    layout, chunks: int, reps: int, disk_dir: str, opts: dict, matmul: MatmulBeside | None = None, threads: int = 1
) -> dict:
    opts = {**opts, "method": "auto" if layout.device.startswith("cuda") else "cpu", "cpu_threads": threads}
    """Rates (raw GB/s) of one cache configuration: store into an empty CPU tier, load a CPU hit,
    load a disk hit after a restart (every chunk promoted from disk)."""
    ppc = CHUNK // PAGE
    src, dst = np.arange(chunks * ppc), np.arange(chunks * ppc, 2 * chunks * ppc)
    raw = chunks * layout.chunk_bytes
    out = {}
    cpu_bytes = max(2 * chunks, 64) * layout.chunk_bytes  # 256 MiB at least

    def store_fresh():
        nonlocal seed
        seed += 1
        tokens = list(range(seed * 10**6, seed * 10**6 + chunks * CHUNK))
        cache.store(tokens, src).wait()

    seed = 0
    with KVCache(layout, cpu_bytes=cpu_bytes, **opts) as cache:
        out["capacity_chunks"] = cache.stats()["capacity_chunks"]
        # Every block used once before the timed stores (a host tier's memory is faulted in on
        # first use), which then evict, as a serving tier's stores do once it is full.
        for _ in range(-(-out["capacity_chunks"] // chunks)):
            store_fresh()
        out["store_gbps"] = raw / timed(store_fresh, reps) / 1e9
        tokens = list(range(seed * 10**6, seed * 10**6 + chunks * CHUNK))
        out["load_cpu_gbps"] = raw / timed(lambda: cache.load(tokens, dst).wait(), reps) / 1e9
        if matmul is not None:  # the model's matmuls while the cache stores, then loads, in a loop
            out["matmul_beside_store_tflops"] = matmul.rate(MATMUL_S, store_fresh)
            store_fresh()
            hit = list(range(seed * 10**6, seed * 10**6 + chunks * CHUNK))
            out["matmul_beside_load_cpu_tflops"] = matmul.rate(MATMUL_S, lambda: cache.load(hit, dst).wait())
    d = tempfile.mkdtemp(dir=disk_dir)
    disk = dict(disk_dir=d, disk_bytes=4 * raw + (64 << 20))
    with KVCache(layout, cpu_bytes=cpu_bytes, **disk, **opts) as cache:
        cache.store(tokens, src).wait()  # persisted at close
    times = []
    for _ in range(reps):  # each restart finds every chunk on disk only
        with KVCache(layout, cpu_bytes=cpu_bytes, **disk, **opts) as cache:
            assert cache.lookup_tiers(tokens) == ["disk"] * chunks
            t0 = time.perf_counter()
            got = cache.load(tokens, dst).wait()
            times.append(time.perf_counter() - t0)
            assert got == chunks * CHUNK, got
    shutil.rmtree(d)
    out["load_disk_gbps"] = raw / min(times) / 1e9
    return out


def kernel_cases(layout, chunks: int, reps: int, device: str, fused: bool = True) -> list[dict]:
    """fp8 (bf16 scales) coding a stack of ``chunks`` chunks on ``device``, nothing else: the
    core's fused kernels (``fused``; else the torch path stands in, to check this on a CPU) against
    the torch path and against a device copy of the raw bytes, GB/s of raw bytes, best of ``reps``
    timings of 5 calls each."""
    from kvtier.codec_tier import chunk_shape
    from kvtier.codecs import make_codec, read_header

    shape, dtype = chunk_shape(layout)
    codec = make_codec("fp8", scale_dtype="bfloat16")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(chunks, *shape, generator=g).to(dtype).to(device)
    nbytes = x.numel() * x.element_size()
    encode = codec._encode_fused if fused else codec._encode_torch
    blobs, ok = encode(x)
    header = read_header(blobs[0].cpu())
    decode = codec._decode_fused if fused else codec._decode_torch

    def rate(fn) -> float:
        def five():
            for _ in range(5):
                fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()

        five()  # first calls
        return 5 * nbytes / timed(five, reps) / 1e9

    r = {
        "copy": rate(lambda: x.clone()),
        "encode": rate(lambda: encode(x)),
        "encode_torch": rate(lambda: codec._encode_torch(x)),
        "decode": rate(lambda: decode(blobs, header)),
        "decode_torch": rate(lambda: codec._decode_torch(blobs, header)),
    }
    assert bool(ok.all()), "fp8 refused a chunk of normal values"
    where = "the core's fused kernel" if fused else "the torch path (no fused kernel here)"
    out = []
    for op in ("encode", "decode"):
        for base, label in ((f"{op}_torch", f"fp8_torch.{op}"), ("copy", "device_copy")):
            out.append(
                {
                    "case": f"fp8_kernel.{op}" + ("" if base != "copy" else "_of_copy"),
                    "value": round(r[op], 2),
                    "unit": "GB/s of raw chunk bytes",
                    "baseline": label,
                    "baseline_value": round(r[base], 2),
                    "ratio": round(r[op] / r[base], 4),
                    "note": f"fp8 {op} of {chunks} chunks ({nbytes >> 20} MiB raw) by {where}, alone on the "
                    + (
                        "device; baseline: the codec's torch path"
                        if base != "copy"
                        else "device; baseline: a device copy of the raw bytes (the bound)"
                    ),
                }
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--disk-dir", default=tempfile.gettempdir(), help="a directory on a disk that takes O_DIRECT")
    parser.add_argument("--device", default="cpu", help="where the KV lives: cpu or cuda")
    parser.add_argument("--out", type=Path, help="directory to write the JSON result into")
    parser.add_argument(
        "--cpu-threads",
        type=int,
        default=1,
        help="every cache's cpu.threads: copy threads of the CPU path, and threads of fp8's host pass",
    )
    parser.add_argument(
        "--matmul-beside",
        action="store_true",
        help="with --device cuda: also the TFLOP/s of bf16 matmuls run beside each cache's stores and CPU hits",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    _kv, layout = make_kv(args.chunks, args.device)  # the layout holds the tensors
    codecs = dict(CODECS)
    if args.device.startswith("cuda"):  # also coded on the GPU: only encoded bytes cross PCIe
        codecs.update({f"{name}_on_gpu": {**opts, "codec_device": "gpu"} for name, opts in CODECS.items()})
    matmul = MatmulBeside(args.device) if args.matmul_beside and args.device.startswith("cuda") else None
    alone = matmul.rate(MATMUL_S) if matmul is not None else None
    runs = {"none": measure(layout, args.chunks, args.reps, args.disk_dir, {}, matmul, args.cpu_threads)}
    for name, opts in codecs.items():
        runs[name] = measure(layout, args.chunks, args.reps, args.disk_dir, opts, matmul, args.cpu_threads)
    if matmul is not None:
        alone = max(alone, matmul.rate(MATMUL_S))  # again after: the GPU's clock drifts
    base = runs["none"]
    results = []
    if args.device.startswith("cuda"):
        from kvtier import _core

        results += kernel_cases(layout, args.chunks, args.reps, args.device, fused=_core.CUDA_COMPILED)
    if matmul is not None:
        for name in ("none", *codecs):
            for op, label in (("store", "stores in a loop"), ("load_cpu", "CPU hits in a loop")):
                value = runs[name][f"matmul_beside_{op}_tflops"]
                results.append(
                    {
                        "case": f"{name}.matmul_beside_{op}",
                        "value": round(value, 2),
                        "unit": f"TFLOP/s of bf16 {MatmulBeside.N}^3 matmuls on a stream of their own",
                        "baseline": "matmul_alone",
                        "baseline_value": round(alone, 2),
                        "ratio": round(value / alone, 4),
                        "note": f"matmuls beside the {name} cache's {label} (ratio 1: the cache costs them nothing)",
                    }
                )
    for name in codecs:
        r = runs[name]
        results.append(
            {
                "case": f"{name}.capacity_chunks",
                "value": r["capacity_chunks"],
                "unit": "chunks in the CPU tier",
                "baseline": "none.capacity_chunks",
                "baseline_value": base["capacity_chunks"],
                "ratio": round(r["capacity_chunks"] / base["capacity_chunks"], 4),
            }
        )
        for what, label in (
            ("store_gbps", "store into the CPU tier (gather, encode)"),
            ("load_cpu_gbps", "CPU hit (decode, scatter)"),
            ("load_disk_gbps", "disk hit after a restart (read, decode, scatter)"),
        ):
            results.append(
                {
                    "case": f"{name}.{what.removesuffix('_gbps')}",
                    "value": round(r[what], 4),
                    "unit": "GB/s of raw chunk bytes",
                    "baseline": f"none.{what.removesuffix('_gbps')}",
                    "baseline_value": round(base[what], 4),
                    "ratio": round(r[what] / base[what], 4),
                    "note": label,
                }
            )
    doc = {
        "bench": "bench_codec_tier",
        "workload": f"llama3_8b_kv_{LAYERS}l_{args.chunks}x{CHUNK}tok"
        + (f"_{args.cpu_threads}threads" if args.cpu_threads != 1 else ""),
        "machine": machine(torch.cuda.get_device_name() if args.device.startswith("cuda") else None),
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "chunk_bytes": layout.chunk_bytes,
        "disk_dir": args.disk_dir,
        "device": args.device,
        "threads": f"torch 1 thread, cpu.threads {args.cpu_threads} (copy threads, fp8's host pass)",
        "results": results,
    }
    text = json.dumps(doc, indent=1)
    print(text)
    if args.out is not None:
        tag = doc["machine"].split(",")[0].split()[1].lower() if args.device.startswith("cuda") else "cpu"
        name = f"{doc['bench']}-{doc['workload']}-{tag}-{doc['date']}.json"
        (args.out / name).write_text(text + "\n")


if __name__ == "__main__":
    main()
