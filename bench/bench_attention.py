"""Attention after a cached prefix, one Llama-3-8B layer on the GPU: kvtier's reference engine's
split (``paged_llama._attend_split``: the prefix without a mask and the new tokens causally, two
cuDNN calls merged by their log-sum-exps) against what SDPA runs for a lower-right causal mask
(the flash kernel), in the same run, with the error of each against an fp32 reference.

A prompt whose first half hits computes its second half over the whole: this is that step's
attention. The rate ``limit`` is cuDNN's causal attention over a square of the same prompt
length, the kernel a full recompute runs (FLOPs counted for the unmasked half of each score
matrix).

    python bench/bench_attention.py [--out bench/results] [--reps 9]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from bench_report import machine, publish
from kvtier.examples import paged_llama
from torch.nn.attention.bias import causal_lower_right

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3-8B
NEW_LENGTHS = [3584, 5120, 13568]
CASES = [(16384, 16384), (8192, 24576), (2048, 30720), (1024, 31744), (256, 32512)]  # (new, prefix)


def timed(fn, reps: int) -> tuple[float, float]:
    """(median ms of ``reps`` calls, ms of the first call: for a new shape, cuDNN's plan build)."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    b.synchronize()
    first = a.elapsed_time(b)
    ms = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ms.append(a.elapsed_time(b))
    return statistics.median(ms), first


def flops(t: int, start: int) -> float:
    """Multiply-adds of QK^T and PV over the unmasked scores, x2: 4 * heads * d * visible pairs."""
    return 4.0 * HEADS * HEAD_DIM * (t * start + t * (t + 1) / 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None)
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_attention needs a CUDA GPU", file=sys.stderr)
        return 2
    g = torch.Generator(device="cuda").manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    results = []
    for t, start in CASES:
        end = t + start
        q = torch.randn(1, HEADS, t, HEAD_DIM, generator=g, **bf)
        k = torch.randn(1, KV_HEADS, end, HEAD_DIM, generator=g, **bf)
        v = torch.randn(1, KV_HEADS, end, HEAD_DIM, generator=g, **bf)
        if not paged_llama._cudnn_ok(q, k, v):
            print("cuDNN attention is not available here: the engine keeps the lower-right flash call")
            return 1

        def lower_right():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(t, end), enable_gqa=True)  # noqa: B023 - called in this iteration

        def split():
            return paged_llama._attend_split(q, k, v, start)  # noqa: B023 - called in this iteration

        sq = torch.randn(1, HEADS, end, HEAD_DIM, generator=g, **bf)
        skv = torch.randn(1, KV_HEADS, end, HEAD_DIM, generator=g, **bf)

        def square():
            return F.scaled_dot_product_attention(sq, skv, skv, is_causal=True, enable_gqa=True)  # noqa: B023 - called in this iteration

        # fp32 reference for the last 128 queries (they see every key): the math kernel
        rows = slice(t - 128, t)
        kr, vr = (x.float().repeat_interleave(HEADS // KV_HEADS, dim=1) for x in (k, v))
        ref = F.scaled_dot_product_attention(q[:, :, rows].float(), kr, vr, attn_mask=causal_lower_right(128, end))
        (ms_split, first_split), (ms_lr, first_lr) = timed(split, args.reps), timed(lower_right, args.reps)
        ms_sq, _ = timed(square, args.reps)
        err = {
            name: float((fn()[:, :, rows].float() - ref).abs().max())
            for name, fn in (("split", split), ("lower_right", lower_right))
        }
        rate = flops(t, start) / ms_split / 1e9
        limit = flops(end, 0) / ms_sq / 1e9
        print(
            f"new {t:6d} after {start:6d}: split {ms_split:7.3f} ms, lower-right {ms_lr:7.3f} ms "
            f"({ms_lr / ms_split:.2f}x); {rate:.0f} TFLOP/s vs square causal {limit:.0f}; "
            f"max err vs fp32: split {err['split']:.4f}, lower-right {err['lower_right']:.4f}; "
            f"first call: split {first_split:.1f} ms, lower-right {first_lr:.1f} ms",
            flush=True,
        )
        results.append(
            {
                "case": f"split_{t}_after_{start}",
                "value": round(ms_split, 4),
                "unit": "ms",
                "baseline": "sdpa_lower_right_mask",
                "baseline_value": round(ms_lr, 4),
                "ratio": round(ms_lr / ms_split, 3),
                "tflops": round(rate, 1),
                "limit": "cudnn_causal_square_tflops",
                "limit_value": round(limit, 1),
                "ratio_to_limit": round(rate / limit, 3),
                "max_abs_err_vs_fp32": round(err["split"], 5),
                "baseline_max_abs_err_vs_fp32": round(err["lower_right"], 5),
                "first_call_ms": round(first_split, 2),
                "baseline_first_call_ms": round(first_lr, 2),
                "engine_path": "split" if t >= paged_llama.SPLIT_MIN_QUERIES else "lower_right",
            }
        )
        torch.cuda.empty_cache()
    # Prompt lengths not seen before: the first call of a causal attention over each (what a
    # recompute of a new length, or a split plan's head, pays) against the same call once warm.
    # cuDNN builds a plan per shape unless torch's TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 (run the
    # bench once with it set: the workload name says which).
    for n in NEW_LENGTHS:
        x = torch.randn(1, HEADS, n, HEAD_DIM, generator=g, **bf)
        kv = torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=g, **bf)
        ms, first = timed(lambda: F.scaled_dot_product_attention(x, kv, kv, is_causal=True, enable_gqa=True), args.reps)  # noqa: B023
        print(f"causal over a new length {n}: first call {first:.1f} ms, then {ms:.3f} ms", flush=True)
        results.append(
            {
                "case": f"causal_new_length_{n}_first_call",
                "value": round(first, 3),
                "unit": "ms",
                "baseline": "same_call_warm",
                "baseline_value": round(ms, 4),
                "ratio": round(ms / first, 4),
                "tflops_warm": round(flops(n, 0) / ms / 1e9, 1),
            }
        )
    recompile = os.environ.get("TORCH_CUDNN_SDPA_AVOID_RECOMPILE", "0") == "1"
    publish(
        "bench_attention",
        "llama3_8b_after_prefix" + ("_avoid_recompile" if recompile else ""),
        torch.cuda.get_device_name().split()[1].lower(),
        results,
        args.out,
        machine_name=machine(torch.cuda.get_device_name()),
        split_min_queries=paged_llama.SPLIT_MIN_QUERIES,
        torch_cudnn_sdpa_avoid_recompile=recompile,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
