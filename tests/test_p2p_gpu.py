"""CUDA IPC between two processes on one host (kvtier.p2p.cuda_ipc). Skips without a GPU."""

from __future__ import annotations

import multiprocessing as mp

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.multiproc]


def _exporter(q, done):
    import torch
    from kvtier.p2p.cuda_ipc import export_tensors

    g = torch.Generator(device="cuda").manual_seed(0)
    kv = [torch.randn(2, 32, 16, 8, 128, device="cuda", generator=g, dtype=torch.float32).to(torch.bfloat16)
          for _ in range(4)]
    torch.cuda.synchronize()
    q.put((export_tensors(kv), [t[:, 0:8].float().sum().item() for t in kv]))
    done.wait(60)


def test_cuda_ipc_copies_pages_bit_exact(gpu):
    import torch
    from kvtier.p2p.cuda_ipc import copy_pages, import_tensors

    ctx = mp.get_context("spawn")
    q, done = ctx.Queue(), ctx.Event()
    p = ctx.Process(target=_exporter, args=(q, done))
    p.start()
    try:
        handles, sums = q.get(timeout=120)
        src = import_tensors(handles)
        dst = [torch.zeros_like(t) for t in src]
        copy_pages(src, dst, list(range(8)), list(range(16, 24)))
        torch.cuda.synchronize()
        for s, d, ref in zip(src, dst, sums):
            assert torch.equal(s[:, 0:8], d[:, 16:24])
            assert d[:, 16:24].float().sum().item() == pytest.approx(ref)
        del src, dst
    finally:
        done.set()
        p.join(60)
