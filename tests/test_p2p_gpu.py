"""CUDA IPC between two processes on one host (kvtier.p2p.cuda_ipc). Skips without a GPU."""

from __future__ import annotations

import multiprocessing as mp

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.multiproc]


def _exporter(q, done):
    import torch
    from kvtier.p2p.cuda_ipc import export_tensors

    g = torch.Generator(device="cuda").manual_seed(0)
    kv = [
        torch.randn(2, 32, 16, 8, 128, device="cuda", generator=g, dtype=torch.float32).to(torch.bfloat16)
        for _ in range(4)
    ]
    torch.cuda.synchronize()
    q.put((export_tensors(kv), [t[:, 0:8].float().sum().item() for t in kv]))
    done.wait(60)


def _importer(q, handles, method):
    """B: maps A's tensors on the last GPU and copies pages 0..7 into 16..23. A process of its own:
    a kernel fault ('push' from a GPU unable to address the mapping) would poison the CUDA context
    of the test process. Answers (outcome, detail, sums of the copied pages)."""
    try:
        import torch
        from kvtier import _core
        from kvtier.errors import FailedPreconditionError
        from kvtier.p2p.cuda_ipc import copy_pages, import_tensors

        dev = torch.cuda.device_count() - 1  # with two GPUs: A's memory on GPU 0, copied on GPU 1
        torch.cuda.set_device(dev)
        src = import_tensors(handles, device=dev)
        dst = [torch.zeros_like(t) for t in src]
        where = f"push_device {_core.push_device(dev, src[0].data_ptr())} for a mapping on GPU {dev}"
        try:
            path = copy_pages(src, dst, list(range(8)), list(range(16, 24)), method=method)
        except FailedPreconditionError as e:
            q.put(("refused", f"{e} ({where})", None))
            return
        torch.cuda.synchronize()
        if path != method or not all(torch.equal(s[:, 0:8], d[:, 16:24]) for s, d in zip(src, dst)):
            q.put(("wrong", f"path {path!r}, {where}", None))
            return
        q.put(("ok", where, [d[:, 16:24].float().sum().item() for d in dst]))
    except Exception as e:  # noqa: BLE001 - reported to the test as text
        q.put(("error", f"{type(e).__name__}: {e}", None))


@pytest.mark.parametrize("method", ["dma", "kernel", "push"])
def test_cuda_ipc_copies_pages_bit_exact(gpu, method):
    """A's tensors mapped in B on the last GPU, pages copied by every method. With two GPUs,
    'push' runs on GPU 0 if the runtime names it for the mapping; FailedPreconditionError there
    (GPU 0 cannot address a mapping opened on GPU 1) skips, loudly."""
    ctx = mp.get_context("spawn")
    q, done = ctx.Queue(), ctx.Event()
    p = ctx.Process(target=_exporter, args=(q, done))
    p.start()
    try:
        handles, sums = q.get(timeout=120)
        answers = ctx.Queue()
        b = ctx.Process(target=_importer, args=(answers, handles, method))
        b.start()
        try:
            outcome, detail, got = answers.get(timeout=120)
        finally:
            b.join(60)
        if outcome == "refused" and method == "push":
            pytest.skip(f"push over CUDA IPC refused: {detail}")
        assert outcome == "ok", detail
        assert got == pytest.approx(sums)
    finally:
        done.set()
        p.join(60)


def _source_mapping_pusher(q, handles):
    """C: maps A's tensors on A's GPU (0, the sources' GPU, whose kernels can read the mapping) and
    pushes pages 0..7 into 16..23 of its own tensors on GPU 1, on a stream of GPU 1. A process of
    its own, for the same reason as _importer. Answers (outcome, detail, sums of the copied pages)."""
    try:
        import torch
        from kvtier import _core
        from kvtier.p2p.cuda_ipc import copy_pages, import_tensors

        torch.cuda.set_device(1)
        src = import_tensors(handles, device=0)
        where = _core.push_device(1, src[0].data_ptr())
        if where != 0:
            q.put(("wrong", f"push_device {where} for a mapping opened on GPU 0", None))
            return
        dst = [torch.zeros(t.shape, device="cuda:1", dtype=t.dtype) for t in src]
        stream = torch.cuda.Stream("cuda:1")
        path = copy_pages(src, dst, list(range(8)), list(range(16, 24)), stream=stream, method="push")
        stream.synchronize()
        if path != "push" or not all(
            torch.equal(s[:, 0:8].contiguous().to("cuda:1"), d[:, 16:24]) for s, d in zip(src, dst)
        ):
            q.put(("wrong", f"path {path!r}, or the pages differ", None))
            return
        if any(bool(d[:, :16].any()) or bool(d[:, 24:].any()) for d in dst):
            q.put(("wrong", "pages outside 16..23 written", None))
            return
        sums = [d[:, 16:24].float().sum().item() for d in dst]
        src.clear()  # drop the mappings before A is told it may exit
        torch.cuda.synchronize()
        q.put(("ok", "push_device 0", sums))
    except Exception as e:  # noqa: BLE001 - reported to the test as text
        q.put(("error", f"{type(e).__name__}: {e}", None))


def test_cuda_ipc_push_with_the_mapping_on_the_sources_gpu(gpu):
    """A exports on GPU 0; C opens the mapping on GPU 0 (the sources' GPU) and pushes pages into
    its tensors on GPU 1: the kernel runs on GPU 0 reading local memory, writing through peer
    access. Bit-exact against A's pages."""
    _two_gpus()
    ctx = mp.get_context("spawn")
    q, done = ctx.Queue(), ctx.Event()
    p = ctx.Process(target=_exporter, args=(q, done))
    p.start()
    try:
        handles, sums = q.get(timeout=120)
        assert {h.device for h in handles} == {0}
        answers = ctx.Queue()
        c = ctx.Process(target=_source_mapping_pusher, args=(answers, handles))
        c.start()
        try:
            outcome, detail, got = answers.get(timeout=120)
        finally:
            c.join(60)
            if c.is_alive():
                c.kill()
        assert outcome == "ok", detail
        assert got == pytest.approx(sums)
    finally:
        done.set()
        p.join(60)


@pytest.mark.parametrize("method", ["dma", "kernel", "push"])
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
        assert torch.equal(
            s.index_select(page_dim, torch.tensor(sp, device=s.device)).to(dev),
            d.index_select(page_dim, torch.tensor(dp, device=dev)),
        )


def _two_gpus():
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    return torch.device("cuda", 0), torch.device("cuda", 1)


def test_push_runs_on_the_sources_gpu_in_order_on_the_callers_stream(gpu):
    """'push' from GPU 0 into GPU 1, on a stream of GPU 1: the kernel runs on GPU 0 (push_device),
    after the stream's earlier work (a delayed fill it must not be overwritten by) and before its
    later work (a clone that must see every byte)."""
    import torch
    from kvtier import _core
    from kvtier.p2p.cuda_ipc import copy_pages

    d0, d1 = _two_gpus()
    g = torch.Generator(device=d0).manual_seed(9)
    src = [torch.randn(2, 64, 16, 8, 128, device=d0, generator=g).to(torch.bfloat16) for _ in range(16)]
    dst = [torch.zeros(2, 64, 16, 8, 128, device=d1, dtype=torch.bfloat16) for _ in range(16)]  # 64 MiB
    assert _core.push_device(1, src[0].data_ptr()) == 0
    assert _core.push_device(1, dst[0].data_ptr()) == 1  # sources on the copying GPU: 'kernel'
    sp, dp = list(range(3, 51)), list(range(10, 58))
    stream = torch.cuda.Stream(d1)
    for _ in range(2):  # the second time with the push stream and peer access already there
        with torch.cuda.stream(stream):
            torch.cuda._sleep(20_000_000)  # the fill lands long after the copy was queued
            for d in dst:
                d.fill_(7)
        assert copy_pages(src, dst, sp, dp, stream=stream, method="push") == "push"
        with torch.cuda.stream(stream):
            out = [d.clone() for d in dst]
        torch.cuda.synchronize(d1)
        for s, o in zip(src, out):
            assert torch.equal(s[:, sp].to(d1), o[:, dp])
            assert bool((o[:, :10] == 7).all())


def test_push_both_ways_on_the_default_stream_keeps_the_current_gpu(gpu):
    """'push' both ways between GPU 0 and 1 on the legacy default stream (0), from a fresh thread
    whose current GPU is 0: the copy lands, and the thread's current GPU is left as it was."""
    import threading

    import torch
    from kvtier.p2p.cuda_ipc import copy_pages

    d0, d1 = _two_gpus()
    errors = []

    def run():
        try:
            torch.cuda.set_device(d0)
            for a, b in ((d0, d1), (d1, d0)):
                src = [torch.arange(2 * 8 * 64, device=a, dtype=torch.float32).view(2, 8, 64)]
                dst = [torch.zeros(2, 8, 64, device=b)]
                assert copy_pages(src, dst, [1, 2, 5], [0, 6, 7], method="push") == "push"
                torch.cuda.synchronize(b)
                assert torch.equal(src[0][:, [1, 2, 5]].to(b), dst[0][:, [0, 6, 7]])
                assert torch.cuda.current_device() == 0
        except Exception as e:  # noqa: BLE001 - reported by the test's thread
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(120)
    assert not errors, errors
