"""Tests for kvtier._core.CopyEngine: gather/scatter round trips against a plain torch reference.

Layouts x dtypes x page sizes x random page ids, bit-exact, on the CPU path here and with every
CUDA method (direct, staged, zero_copy, auto) under the ``gpu`` marker. Also: bad input, layer-wise
waits, deadlines, ordering after a caller's stream, and concurrent transfers from several threads.

Segments are built here from torch strides, independently of ``kvtier.layout``, so the two
descriptions check each other where both exist.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import pytest

torch = pytest.importorskip("torch")

from kvtier import _core
from kvtier.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    UnavailableError,
)

LAYERS, HEADS, DIM, NUM_PAGES = 3, 2, 8, 24
PPC, CHUNKS = 2, 3  # pages per chunk, chunks per transfer
TIMEOUT_S = 30.0

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn]
PAGE_TOKENS = [1, 16, 64]
METHODS = ["direct", "staged", "zero_copy", "auto"]


def _cuda_ok() -> bool:
    try:
        return torch.cuda.is_available() and torch.cuda.device_count() > 0
    except RuntimeError:  # a broken driver means no GPU here
        return False


# ---- layouts -------------------------------------------------------------------------------------
# Each layout makes its tensors, describes them as segments, and gathers / scatters one chunk with
# plain torch indexing on uint8 views (the reference).


@dataclass
class Kv:
    tensors: list  # the model's KV tensors
    segments: list  # [(base, page_stride, page_bytes, num_pages)]
    layer_segments: list  # [[segment index]] per layer

    @property
    def blob_bytes(self) -> int:
        return sum(s[2] for s in self.segments) * PPC


def _u8(t):
    return t.view(torch.uint8)


def _seg(t, byte_offset: int, page_stride: int, page_bytes: int) -> tuple[int, int, int, int]:
    return (t.data_ptr() + byte_offset, page_stride, page_bytes, NUM_PAGES)


def _random_fill(tensors, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for t in tensors:
        u = _u8(t)
        u.copy_(torch.randint(0, 256, u.shape, dtype=torch.uint8, generator=g).to(u.device))


class Vllm:
    """Per layer [2, num_pages, page_tokens, heads, dim]; a segment per (layer, K/V)."""

    name = "vllm"

    def make(self, dtype, pt, device):
        tensors = [torch.zeros(2, NUM_PAGES, pt, HEADS, DIM, dtype=dtype, device=device) for _ in range(LAYERS)]
        es = tensors[0].element_size()
        segs = []
        for t in tensors:
            for kv in range(2):
                segs.append(_seg(t, kv * t.stride(0) * es, t.stride(1) * es, pt * HEADS * DIM * es))
        return Kv(tensors, segs, [[2 * i, 2 * i + 1] for i in range(LAYERS)])

    def views(self, kv, layer):  # one [num_pages, page_bytes] view per segment of the layer
        u = _u8(kv.tensors[layer])
        return [u[k].reshape(NUM_PAGES, -1) for k in range(2)]


class FlashInferNhd:
    """Per layer [num_pages, 2, page_tokens, heads, dim]; a segment per (layer, K/V)."""

    name = "flashinfer_nhd"

    def make(self, dtype, pt, device):
        tensors = [torch.zeros(NUM_PAGES, 2, pt, HEADS, DIM, dtype=dtype, device=device) for _ in range(LAYERS)]
        es = tensors[0].element_size()
        segs = []
        for t in tensors:
            for kv in range(2):
                segs.append(_seg(t, kv * t.stride(1) * es, t.stride(0) * es, pt * HEADS * DIM * es))
        return Kv(tensors, segs, [[2 * i, 2 * i + 1] for i in range(LAYERS)])

    def views(self, kv, layer):
        u = _u8(kv.tensors[layer])
        return [u[:, k].reshape(NUM_PAGES, -1) for k in range(2)]


class Mla:
    """Per layer [num_pages, page_tokens, latent]; one segment per layer."""

    name = "mla"
    latent = 72

    def make(self, dtype, pt, device):
        tensors = [torch.zeros(NUM_PAGES, pt, self.latent, dtype=dtype, device=device) for _ in range(LAYERS)]
        es = tensors[0].element_size()
        segs = [_seg(t, 0, t.stride(0) * es, pt * self.latent * es) for t in tensors]
        return Kv(tensors, segs, [[i] for i in range(LAYERS)])

    def views(self, kv, layer):
        return [_u8(kv.tensors[layer]).reshape(NUM_PAGES, -1)]


class HfContiguous:
    """Per layer K and V, each [1, heads, seq, dim]; a page is page_tokens tokens of one head, so
    a segment per (layer, K/V, head)."""

    name = "hf"

    def make(self, dtype, pt, device):
        seq = NUM_PAGES * pt
        tensors = []
        segs = []
        layers = []
        for _ in range(LAYERS):
            group = []
            for _ in range(2):
                t = torch.zeros(1, HEADS, seq, DIM, dtype=dtype, device=device)
                es = t.element_size()
                tensors.append(t)
                for h in range(HEADS):
                    group.append(len(segs))
                    segs.append(_seg(t, h * t.stride(1) * es, pt * t.stride(2) * es, pt * DIM * es))
            layers.append(group)
        return Kv(tensors, segs, layers)

    def views(self, kv, layer):
        out = []
        for t in kv.tensors[2 * layer : 2 * layer + 2]:
            u = _u8(t)
            out += [u[0, h].reshape(NUM_PAGES, -1) for h in range(HEADS)]
        return out


class CrossLayer:
    """kvtier's pool: [num_pages, layers, 2, page_tokens, heads, dim], one segment; every layer
    lists it (a page holds all layers), as kvtier.layout describes such a pool."""

    name = "cross_layer"

    def make(self, dtype, pt, device):
        t = torch.zeros(NUM_PAGES, LAYERS, 2, pt, HEADS, DIM, dtype=dtype, device=device)
        es = t.element_size()
        segs = [_seg(t, 0, t.stride(0) * es, LAYERS * 2 * pt * HEADS * DIM * es)]
        return Kv([t], segs, [[0] for _ in range(LAYERS)])

    def views(self, kv, layer):
        return [_u8(kv.tensors[0]).reshape(NUM_PAGES, -1)]

    num_copy_layers = 1  # every layer is the one segment


LAYOUTS = [Vllm(), FlashInferNhd(), Mla(), HfContiguous(), CrossLayer()]


def _all_views(layout, kv):
    """One [num_pages, page_bytes] uint8 view per segment, in segment (blob) order."""
    n = getattr(layout, "num_copy_layers", LAYERS)
    return [v for layer in range(n) for v in layout.views(kv, layer)]


def ref_gather(layout, kv, pages) -> torch.Tensor:
    """The blob of one chunk: segment-major, pages in chunk order."""
    idx = torch.tensor(pages, dtype=torch.long, device=kv.tensors[0].device)
    return torch.cat([v[idx].reshape(-1) for v in _all_views(layout, kv)]).cpu()


def ref_scatter(layout, kv, blob: torch.Tensor, pages) -> None:
    idx = torch.tensor(pages, dtype=torch.long, device=kv.tensors[0].device)
    blob = blob.to(kv.tensors[0].device)
    offset = 0
    for v in _all_views(layout, kv):
        n = len(pages) * v.shape[1]
        v[idx] = blob[offset : offset + n].reshape(len(pages), -1)
        offset += n


def _check_segments_match_tensors(layout, kv):
    """The hand-built segments and the torch views agree on where each page is."""
    for (base, stride, nbytes, _), v in zip(kv.segments, _all_views(layout, kv), strict=True):
        assert v.data_ptr() == base and v.shape[1] == nbytes
        assert v.stride(0) == stride or NUM_PAGES == 1


def _blobs(device_kind: str, bb: int, fill: int = 0xEE) -> torch.Tensor:
    b = torch.full((CHUNKS, bb), fill, dtype=torch.uint8)
    return b.pin_memory() if device_kind == "cuda" else b


def _ptrs(blobs: torch.Tensor) -> list[int]:
    return [blobs[c].data_ptr() for c in range(blobs.shape[0])]


def _device_index(device: str) -> int:
    return torch.device(device).index or 0 if device != "cpu" else -1


def _engine(kv, device, method="auto", **kw):
    return _core.CopyEngine(kv.segments, _device_index(device), PPC, kv.layer_segments, method=method, **kw)


def _round_trip(layout, dtype, pt, device, method, seed=0, **engine_kw):
    g = torch.Generator().manual_seed(seed)
    src = torch.randperm(NUM_PAGES, generator=g)[: CHUNKS * PPC].tolist()
    dst = torch.randperm(NUM_PAGES, generator=g)[: CHUNKS * PPC].tolist()

    kv = layout.make(dtype, pt, device)
    _random_fill(kv.tensors, seed + 1)
    _check_segments_match_tensors(layout, kv)
    engine = _engine(kv, device, method, **engine_kw)
    assert engine.blob_bytes == kv.blob_bytes
    if device == "cpu":
        assert engine.method == "cpu"
    elif method != "auto":
        assert engine.method == method
    blobs = _blobs("cuda" if device != "cpu" else "cpu", kv.blob_bytes)

    t = engine.gather(src, _ptrs(blobs))
    t.wait(TIMEOUT_S)
    assert t.done
    for c in range(CHUNKS):
        want = ref_gather(layout, kv, src[c * PPC : (c + 1) * PPC])
        assert torch.equal(blobs[c], want), f"gather: chunk {c} differs from the torch reference"

    # Scatter into a zeroed cache at other pages; compare every byte with the torch scatter.
    kv2 = layout.make(dtype, pt, device)
    expected = layout.make(dtype, pt, device)
    engine2 = _engine(kv2, device, method, **engine_kw)
    t = engine2.scatter(_ptrs(blobs), dst)
    t.wait(TIMEOUT_S)
    for c in range(CHUNKS):
        ref_scatter(layout, expected, blobs[c], dst[c * PPC : (c + 1) * PPC])
    for got, want in zip(kv2.tensors, expected.tensors, strict=True):
        assert torch.equal(_u8(got), _u8(want)), "scatter differs from the torch reference"


# ---- CPU path ------------------------------------------------------------------------------------


@pytest.mark.parametrize("pt", PAGE_TOKENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.name)
def test_cpu_round_trip_is_bit_exact(layout, dtype, pt):
    _round_trip(layout, dtype, pt, "cpu", "auto", seed=pt)


@pytest.mark.parametrize("threads", [1, 4])
def test_cpu_round_trip_with_threads_and_single_layer(threads):
    layout = CrossLayer()
    kv = layout.make(torch.bfloat16, 16, "cpu")
    _random_fill(kv.tensors, 5)
    engine = _core.CopyEngine(kv.segments, -1, PPC, [], cpu_threads=threads)
    blobs = _blobs("cpu", kv.blob_bytes)
    pages = [5, 6, 7, 1, 0, 23]
    t = engine.gather(pages, _ptrs(blobs))
    assert t.num_layers == 1 and t.method == "cpu"
    t.wait(TIMEOUT_S)
    for c in range(CHUNKS):
        assert torch.equal(blobs[c], ref_gather(layout, kv, pages[c * PPC : (c + 1) * PPC]))


def test_gather_may_read_a_page_twice():
    layout = Vllm()
    kv = layout.make(torch.float16, 16, "cpu")
    _random_fill(kv.tensors, 6)
    engine = _engine(kv, "cpu")
    blobs = _blobs("cpu", kv.blob_bytes)
    pages = [3, 3, 3, 9, 9, 3]
    engine.gather(pages, _ptrs(blobs)).wait(TIMEOUT_S)
    for c in range(CHUNKS):
        assert torch.equal(blobs[c], ref_gather(layout, kv, pages[c * PPC : (c + 1) * PPC]))


def test_bad_requests_raise_naming_the_problem_and_change_nothing():
    layout = Vllm()
    kv = layout.make(torch.float32, 16, "cpu")
    _random_fill(kv.tensors, 7)
    before = [t.clone() for t in kv.tensors]
    engine = _engine(kv, "cpu")
    blobs = _blobs("cpu", kv.blob_bytes)
    ptrs = _ptrs(blobs)

    with pytest.raises(InvalidArgumentError, match=r"page id 24 \(page_ids\[5\]\) is out of range \[0, 24\)"):
        engine.gather([0, 1, 2, 3, 4, 24], ptrs)
    with pytest.raises(ValueError, match=r"page id -1"):  # InvalidArgumentError is a ValueError
        engine.scatter(ptrs, [0, 1, 2, 3, 4, -1])
    with pytest.raises(InvalidArgumentError, match=r"page_ids has 5 entries"):
        engine.gather([0, 1, 2, 3, 4], ptrs)
    with pytest.raises(InvalidArgumentError, match=r"page id 3 is repeated in the scatter"):
        engine.scatter(ptrs, [3, 1, 2, 3, 4, 5])
    with pytest.raises(InvalidArgumentError, match=r"blobs\[1\] is null"):
        engine.gather([0, 1, 2, 3, 4, 5], [ptrs[0], 0, ptrs[2]])
    with pytest.raises(InvalidArgumentError, match=r"after_stream"):
        engine.gather([0, 1, 2, 3, 4, 5], ptrs, after_stream=1234)
    for t, b in zip(kv.tensors, before, strict=True):
        assert torch.equal(_u8(t), _u8(b))
    assert torch.all(blobs == 0xEE)

    t = engine.scatter(ptrs, [0, 1, 2, 3, 4, 5])
    with pytest.raises(InvalidArgumentError, match=r"layer 3 is out of range \[0, 3\)"):
        t.wait_layer(3, 1.0)
    with pytest.raises(InvalidArgumentError, match=r"timeout_s"):
        t.wait(-1.0)
    with pytest.raises(InvalidArgumentError, match=r"timeout_s"):
        t.wait(math.nan)
    with pytest.raises(UnavailableError, match=r"CPU path"):
        t.stream_wait_layer(0, 0)
    t.wait(TIMEOUT_S)  # the engine stays usable after every error above
    assert t.done


def test_bad_engines_raise_naming_the_problem():
    layout = Vllm()
    kv = layout.make(torch.float32, 16, "cpu")
    with pytest.raises(InvalidArgumentError, match=r"method must be"):
        _core.CopyEngine(kv.segments, -1, PPC, kv.layer_segments, method="fast")
    with pytest.raises(InvalidArgumentError, match=r"needs KV on a GPU"):
        _core.CopyEngine(kv.segments, -1, PPC, kv.layer_segments, method="staged")
    with pytest.raises(InvalidArgumentError, match=r"segment 5 is in no layer"):
        _core.CopyEngine(kv.segments, -1, PPC, [[0, 1], [2, 3], [4]])
    with pytest.raises(InvalidArgumentError, match=r"lists segment 9"):
        _core.CopyEngine(kv.segments, -1, PPC, [[0, 1], [2, 3], [4, 5, 9]])
    with pytest.raises(InvalidArgumentError, match=r"pages_per_chunk"):
        _core.CopyEngine(kv.segments, -1, 0, kv.layer_segments)
    with pytest.raises(InvalidArgumentError, match=r"segment 2: page_stride"):
        segs = list(kv.segments)
        segs[2] = (segs[2][0], segs[2][2] // 2, segs[2][2], segs[2][3])
        _core.CopyEngine(segs, -1, PPC, kv.layer_segments)
    with pytest.raises(InvalidArgumentError, match=r"cpu_threads"):
        _core.CopyEngine(kv.segments, -1, PPC, kv.layer_segments, cpu_threads=0)


@pytest.mark.skipif(_cuda_ok(), reason="covers machines without a GPU")
def test_gpu_layout_without_a_gpu_is_unavailable():
    with pytest.raises(UnavailableError):
        _core.CopyEngine([(1 << 20, 64, 64, 8)], 0, 1, [])


def _big_vllm(device: str, pt=16, num_pages=256, heads=8, dim=128):
    """Llama-like per-layer KV: LAYERS x [2, num_pages, pt, heads, dim] bf16 (pages of 32 KiB)."""
    tensors = [torch.empty(2, num_pages, pt, heads, dim, dtype=torch.bfloat16, device=device) for _ in range(LAYERS)]
    es = 2
    segs = [
        (t.data_ptr() + k * t.stride(0) * es, t.stride(1) * es, pt * heads * dim * es, num_pages)
        for t in tensors
        for k in range(2)
    ]
    return tensors, segs, [[2 * i, 2 * i + 1] for i in range(LAYERS)]


def _layer_wise_scatter(device: str, method: str) -> None:
    tensors, segs, layers = _big_vllm(device)
    for t in tensors:
        t.zero_()
    ppc, chunks = 16, 8
    engine = _core.CopyEngine(segs, _device_index(device), ppc, layers, method=method)
    bb = engine.blob_bytes
    blobs = torch.randint(0, 256, (chunks, bb), dtype=torch.uint8)
    if device != "cpu":
        blobs = blobs.pin_memory()
    pages = torch.randperm(256)[: chunks * ppc].tolist()
    t = engine.scatter(_ptrs(blobs), pages)
    assert t.num_layers == LAYERS
    seg_bytes = segs[0][2] * ppc
    idx = torch.tensor(pages, device=device)
    for layer in range(LAYERS):
        t.wait_layer(layer, TIMEOUT_S)
        # Layer `layer` has landed: its pages hold the blob bytes, whatever later layers do.
        u = _u8(tensors[layer])
        for k in range(2):
            got = u[k][idx].reshape(chunks, -1).cpu()
            off = (2 * layer + k) * seg_bytes
            assert torch.equal(got, blobs[:, off : off + seg_bytes]), f"layer {layer} not landed"
    t.wait(TIMEOUT_S)


def test_cpu_wait_layer_delivers_each_layer():
    _layer_wise_scatter("cpu", "auto")


def _tiny_timeout(device: str, method: str) -> None:
    _tensors, segs, layers = _big_vllm(device, num_pages=1024)  # _tensors: kept alive meanwhile
    ppc, chunks = 64, 16  # 16 chunks x 6 MiB = 96 MiB
    engine = _core.CopyEngine(segs, _device_index(device), ppc, layers, method=method)
    blobs = torch.empty((chunks, engine.blob_bytes), dtype=torch.uint8)
    if device != "cpu":
        blobs = blobs.pin_memory()
    t = engine.gather(torch.randperm(1024)[: chunks * ppc].tolist(), _ptrs(blobs))
    for wait in (lambda: t.wait(0.0), lambda: t.wait(1e-6), lambda: t.wait_layer(LAYERS - 1, 1e-6)):
        try:
            wait()
        except DeadlineExceededError:
            pass  # the copy goes on; the wait returned on time
    t.wait(TIMEOUT_S)
    assert t.done


def test_cpu_tiny_timeout_does_not_hang():
    _tiny_timeout("cpu", "auto")


def _concurrent(device: str, method: str) -> None:
    layout = Vllm()
    kv = layout.make(torch.bfloat16, 16, device)
    _random_fill(kv.tensors, 8)
    original = [t.clone() for t in kv.tensors]
    engine = _engine(kv, device, method)
    nthreads = 4
    perm = torch.randperm(NUM_PAGES, generator=torch.Generator().manual_seed(9)).tolist()
    per = NUM_PAGES // nthreads  # 6 pages = 3 chunks of 2 per thread
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            mine = perm[i * per : (i + 1) * per]
            blobs = _blobs("cuda" if device != "cpu" else "cpu", kv.blob_bytes)
            for _ in range(10):
                engine.gather(mine, _ptrs(blobs)).wait(TIMEOUT_S)
                for c in range(CHUNKS):
                    assert torch.equal(blobs[c], ref_gather(layout, kv, mine[c * PPC : (c + 1) * PPC]))
                # Chunks swap places and swap back: pages end as they began.
                t = engine.scatter(_ptrs(blobs)[::-1], mine)
                for layer in range(LAYERS):  # layer waits from this (fresh) thread too
                    t.wait_layer(layer, TIMEOUT_S)
                t.wait(TIMEOUT_S)
                engine.gather(mine, _ptrs(blobs)).wait(TIMEOUT_S)
                engine.scatter(_ptrs(blobs)[::-1], mine).wait(TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 -- the main thread reports it
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not any(th.is_alive() for th in threads), "a transfer thread hung"
    assert not errors, errors[0]
    for t, o in zip(kv.tensors, original, strict=True):
        assert torch.equal(_u8(t), _u8(o))


def test_cpu_concurrent_transfers_from_threads():
    _concurrent("cpu", "auto")


def test_layout_module_agrees_where_present():
    """kvtier.layout (a teammate's) and these hand-built segments describe the same bytes."""
    layout_mod = pytest.importorskip("kvtier.layout")
    kv = Vllm().make(torch.bfloat16, 16, "cpu")
    try:
        lay = layout_mod.Layout.from_vllm(kv.tensors, chunk_tokens=16 * PPC)
        core_segments = lay.to_core_segments()
        layers = [list(lay.layer_segments(i)) for i in range(lay.num_layers)]
    except (AttributeError, TypeError) as e:
        pytest.skip(f"kvtier.layout has another API now: {e}")
    assert core_segments == kv.segments
    assert layers == kv.layer_segments


# ---- GPU path ------------------------------------------------------------------------------------

gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pt", PAGE_TOKENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.name)
def test_gpu_round_trip_is_bit_exact(layout, dtype, pt, method):
    if not _cuda_ok():
        pytest.skip("SKIPPED (needs a CUDA GPU)")
    _round_trip(layout, dtype, pt, "cuda:0", method, seed=pt + 100)


@gpu
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.name)
def test_gpu_staged_with_a_small_staging_area_fills_many_times(layout):
    if not _cuda_ok():
        pytest.skip("SKIPPED (needs a CUDA GPU)")
    kv = layout.make(torch.float32, 16, "cpu")
    largest = max(s[2] for s in kv.segments)
    # Four slots of one or two pages: every transfer takes many fills of both slots.
    _round_trip(layout, torch.float32, 16, "cuda:0", "staged", seed=7, staging_bytes=4 * (largest + 256))


@gpu
@pytest.mark.parametrize("method", METHODS)
def test_gpu_wait_layer_delivers_each_layer(method):
    if not _cuda_ok():
        pytest.skip("SKIPPED (needs a CUDA GPU)")
    _layer_wise_scatter("cuda:0", method)


@gpu
@pytest.mark.parametrize("method", METHODS)
def test_gpu_tiny_timeout_does_not_hang(method):
    if not _cuda_ok():
        pytest.skip("SKIPPED (needs a CUDA GPU)")
    _tiny_timeout("cuda:0", method)


@gpu
@pytest.mark.parametrize("method", METHODS)
def test_gpu_concurrent_transfers_from_threads(method):
    if not _cuda_ok():
        pytest.skip("SKIPPED (needs a CUDA GPU)")
    _concurrent("cuda:0", method)


SLEEP_CYCLES = 200_000_000  # ~100 ms of GPU time: long enough that a missing wait shows


@gpu
@pytest.mark.parametrize("method", METHODS)
def test_gpu_gather_runs_after_the_callers_stream(method):
    if not _cuda_ok():
        pytest.skip("SKIPPED (needs a CUDA GPU)")
    layout = Vllm()
    kv = layout.make(torch.bfloat16, 16, "cuda:0")
    _random_fill(kv.tensors, 10)
    fresh = [torch.randint(0, 256, _u8(t).shape, dtype=torch.uint8, device="cuda:0") for t in kv.tensors]
    torch.cuda.synchronize()
    engine = _engine(kv, "cuda:0", method)
    blobs = _blobs("cuda", kv.blob_bytes)
    pages = [4, 9, 13, 2, 20, 7]
    compute = torch.cuda.Stream()
    with torch.cuda.stream(compute):  # the "model" writes new KV after a delay
        torch.cuda._sleep(SLEEP_CYCLES)
        for t, f in zip(kv.tensors, fresh, strict=True):
            _u8(t).copy_(f)
    t = engine.gather(pages, _ptrs(blobs), after_stream=compute.cuda_stream)
    t.wait(TIMEOUT_S)
    for c in range(CHUNKS):
        want = ref_gather(layout, kv, pages[c * PPC : (c + 1) * PPC])
        assert torch.equal(blobs[c], want), "gather read KV before the caller's stream wrote it"


@gpu
@pytest.mark.parametrize("method", METHODS)
def test_gpu_scatter_after_stream_and_stream_wait_layer(method):
    if not _cuda_ok():
        pytest.skip("SKIPPED (needs a CUDA GPU)")
    layout = Vllm()
    kv = layout.make(torch.float16, 16, "cuda:0")
    _random_fill(kv.tensors, 11)
    torch.cuda.synchronize()
    engine = _engine(kv, "cuda:0", method)
    blobs = torch.randint(0, 256, (CHUNKS, kv.blob_bytes), dtype=torch.uint8).pin_memory()
    pages = [1, 5, 8, 22, 17, 0]
    compute = torch.cuda.Stream()
    with torch.cuda.stream(compute):  # the "model" zeroes KV after a delay; the scatter must follow
        torch.cuda._sleep(SLEEP_CYCLES)
        for t in kv.tensors:
            t.zero_()
    t = engine.scatter(_ptrs(blobs), pages, after_stream=compute.cuda_stream)
    # Another stream reads layer 1 once the device says it landed, without a host wait.
    reader = torch.cuda.Stream()
    t.stream_wait_layer(1, reader.cuda_stream)
    idx = torch.tensor(pages, device="cuda:0")
    with torch.cuda.stream(reader):
        snapshot = _u8(kv.tensors[1])[:, idx].clone()
    reader.synchronize()
    t.wait(TIMEOUT_S)
    expected = layout.make(torch.float16, 16, "cuda:0")
    for c in range(CHUNKS):
        ref_scatter(layout, expected, blobs[c], pages[c * PPC : (c + 1) * PPC])
    torch.cuda.synchronize()
    for got, want in zip(kv.tensors, expected.tensors, strict=True):
        assert torch.equal(_u8(got), _u8(want)), "scatter ran before the caller's stream, or was overwritten"
    assert torch.equal(snapshot, _u8(expected.tensors[1])[:, idx]), "stream_wait_layer did not order the reader"


@gpu
def test_gpu_zero_copy_rejects_pageable_blobs_and_bad_layouts():
    if not _cuda_ok():
        pytest.skip("SKIPPED (needs a CUDA GPU)")
    layout = Vllm()
    kv = layout.make(torch.float32, 16, "cuda:0")
    engine = _engine(kv, "cuda:0", "zero_copy")
    pageable = torch.zeros((CHUNKS, kv.blob_bytes), dtype=torch.uint8)
    with pytest.raises(InvalidArgumentError, match=r"pinned"):
        engine.gather([0, 1, 2, 3, 4, 5], _ptrs(pageable))
    host = layout.make(torch.float32, 16, "cpu")  # host memory described as GPU 0's
    with pytest.raises(InvalidArgumentError, match=r"not memory of GPU 0"):
        _core.CopyEngine(host.segments, 0, PPC, host.layer_segments)
    with pytest.raises(InvalidArgumentError, match=r"staging_bytes"):
        _engine(kv, "cuda:0", "staged", staging_bytes=1024)
    with pytest.raises(InvalidArgumentError, match=r"method 'cpu'"):
        _engine(kv, "cuda:0", "cpu")
    # The engine is still usable.
    blobs = _blobs("cuda", kv.blob_bytes)
    engine.gather([0, 1, 2, 3, 4, 5], _ptrs(blobs)).wait(TIMEOUT_S)


@gpu
def test_gpu_auto_picks_direct_for_large_pages_and_staged_for_small():
    if not _cuda_ok():
        pytest.skip("SKIPPED (needs a CUDA GPU)")
    small = Vllm().make(torch.bfloat16, 16, "cuda:0")  # 512-byte pages
    assert _engine(small, "cuda:0").method == "staged"
    assert _engine(small, "cuda:0", staging_bytes=0).method == "zero_copy"
    pool = torch.zeros(8, 32, 2, 16, 8, 128, dtype=torch.bfloat16, device="cuda:0")  # 2 MiB pages
    es = pool.element_size()
    segs = [(pool.data_ptr(), pool.stride(0) * es, pool.stride(0) * es, 8)]
    assert _core.CopyEngine(segs, 0, 2, []).method == "direct"
