"""The GPU codec tier's variants side by side on one machine (a diagnostic; needs a CUDA GPU): fp8
stores into the CPU tier and CPU hits of 64 chunks of bench_codec_tier's KV, raw chunks first, then
fp8 with each switch of kvtier.codec_tier flipped (the chunks gathered first or coded in their
pages, waits for the GPU polled before they sleep or not, a load's header check made by the decode
or read back each round, the blobs' PCIe copies on the codec's stream or a stream of their own,
rounds of 64 or 128 MiB, loads issued ahead or not, a load's read-back header check on its own
stream or the codec's), and the defaults with one copy thread
(bench_codec_tier's setting) and in a tier filled first (every store evicts, as in
bench_codec_tier), the first two again (the machine's drift), then a cProfile of one store and
one CPU hit (host time by function) for the defaults and for coding in pages.

    python scripts/ab_codec_tier.py
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import bench_codec_tier as b
import kvtier.codec_tier as ct
from kvtier import KVCache
from prof_codec_tier import CHUNKS, store_and_hit_times

REPS = 6


def main() -> None:
    _, layout = b.make_kv(CHUNKS, "cuda")
    ppc = b.CHUNK // b.PAGE
    src, dst = np.arange(CHUNKS * ppc), np.arange(CHUNKS * ppc, 2 * CHUNKS * ppc)
    fp8 = {**b.CODECS["fp8"], "codec_device": "gpu", "method": "auto"}
    defaults = dict(
        d2h=ct._D2H_STREAM,
        mib=ct._GPU_BATCH_BYTES >> 20,
        ahead=ct._LOAD_AHEAD,
        check=ct._CHECK_STREAM,
        pages=ct._FUSED_PAGES,
        spin=ct._SPIN_S,
        in_decode=ct._CHECK_IN_DECODE,
        threads=2,
        full=False,
    )
    variants = [
        ("none", {"method": "auto"}, {}),
        ("fp8 (defaults)", fp8, {}),
        ("fp8, coded in pages", fp8, {"pages": True}),
        ("fp8, coded in pages, each round's header check read back", fp8, {"pages": True, "in_decode": False}),
        ("fp8, waits that sleep from the start", fp8, {"spin": 0.0}),
        ("fp8, the other blob stream (D2H <-> codec)", fp8, {"d2h": not defaults["d2h"]}),
        ("fp8, rounds of 128 MiB", fp8, {"mib": 128}),
        ("fp8, loads not ahead", fp8, {"ahead": False}),
        ("fp8, read back, the other header-check stream", fp8, {"check": not defaults["check"], "in_decode": False}),
        ("fp8, one copy thread", fp8, {"threads": 1}),
        ("fp8, the tier filled first", fp8, {"full": True}),
        ("none, the tier filled first", {"method": "auto"}, {"full": True}),
        ("none, again", {"method": "auto"}, {}),
        ("fp8 (defaults), again", fp8, {}),
        ("fp8, coded in pages, again", fp8, {"pages": True}),
    ]
    raw = CHUNKS * layout.chunk_bytes
    for name, opts, change in variants:
        v = {**defaults, **change}
        ct._D2H_STREAM, ct._GPU_BATCH_BYTES, ct._LOAD_AHEAD = v["d2h"], v["mib"] << 20, v["ahead"]
        ct._CHECK_STREAM, ct._FUSED_PAGES, ct._SPIN_S = v["check"], v["pages"], v["spin"]
        ct._CHECK_IN_DECODE = v["in_decode"]
        with KVCache(layout, cpu_bytes=4 * CHUNKS * layout.chunk_bytes, cpu_threads=v["threads"], **opts) as cache:
            if v["full"]:
                for _ in range(-(-cache.stats()["capacity_chunks"] // CHUNKS)):
                    store_and_hit_times(cache, src, dst, 0)
            store, t, stores, loads = store_and_hit_times(cache, src, dst, REPS)
            ms_store = " ".join(f"{x * 1e3:.1f}" for x in stores)
            ms_hit = " ".join(f"{x * 1e3:.1f}" for x in loads)
            print(
                f"{name}: store {raw / min(stores) / 1e9:.2f} GB/s, CPU hit {raw / min(loads) / 1e9:.2f} GB/s "
                f"(ms, store: {ms_store}; hit: {ms_hit})",
                flush=True,
            )
            if name in ("fp8 (defaults)", "fp8, coded in pages"):
                for what, fn in (("store", store), ("CPU hit", lambda cache=cache, t=t: cache.load(t, dst).wait())):
                    prof = cProfile.Profile()
                    prof.enable()
                    fn()
                    torch.cuda.synchronize()
                    prof.disable()
                    out = io.StringIO()
                    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(20)
                    print(f"--- cProfile of one {what}, {name} (host time by function)\n{out.getvalue()}")


if __name__ == "__main__":
    main()
