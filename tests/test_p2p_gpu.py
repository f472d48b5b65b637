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
        dev = torch.cuda.device_count() - 1  # with two GPUs: A's memory on GPU 0, copied on GPU 1
        src = import_tensors(handles, device=dev)
        dst = [torch.zeros_like(t) for t in src]
        assert copy_pages(src, dst, list(range(8)), list(range(16, 24))) == "dma"
        torch.cuda.synchronize()
        for s, d, ref in zip(src, dst, sums):
            assert torch.equal(s[:, 0:8], d[:, 16:24])
            assert d[:, 16:24].float().sum().item() == pytest.approx(ref)
        del src, dst
    finally:
        done.set()
        p.join(60)


@pytest.mark.parametrize("method", ["dma", "kernel"])
@pytest.mark.parametrize("page_dim", [0, 1])
def test_copy_pages_matches_torch_for_scattered_pages(gpu, page_dim, method):
    """The segment kernel and the per-run torch path agree, for both page dims, scattered runs,
    and a non-contiguous source (which takes the torch path)."""
    import torch
    from kvtier.p2p.cuda_ipc import copy_pages

    dev = torch.device("cuda", torch.cuda.device_count() - 1)  # the other GPU when there are two
    shape = (40, 3, 2, 4, 8, 16) if page_dim == 0 else (2, 40, 4, 8, 16)
    g = torch.Generator(device="cuda").manual_seed(5)
    src = [torch.randn(shape, device="cuda", generator=g).to(torch.bfloat16) for _ in range(3)]
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(6)).tolist()
    sp, dp = [1, 2, 3, 9, 10, 30, 31, 32, 33, 0], perm[:10]
    a = [torch.zeros(shape, device=dev, dtype=torch.bfloat16) for _ in range(3)]
    b = [torch.zeros(shape, device=dev, dtype=torch.bfloat16) for _ in range(3)]
    assert copy_pages(src, a, sp, dp, page_dim=page_dim, method=method) == method
    with torch.cuda.device(dev):
        for s, d in zip(src, b):
            for i, j in zip(sp, dp):
                d.select(page_dim, j).copy_(s.select(page_dim, i))
    torch.cuda.synchronize()
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    strided = [t.transpose(-1, -2) for t in src]  # not contiguous: the torch path
    c = [torch.zeros_like(t, device=dev) for t in strided]
    assert copy_pages(strided, c, sp, dp, page_dim=page_dim) == "torch"
    torch.cuda.synchronize()
    for s, d in zip(strided, c):
        assert torch.equal(s.index_select(page_dim, torch.tensor(sp, device=s.device)).to(dev),
                           d.index_select(page_dim, torch.tensor(dp, device=dev)))
