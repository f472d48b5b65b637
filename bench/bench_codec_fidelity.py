"""Benchmark kvtier's KV codecs (kvtier.codecs) on a Llama's own KV: compression ratio, encode
and decode GB/s of the original bytes on this CPU against a plain copy (the ``none`` codec), and
fidelity: how far a model's outputs move when its prefix KV went through the codec.

The model: no checkpoint with real weights can be fetched here, so this builds a Llama
(transformers' LlamaForCausalLM: 4 layers, hidden 1024, 8 query and 8 KV heads of 128 dims, the
shape of one Llama-3-8B layer's KV) with RANDOM weights (WEIGHT_STD below says how they are
scaled) and runs it in bfloat16 on random token ids. Random weights make the fidelity figures
numerical, not a judgement of text quality, and make KV values Gaussian-like: a trained model's
K has outlier channels, which change both the fp8 error and the lossless ratio.

Fidelity, per codec: the prompt's prefix (``--prefix`` tokens, whole chunks) is computed once;
its KV goes chunk by chunk (``--chunk`` tokens of all layers, K and V as separate tensors,
``[layers, kv_heads, tokens, head_dim]``) through encode and decode; the next ``--suffix``
tokens are then computed against the decoded KV and against the original. Reported: relative L2
error (``||out - ref|| / ||ref||``), max and mean absolute error of the logits of those tokens,
of the last hidden state and of each layer's attention output (the worst layer); agreement of
64 greedy tokens generated from either KV (free-running: the fraction of positions that match,
and where they first part), and the same 64 positions teacher-forced (top-1 agreement when both
read the reference's tokens), averaged over ``--prompts`` random prompts. Fidelity has no
baseline beside it (the reference is the uncompressed KV itself); for scale, each note says how
far a recompute (one forward over prefix and suffix, no cache: matrices of other shapes) moves
the same outputs.
Speed: best of ``--reps`` encode and decode passes over every chunk, codecs interleaved, one
thread, against the ``none`` codec (a copy) in the same run.

Usage::

    python bench/bench_codec_fidelity.py [--prefix 1024] [--reps 5] [--out bench/results]

prints one JSON document (format: /work/shared/BENCH.md) and, with ``--out``, writes it to
``<out>/bench_codec_fidelity-random_llama_4l_kv8x128_<prefix>tok-cpu-<date>.json``.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from pathlib import Path

import torch
from bench_report import publish
from kvtier.codecs import make_codec

BENCH = "bench_codec_fidelity"
GENERATED = 64

# name -> (K codec, V codec, how K is reshaped before encoding, what the case is)
# K's shape per chunk is [layers, kv_heads, tokens, head_dim]; "pages" reshapes it to
# [layers, kv_heads, tokens / 16, 16, head_dim] so that a scale can span one 16-token page.
CODECS = {
    "none": (("none", {}), ("none", {}), None, "plain copy: the baseline"),
    "fp8_f32scale": (
        ("fp8", {"scale_dtype": "float32"}),
        ("fp8", {"scale_dtype": "float32"}),
        None,
        "e4m3, a float32 scale per token per head, K and V",
    ),
    "fp8_bf16scale": (
        ("fp8", {"scale_dtype": "bfloat16"}),
        ("fp8", {"scale_dtype": "bfloat16"}),
        None,
        "e4m3, a bfloat16 scale per token per head, K and V",
    ),
    "fp8_k_page_head": (
        ("fp8", {"scale_dtype": "bfloat16", "scale_over": (-2, -1)}),
        ("fp8", {"scale_dtype": "bfloat16"}),
        "pages",
        "e4m3, K: a bfloat16 scale per 16-token page per head; V: per token per head",
    ),
    "fp8_k_page_channel": (
        ("fp8", {"scale_dtype": "bfloat16", "scale_over": (-2,)}),
        ("fp8", {"scale_dtype": "bfloat16"}),
        "pages",
        "e4m3, K: a bfloat16 scale per 16-token page per channel; V: per token per head",
    ),
    "byteplane_zstd": (
        ("byteplane_zstd", {}),
        ("byteplane_zstd", {}),
        None,
        "lossless: byte planes, the sign+exponent plane through zstd level 1",
    ),
}


# Weight scales of the random Llama (std of a normal draw), chosen for a trained model's regime
# rather than its values: attention logits q.k/sqrt(d) of std ~3 (peaked, so outputs depend on
# which prefix tokens there are, but not one-hot), each layer adding ~0.4 of the residual
# stream's norm (a random network with larger updates is chaotic: any perturbation, a recompute's
# rounding included, grows layer by layer), next-token logits of std ~3.
WEIGHT_STD = {
    "embed_tokens": 1.0,
    "q_proj": 0.054,
    "k_proj": 0.054,
    "v_proj": 0.03,
    "o_proj": 0.015,
    "gate_proj": 0.03,
    "up_proj": 0.03,
    "down_proj": 0.015,
    "lm_head": 0.1,
}
LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 4, 1024, 8, 8, 128, 4096


def random_llama(seed: int):
    """A Llama (transformers' LlamaForCausalLM) with random weights of WEIGHT_STD, bfloat16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        vocab_size=VOCAB,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            kind = name.split(".")[-2]
            if kind in WEIGHT_STD:
                p.copy_(torch.randn(p.shape, generator=gen) * WEIGHT_STD[kind])
            else:  # RMSNorm weights
                p.fill_(1.0)
    return model.to(torch.bfloat16).eval()


class Model:
    """The random Llama, and forwards that record each layer's attention output."""

    def __init__(self, seed: int) -> None:
        from transformers import DynamicCache

        self.dynamic_cache = DynamicCache
        self.model = random_llama(seed)
        params = inspect.signature(self.model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.attn_out: list[torch.Tensor] = []
        for layer in self.model.model.layers:
            layer.self_attn.register_forward_hook(lambda _m, _a, out: self.attn_out.append(out[0].detach()))

    def forward(self, ids: torch.Tensor, cache=None) -> dict:
        self.attn_out = []
        kwargs = {"use_cache": True, "output_hidden_states": True}
        if cache is not None:
            kwargs[self.cache_kwarg] = cache
        with torch.no_grad():
            out = self.model(ids, **kwargs)
        return {
            "logits": out.logits[0].float(),
            "hidden": out.hidden_states[-1][0].float(),
            "attn": [a[0].float() for a in self.attn_out],
            "cache": cache if cache is not None else getattr(out, "cache", None) or out.past_key_values,
        }

    def cache_of(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        cache = self.dynamic_cache()
        for i, (k, v) in enumerate(zip(keys, values)):
            cache.update(k.clone(), v.clone(), i)
        return cache

    def greedy(self, cache, first_logits: torch.Tensor, steps: int) -> list[int]:
        tokens = [int(first_logits.argmax())]
        for _ in range(steps - 1):
            out = self.forward(torch.tensor([[tokens[-1]]]), cache)
            tokens.append(int(out["logits"][-1].argmax()))
        return tokens


def kv_of(cache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    layers = cache.layers
    return [layer.keys for layer in layers], [layer.values for layer in layers]


def chunks_of(keys: list[torch.Tensor], chunk: int, prefix: int) -> list[torch.Tensor]:
    """[layers, kv_heads, chunk, head_dim] per chunk (one contiguous tensor each, as a gather
    would hand a codec)."""
    stacked = torch.stack([k[0, :, :prefix] for k in keys])  # [layers, kv_heads, prefix, head_dim]
    return [stacked[:, :, c : c + chunk].contiguous() for c in range(0, prefix, chunk)]


def unchunk(chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    whole = torch.cat(chunks, dim=2)  # [layers, kv_heads, prefix, head_dim]
    return [whole[i].unsqueeze(0) for i in range(whole.shape[0])]


def to_pages(t: torch.Tensor, mode: str | None) -> torch.Tensor:
    if mode is None:
        return t
    layers, heads, tokens, dim = t.shape
    return t.view(layers, heads, tokens // 16, 16, dim)


def round_trip(codec_k, codec_v, mode, k_chunks, v_chunks):
    """Encode and decode every chunk; (decoded K chunks, decoded V chunks, encoded bytes,
    encode seconds, decode seconds)."""
    blobs, nbytes = [], 0
    t0 = time.perf_counter()
    for k, v in zip(k_chunks, v_chunks):
        bk, bv = codec_k.encode(to_pages(k, mode)), codec_v.encode(v)
        blobs.append((bk, bv))
    t1 = time.perf_counter()
    out_k, out_v = [], []
    for (bk, bv), k in zip(blobs, k_chunks):
        out_k.append(codec_k.decode(bk).view(k.shape))
        out_v.append(codec_v.decode(bv))
    t2 = time.perf_counter()
    nbytes = sum(bk.numel() + bv.numel() for bk, bv in blobs)
    return out_k, out_v, nbytes, t1 - t0, t2 - t1


def errors(out: dict, ref: dict) -> dict:
    def stats(a: torch.Tensor, b: torch.Tensor) -> dict:
        d = (a - b).abs()
        return {
            "rel_l2": float(d.norm() / b.norm()),
            "max_abs": float(d.max()),
            "mean_abs": float(d.mean()),
            "ref_rms": float(b.pow(2).mean().sqrt()),
        }

    attn = [stats(a, b) for a, b in zip(out["attn"], ref["attn"])]
    worst = max(range(len(attn)), key=lambda i: attn[i]["rel_l2"])
    return {
        "logits": stats(out["logits"], ref["logits"]),
        "hidden": stats(out["hidden"], ref["hidden"]),
        "attn": {**attn[worst], "layer": worst, "layer0_rel_l2": attn[0]["rel_l2"]},
    }


def agreement(a: list[int], b: list[int]) -> tuple[float, int]:
    """(fraction of positions equal, first position that differs; len if none)."""
    same = sum(x == y for x, y in zip(a, b)) / len(a)
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    return same, first


def prefix_kv(model: Model, prefix_ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    keys, values = kv_of(model.forward(prefix_ids)["cache"])
    return [k.clone() for k in keys], [v.clone() for v in values]


def fidelity(model: Model, ids: torch.Tensor, codecs: dict, args) -> dict:
    """One prompt: for each codec (and for a recompute) the output errors against the reference
    and the greedy agreement."""
    prefix_ids, suffix_ids = ids[:, : args.prefix], ids[:, args.prefix :]
    # The reference: prefix KV as computed, the suffix against it, 64 greedy tokens on.
    keys, values = prefix_kv(model, prefix_ids)
    ref_cache = model.cache_of(keys, values)
    ref = model.forward(suffix_ids, ref_cache)
    ref_tokens = model.greedy(ref_cache, ref["logits"][-1], GENERATED)
    forced_ids = torch.cat([suffix_ids, torch.tensor([ref_tokens[:-1]])], dim=1)
    ref_forced = model.forward(forced_ids, model.cache_of(keys, values))["logits"][args.suffix - 1 :].argmax(-1)
    out = {}

    # For scale: a recompute, one forward over prefix and suffix.
    full = model.forward(ids)
    again = {
        "logits": full["logits"][args.prefix :],
        "hidden": full["hidden"][args.prefix :],
        "attn": [a[args.prefix :] for a in full["attn"]],
    }
    full_kv = [[t.clone() for t in ts] for ts in kv_of(full["cache"])]
    tokens = model.greedy(full["cache"], full["logits"][-1], GENERATED)
    agree, first = agreement(tokens, ref_tokens)
    forced = model.forward(ids.new_tensor([ref_tokens[:-1]]), model.cache_of(*full_kv))
    # The recompute's cache holds prefix and suffix: its last logits predict the first generated
    # token, the forced forward the other 63.
    forced = torch.cat([full["logits"][-1:].argmax(-1), forced["logits"].argmax(-1)])
    out["recompute"] = {
        "err": errors(again, ref),
        "greedy": agree,
        "first_diff": first,
        "forced": float((forced == ref_forced).float().mean()),
        "bit_exact": False,
    }

    k_chunks, v_chunks = chunks_of(keys, args.chunk, args.prefix), chunks_of(values, args.chunk, args.prefix)
    for name, (codec_k, codec_v, mode) in codecs.items():
        out_k, out_v, _, _, _ = round_trip(codec_k, codec_v, mode, k_chunks, v_chunks)
        bit_exact = all(
            torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(out_k + out_v, k_chunks + v_chunks)
        )
        dec_keys, dec_values = unchunk(out_k), unchunk(out_v)
        cache = model.cache_of(dec_keys, dec_values)
        got = model.forward(suffix_ids, cache)
        tokens = model.greedy(cache, got["logits"][-1], GENERATED)
        forced = model.forward(forced_ids, model.cache_of(dec_keys, dec_values))["logits"][args.suffix - 1 :]
        agree, first = agreement(tokens, ref_tokens)
        out[name] = {
            "err": errors(got, ref),
            "greedy": agree,
            "first_diff": first,
            "forced": float((forced.argmax(-1) == ref_forced).float().mean()),
            "bit_exact": bit_exact,
        }
    return out


def merge(runs: list[dict]) -> dict:
    """Across prompts: relative errors and agreements averaged, max errors the largest, first
    differences listed."""
    n = len(runs)

    def mean(values) -> float:
        return sum(values) / n

    err = {}
    for what in runs[0]["err"]:
        es = [r["err"][what] for r in runs]
        err[what] = {
            "rel_l2": mean(e["rel_l2"] for e in es),
            "max_abs": max(e["max_abs"] for e in es),
            "mean_abs": mean(e["mean_abs"] for e in es),
            "ref_rms": mean(e["ref_rms"] for e in es),
        }
        if what == "attn":
            err[what]["layer0_rel_l2"] = mean(e["layer0_rel_l2"] for e in es)
            err[what]["layer"] = sorted({e["layer"] for e in es})
    return {
        "err": err,
        "greedy": mean(r["greedy"] for r in runs),
        "first_diff": [r["first_diff"] for r in runs],
        "forced": mean(r["forced"] for r in runs),
        "bit_exact": all(r["bit_exact"] for r in runs),
    }


def coder_comparison(chunks: list[torch.Tensor], reps: int) -> list[dict]:
    """The coder behind byteplane_zstd, chosen on this: zstd level 1 against lz4 on the KV's
    sign+exponent byte plane (ratio and compress GB/s of the plane's bytes)."""
    import zstandard

    planes = [c.view(-1).view(torch.uint8).view(-1, 2)[:, 1].contiguous().numpy() for c in chunks]
    nbytes = sum(p.nbytes for p in planes)

    def measure(compress) -> tuple[float, float]:
        best, size = float("inf"), 0
        for _ in range(reps):
            t0 = time.perf_counter()
            size = sum(len(compress(p)) for p in planes)
            best = min(best, time.perf_counter() - t0)
        return nbytes / size, nbytes / best / 1e9

    zstd1 = zstandard.ZstdCompressor(level=1)
    z_ratio, z_gbs = measure(zstd1.compress)
    try:
        import lz4.block
    except ImportError:
        note = "lz4 is not installed: no comparison"
        return [
            {
                "case": "top_plane_coder.zstd_level1",
                "value": round(z_ratio, 3),
                "unit": "plane bytes / coded bytes",
                "baseline": None,
                "note": note,
            }
        ]
    l_ratio, l_gbs = measure(lambda p: lz4.block.compress(p, store_size=False))
    note = "the sign+exponent byte plane of every chunk (K and V), 1 thread"
    return [
        {
            "case": "top_plane_coder.zstd_level1_ratio",
            "value": round(z_ratio, 3),
            "unit": "plane bytes / coded bytes",
            "baseline": "lz4_block",
            "baseline_value": round(l_ratio, 3),
            "ratio": round(z_ratio / l_ratio, 3),
            "note": note,
        },
        {
            "case": "top_plane_coder.zstd_level1_compress",
            "value": round(z_gbs, 3),
            "unit": "GB/s of plane bytes",
            "baseline": "lz4_block",
            "baseline_value": round(l_gbs, 3),
            "ratio": round(z_gbs / l_gbs, 3),
            "note": note,
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", type=int, default=1024, help="prefix tokens whose KV goes through the codec")
    parser.add_argument("--suffix", type=int, default=32, help="tokens computed after the prefix")
    parser.add_argument("--chunk", type=int, default=256, help="tokens per chunk (one blob per K and V)")
    parser.add_argument("--reps", type=int, default=5, help="timed round trips per codec (best is kept)")
    parser.add_argument("--prompts", type=int, default=4, help="random prompts the fidelity is averaged over")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="directory to write the JSON result into")
    args = parser.parse_args()
    if args.prefix % args.chunk or args.chunk % 16:
        parser.error("--prefix must be a multiple of --chunk, and --chunk of 16")
    torch.set_num_threads(1)  # the machine is shared: one core for the model and the codecs alike
    torch.manual_seed(args.seed)
    load_before = os.getloadavg()  # the machine is shared: the 1-minute load average, before and after

    model = Model(args.seed)
    codecs = {
        name: (make_codec(kname, **kopts), make_codec(vname, **vopts), mode)
        for name, ((kname, kopts), (vname, vopts), mode, _) in CODECS.items()
    }
    gen = torch.Generator().manual_seed(args.seed + 1)
    prompts = [torch.randint(3, VOCAB, (1, args.prefix + args.suffix), generator=gen) for _ in range(args.prompts)]

    # Speed and ratio: every chunk of the first prompt's KV, best of --reps, codecs interleaved
    # so that drift on the shared machine hits each alike.
    keys, values = prefix_kv(model, prompts[0][:, : args.prefix])
    k_chunks, v_chunks = chunks_of(keys, args.chunk, args.prefix), chunks_of(values, args.chunk, args.prefix)
    original = sum(t.nbytes for t in k_chunks + v_chunks)
    best_enc = dict.fromkeys(codecs, float("inf"))
    best_dec = dict.fromkeys(codecs, float("inf"))
    encoded = {}
    for _ in range(args.reps):
        for name, (codec_k, codec_v, mode) in codecs.items():
            _, _, encoded[name], enc, dec = round_trip(codec_k, codec_v, mode, k_chunks, v_chunks)
            best_enc[name], best_dec[name] = min(best_enc[name], enc), min(best_dec[name], dec)

    per_prompt = [fidelity(model, ids, codecs, args) for ids in prompts]
    recompute = merge([p["recompute"] for p in per_prompt])
    measured = {}
    for name in codecs:
        measured[name] = {
            **merge([p[name] for p in per_prompt]),
            "ratio": original / encoded[name],
            "encode_gbs": original / best_enc[name] / 1e9,
            "decode_gbs": original / best_dec[name] / 1e9,
        }
        print(f"{name}: {measured[name]}", file=sys.stderr, flush=True)
    recompute_err = recompute["err"]
    recompute_agree, recompute_first = recompute["greedy"], recompute["first_diff"]
    recompute_tf = recompute["forced"]
    k_shape = f"[{LAYERS}, {KV_HEADS}, {args.chunk}, {HEAD_DIM}]"
    shape = f"{len(k_chunks)} chunks of {args.chunk} tokens, K and V each {k_shape} bfloat16"

    results = []
    base = measured["none"]
    for name, (_, _, _, what) in CODECS.items():
        m = measured[name]
        results += [
            {
                "case": f"{name}.compression_ratio",
                "value": round(m["ratio"], 4),
                "unit": "original bytes / encoded bytes (headers and scales included)",
                "baseline": "none",
                "baseline_value": round(base["ratio"], 4),
                "ratio": round(m["ratio"] / base["ratio"], 3),
                "note": f"{what}; {shape}",
            },
            {
                "case": f"{name}.encode",
                "value": round(m["encode_gbs"], 3),
                "unit": "GB/s of original bytes, 1 thread",
                "baseline": "none (a copy)",
                "baseline_value": round(base["encode_gbs"], 3),
                "ratio": round(m["encode_gbs"] / base["encode_gbs"], 3),
                "note": f"best of {args.reps}; {shape}",
            },
            {
                "case": f"{name}.decode",
                "value": round(m["decode_gbs"], 3),
                "unit": "GB/s of original bytes, 1 thread",
                "baseline": "none (a copy)",
                "baseline_value": round(base["decode_gbs"], 3),
                "ratio": round(m["decode_gbs"] / base["decode_gbs"], 3),
                "note": f"best of {args.reps}; {shape}",
            },
        ]
        if m["bit_exact"]:
            results.append(
                {
                    "case": f"{name}.fidelity",
                    "value": 0.0,
                    "unit": "relative L2 error of the logits",
                    "baseline": None,
                    "note": "bit-exact round trip of every chunk: the outputs are the reference's, bit for bit; "
                    f"greedy agreement {m['greedy']:.3f} over {GENERATED} tokens",
                }
            )
            continue
        no_peer = (
            "baseline null: the reference is the same model on the uncompressed KV (error 0 by definition) "
            f"and no other codec's error was measured beside it; mean over {args.prompts} random prompts "
            "(max_abs: the largest); "
        )
        for what_out, label in (("logits", "logits"), ("hidden", "last hidden state"), ("attn", "attention output")):
            e, r = m["err"][what_out], recompute_err[what_out]
            extra = (
                f"; the worst layer (layers {e['layer']}), layer 0: {e['layer0_rel_l2']:.3g}"
                if what_out == "attn"
                else ""
            )
            results.append(
                {
                    "case": f"{name}.{what_out}_rel_l2",
                    "value": round(e["rel_l2"], 6),
                    "unit": "||out - ref|| / ||ref||",
                    "baseline": None,
                    "max_abs": round(e["max_abs"], 5),
                    "mean_abs": round(e["mean_abs"], 6),
                    "ref_rms": round(e["ref_rms"], 5),
                    "note": f"{no_peer}{label} of the {args.suffix} tokens after the prefix{extra}; for scale, "
                    f"a recompute (one forward over prefix and suffix) differs from the reference by "
                    f"{r['rel_l2']:.3g} (max abs {r['max_abs']:.3g})",
                }
            )
        results += [
            {
                "case": f"{name}.greedy_agreement",
                "value": round(m["greedy"], 4),
                "unit": f"fraction of {GENERATED} greedy tokens equal, free-running",
                "baseline": None,
                "note": f"{no_peer}first differing token per prompt: {m['first_diff']} ({GENERATED}: none); after one "
                f"differs the two continuations part; a recompute agrees {recompute_agree:.3f} "
                f"(first difference {recompute_first})",
            },
            {
                "case": f"{name}.teacher_forced_top1",
                "value": round(m["forced"], 4),
                "unit": f"fraction of {GENERATED} positions whose argmax equals the reference's",
                "baseline": None,
                "note": f"{no_peer}both read the reference's greedy tokens, so one miss does not carry on; "
                f"a recompute agrees {recompute_tf:.3f}",
            },
        ]

    results += coder_comparison(k_chunks + v_chunks, args.reps)

    workload = f"random_llama_4l_kv8x128_{args.prefix}tok"
    publish(
        BENCH,
        workload,
        "cpu",
        results,
        str(args.out) if args.out else None,
        model=(
            "RANDOM weights (no checkpoint with real weights is available offline here): transformers "
            f"{__import__('transformers').__version__} LlamaForCausalLM, {LAYERS} layers, hidden {HIDDEN}, "
            f"{HEADS} query / {KV_HEADS} KV heads of {HEAD_DIM}, vocab {VOCAB}, bfloat16, random token ids; "
            f"weight std {WEIGHT_STD}"
        ),
        torch_threads=torch.get_num_threads(),
        load_average=[round(x, 2) for x in load_before + os.getloadavg()],
    )


if __name__ == "__main__":
    main()
