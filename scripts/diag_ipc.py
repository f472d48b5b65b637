"""Where a CUDA IPC page copy's time goes (a GPU diagnostic for bench_p2p_gpu's ipc rows, not a
benchmark): process A exports a vLLM-layout pool (bench_p2p_gpu's shape, 512 MiB in 16 chunks),
this process maps it on the other GPU and times, by wall clock and by CUDA events on the copy
stream, copy_pages(method=...) as the bench calls it, the same byte ranges through
_core.copy_segments directly, the same ranges from memory this process allocated itself (no IPC),
and torch's contiguous D2D copy of as many bytes; then the kernels one copy_pages call runs.

    python scripts/diag_ipc.py [kernel|push|dma]
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from bench_p2p_gpu import CHUNK, LAYERS, PAGE, _ipc_exporter, _kv, _targets


def main() -> None:
    import torch
    from kvtier import _core
    from kvtier.p2p.cuda_ipc import PageCopier, copy_pages, import_tensors

    method = sys.argv[1] if len(sys.argv) > 1 else "kernel"
    src_dev, dst_dev = "cuda:0", "cuda:1"
    chunks, ppc = 4096 // CHUNK, CHUNK // PAGE
    pool_pages = 4 * chunks * ppc
    ctx = mp.get_context("spawn")
    q, done = ctx.Queue(), ctx.Event()
    p = ctx.Process(target=_ipc_exporter, args=(q, done, src_dev, pool_pages, 600))
    p.start()
    try:
        handles = q.get(timeout=300)
        torch.cuda.set_device(dst_dev)
        src = import_tensors(handles, device=1)
        g = torch.Generator().manual_seed(1)
        src_chunks = torch.randperm(pool_pages // ppc, generator=g)[:chunks].tolist()
        dst_chunks = torch.randperm(pool_pages // ppc, generator=g)[:chunks].tolist()
        src_pages = [c * ppc + i for c in src_chunks for i in range(ppc)]
        dst_pages = [c * ppc + i for c in dst_chunks for i in range(ppc)]
        nbytes = len(src_pages) * LAYERS * 2 * src[0][0, 0].numel() * 2
        dst, a, b, stream = _targets(pool_pages, nbytes, src_dev, dst_dev)
        local_src = _kv(torch, pool_pages, src_dev, 0)  # allocated here: no IPC mapping
        copier = PageCopier(src, dst, 1)
        cols = copier.segments(src_pages, dst_pages).T.copy()
        local_copier = PageCopier(local_src, dst, 1)
        lcols = local_copier.segments(src_pages, dst_pages).T.copy()
        print(
            f"{len(src_pages)} pages x {LAYERS} layers x K,V: {len(cols[0])} ranges, "
            f"{nbytes / 2**20:.0f} MiB, range bytes {sorted(set(cols[2].tolist()))[:4]}",
            flush=True,
        )

        cases = {
            "copy_pages (a copier a call)": lambda: copy_pages(
                src, dst, src_pages, dst_pages, page_dim=1, stream=stream, method=method
            ),
            "PageCopier kept (the bench)": lambda: copier.copy(src_pages, dst_pages, stream=stream, method=method),
            "copy_segments, IPC sources": lambda: _core.copy_segments(
                1, cols[0], cols[1], cols[2], int(stream.cuda_stream), method
            ),
            "copy_segments, own sources": lambda: _core.copy_segments(
                1, lcols[0], lcols[1], lcols[2], int(stream.cuda_stream), method
            ),
            "torch D2D contiguous": lambda: b.copy_(a, non_blocking=True),
        }
        for _ in range(3):
            for fn in cases.values():
                with torch.cuda.stream(stream):
                    fn()
                stream.synchronize()
        for name, fn in cases.items():
            wall, gpu = [], []
            for _ in range(10):
                torch.cuda.synchronize(src_dev)
                torch.cuda.synchronize(dst_dev)
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0 = time.perf_counter()
                e0.record(stream)
                with torch.cuda.stream(stream):
                    fn()
                e1.record(stream)
                t1 = time.perf_counter()
                stream.synchronize()
                wall.append(time.perf_counter() - t0)
                gpu.append(e0.elapsed_time(e1) / 1e3)
                host = t1 - t0
            w, gt = statistics.median(wall), statistics.median(gpu)
            print(
                f"{name:30s} wall {w * 1e3:7.3f} ms ({nbytes / w / 1e9:6.1f} GB/s)  GPU {gt * 1e3:7.3f} ms "
                f"({nbytes / gt / 1e9:6.1f} GB/s)  host queueing {host * 1e6:6.0f} us",
                flush=True,
            )
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            with torch.cuda.stream(stream):
                copy_pages(src, dst, src_pages, dst_pages, page_dim=1, stream=stream, method=method)
            stream.synchronize()
        for e in prof.key_averages():
            if e.device_type.name == "CUDA" or "Kernel" in e.key or "cuda" in e.key.lower():
                print(
                    f"  {e.key[:70]:70s} calls {e.count:4d} device {e.device_time_total / 1e3:8.3f} ms "
                    f"host {e.self_cpu_time_total / 1e3:8.3f} ms"
                )
    finally:
        done.set()
        p.join(30)


if __name__ == "__main__":
    main()
