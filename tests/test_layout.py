"""Tests for kvtier.layout: every constructor's segments, checked byte by byte against torch."""

import ctypes
import math
from types import SimpleNamespace

import numpy as np
import pytest
from kvtier.errors import InvalidArgumentError
from kvtier.layout import FINGERPRINT_BYTES, Layout, Segment, Shard

torch = pytest.importorskip("torch")

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn]
PAGE_TOKENS = [1, 16, 64]
KINDS = ["vllm", "flashinfer_nhd", "flashinfer_hnd", "mla", "hf", "cross_layer"]

LAYERS, HEADS, HEAD_DIM, LATENT_DIM, NUM_PAGES = 2, 2, 8, 24, 6


def random_tensor(shape, dtype, strides=None, seed=0, device="cpu"):
    """A tensor of random bytes (every page distinct); with ``strides``, a strided view into a
    larger random buffer, so the gaps between pages hold bytes a wrong pointer would read."""
    if strides is None:
        numel = math.prod(shape)
    else:
        numel = 1 + sum((n - 1) * s for n, s in zip(shape, strides))
    esize = torch.empty(0, dtype=dtype).element_size()
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (numel * esize,), dtype=torch.uint8, generator=gen)
    flat = raw.to(device).view(dtype)
    if strides is None:
        return flat.view(shape)
    return flat.as_strided(shape, strides)


def memory_at(ptr, nbytes):
    return ctypes.string_at(ptr, nbytes)


def tensor_bytes(t):
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def make(kind, dtype, page_tokens, padded=False, num_pages=NUM_PAGES, seed=0, device="cpu"):
    """Build ``kind``'s tensors and layout, and ``ref(segment, page) -> torch view of that page``
    computed by plain indexing, independently of the layout's pointer arithmetic."""
    T, H, D, P = page_tokens, HEADS, HEAD_DIM, num_pages
    chunk_tokens = 4 * T

    def tensors(shape, strides):
        return [
            random_tensor(shape, dtype, strides if padded else None, seed=seed + i, device=device)
            for i in range(LAYERS)
        ]

    if kind == "vllm":
        page = T * H * D
        kv = tensors((2, P, T, H, D), (P * (page + 3) + 5, page + 3, H * D, D, 1))
        layout = Layout.from_vllm(kv, chunk_tokens=chunk_tokens)
        return layout, lambda s, p: kv[s // 2][s % 2, p]
    if kind in ("flashinfer_nhd", "flashinfer_hnd"):
        page = T * H * D
        inner = (T, H, D) if kind == "flashinfer_nhd" else (H, T, D)
        kv = tensors((P, 2, *inner), (2 * page + 7, page + 2, inner[1] * D, D, 1))
        layout = Layout.from_flashinfer(kv, kind[-3:].upper(), chunk_tokens=chunk_tokens)
        return layout, lambda s, p: kv[s // 2][p, s % 2]
    if kind == "mla":
        kv = tensors((P, T, LATENT_DIM), (T * LATENT_DIM + 5, LATENT_DIM, 1))
        layout = Layout.from_mla(kv, chunk_tokens=chunk_tokens)
        return layout, lambda s, p: kv[s][p]
    if kind == "hf":
        seq = P * T + (T - 1)  # a partial last page, which the layout must leave out
        max_len = seq + 3  # a StaticCache-like allocation sliced to seq
        strides = (H * max_len * D, max_len * D, D, 1)
        layers = [
            tuple(
                random_tensor(
                    (1, H, seq, D),
                    dtype,
                    strides if padded else None,
                    seed=seed + 2 * i + j,
                    device=device,
                )
                for j in range(2)
            )
            for i in range(LAYERS)
        ]
        layout = Layout.from_hf_cache(layers, page_tokens=T, chunk_tokens=chunk_tokens)

        def ref(s, p):
            layer, rest = divmod(s, 2 * H)
            kv, head = divmod(rest, H)
            return layers[layer][kv][0, head, p * T : (p + 1) * T]

        return layout, ref
    if kind == "cross_layer":
        page = LAYERS * 2 * T * H * D
        pool = random_tensor(
            (P, LAYERS, 2, T, H, D),
            dtype,
            (page + 9, 2 * T * H * D, T * H * D, H * D, D, 1) if padded else None,
            seed=seed,
            device=device,
        )
        layout = Layout.from_cross_layer(pool, chunk_tokens=chunk_tokens)
        return layout, lambda s, p: pool[p]
    raise AssertionError(kind)


EXPECTED_SEGMENTS = {
    "vllm": 2 * LAYERS,
    "flashinfer_nhd": 2 * LAYERS,
    "flashinfer_hnd": 2 * LAYERS,
    "mla": LAYERS,
    "hf": 2 * HEADS * LAYERS,
    "cross_layer": 1,
}


# ---------------------------------------------------------------------------------------------
# Geometry and bytes, every constructor x dtype x page size


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("page_tokens", PAGE_TOKENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("kind", KINDS)
def test_pages_read_through_segments_equal_torch_pages(kind, dtype, page_tokens, padded):
    layout, ref = make(kind, dtype, page_tokens, padded)
    esize = torch.empty(0, dtype=dtype).element_size()

    assert layout.kind == kind
    assert len(layout.segments) == EXPECTED_SEGMENTS[kind]
    assert layout.dtype == str(dtype).removeprefix("torch.")
    assert layout.element_size == esize
    assert layout.page_tokens == page_tokens
    assert layout.pages_per_chunk == 4
    assert layout.num_pages == NUM_PAGES
    assert layout.num_layers == LAYERS
    assert layout.device == "cpu"

    rng = np.random.default_rng(page_tokens)
    pages = sorted({0, NUM_PAGES - 1, *rng.integers(0, NUM_PAGES, 3).tolist()})
    for s, seg in enumerate(layout.segments):
        page0, page1 = ref(s, 0), ref(s, 1)
        # Pointers, stride and size against torch's own view arithmetic.
        assert seg.base_ptr == page0.data_ptr()
        assert seg.page_stride == page1.data_ptr() - page0.data_ptr()
        assert seg.page_bytes == page0.numel() * esize
        assert tuple(page0.shape) == layout.page_shape
        for p in pages:
            expected = ref(s, p)
            assert seg.page_ptr(p) == expected.data_ptr()
            assert memory_at(seg.base_ptr + p * seg.page_stride, seg.page_bytes) == (tensor_bytes(expected)), (
                f"segment {seg.name} page {p}"
            )


@pytest.mark.parametrize("kind", KINDS)
def test_blob_is_segment_major(kind):
    """Assemble one chunk's blob from the segments and compare with torch pages, and check
    that each layer's range of the blob holds exactly that layer's pages."""
    layout, ref = make(kind, torch.float16, 16)
    page_ids = [5, 0, 3, 2]  # a chunk's pages need not be consecutive in the pool
    assert len(page_ids) == layout.pages_per_chunk

    blob = b"".join(memory_at(seg.page_ptr(p), seg.page_bytes) for seg in layout.segments for p in page_ids)
    assert len(blob) == layout.chunk_bytes
    reference = [b"".join(tensor_bytes(ref(s, p)) for p in page_ids) for s in range(len(layout.segments))]
    assert blob == b"".join(reference)

    for s in range(len(layout.segments)):
        start = layout.segment_offset_in_blob(s)
        assert blob[start : start + len(reference[s])] == reference[s]
    assert layout.segment_offset_in_blob(len(layout.segments)) == layout.chunk_bytes

    for layer in range(layout.num_layers):
        offset, length = layout.layer_range_in_blob(layer)
        group = layout.layer_segments(layer)
        assert blob[offset : offset + length] == b"".join(reference[s] for s in group)


def test_vllm_geometry():
    kv = [torch.zeros(2, 10, 16, 4, 32, dtype=torch.bfloat16) for _ in range(3)]
    layout = Layout.from_vllm(kv, page_tokens=16, chunk_tokens=256)
    assert [s.name for s in layout.segments[:2]] == ["layer0.k", "layer0.v"]
    assert layout.layer_segments(2) == (4, 5)
    assert layout.page_shape == (16, 4, 32)
    assert layout.chunk_bytes == 6 * 16 * (16 * 4 * 32 * 2)
    k = layout.segments[0]
    assert layout.segments[1].base_ptr - k.base_ptr == 10 * 16 * 4 * 32 * 2
    assert all(t is u for t, u in zip(layout.tensors, kv))


def test_vllm_accepts_layer_dict():
    kv = {f"model.layers.{i}.attn": torch.zeros(2, 4, 16, 2, 8) for i in range(2)}
    layout = Layout.from_vllm(kv, chunk_tokens=16)
    assert layout.num_layers == 2
    assert layout.segments[2].base_ptr == kv["model.layers.1.attn"].data_ptr()


def test_flashinfer_hnd_page_shape():
    kv = [torch.zeros(8, 2, 4, 16, 64, dtype=torch.float16)]
    layout = Layout.from_flashinfer(kv, kv_layout="HND", chunk_tokens=32)
    assert layout.kind == "flashinfer_hnd"
    assert layout.page_tokens == 16
    assert layout.page_shape == (4, 16, 64)
    k, v = layout.segments
    assert v.base_ptr - k.base_ptr == 4 * 16 * 64 * 2
    assert k.page_stride == 2 * k.page_bytes


def test_mla_one_segment_per_layer():
    kv = [torch.zeros(4, 64, 576, dtype=torch.bfloat16) for _ in range(3)]
    layout = Layout.from_mla(kv, chunk_tokens=256)
    assert [layout.layer_segments(i) for i in range(3)] == [(0,), (1,), (2,)]
    assert layout.chunk_bytes == 3 * 4 * 64 * 576 * 2


def test_hf_segments_per_layer_and_head():
    layers = [(torch.zeros(1, 3, 40, 8), torch.zeros(1, 3, 40, 8)) for _ in range(2)]
    layout = Layout.from_hf_cache(layers, page_tokens=16, chunk_tokens=32)
    assert layout.num_pages == 2  # floor(40 / 16): the partial page is left out
    assert layout.layer_segments(1) == tuple(range(6, 12))
    assert layout.segments[4].name == "layer0.v.head1"
    assert layout.page_shape == (16, 8)
    assert all(s.page_stride == s.page_bytes == 16 * 8 * 4 for s in layout.segments)


def test_hf_accepts_transformers_cache_objects():
    pairs = [(torch.zeros(1, 2, 32, 8), torch.zeros(1, 2, 32, 8)) for _ in range(2)]
    new_style = SimpleNamespace(layers=[SimpleNamespace(keys=k, values=v) for k, v in pairs])
    old_style = SimpleNamespace(key_cache=[k for k, _ in pairs], value_cache=[v for _, v in pairs])
    expected = Layout.from_hf_cache(pairs, page_tokens=16, chunk_tokens=32).to_core_segments()
    for cache in (new_style, old_style):
        assert Layout.from_hf_cache(cache, page_tokens=16, chunk_tokens=32).to_core_segments() == (expected)


def test_cross_layer_single_segment_covers_all_layers():
    pool = torch.zeros(8, 4, 2, 16, 2, 32, dtype=torch.float16)
    layout = Layout.from_cross_layer(pool, chunk_tokens=64)
    (seg,) = layout.segments
    assert layout.num_layers == 4
    assert seg.page_bytes == seg.page_stride == 4 * 2 * 16 * 2 * 32 * 2
    assert all(layout.layer_segments(i) == (0,) for i in range(4))
    assert layout.layer_range_in_blob(2) == (0, layout.chunk_bytes)
    assert layout.page_shape == (4, 2, 16, 2, 32)


def test_size_one_dims_with_odd_strides_are_still_contiguous():
    # torch may report any stride for a size-1 dim; it never moves an address.
    t = torch.zeros(2, 4, 1, 1, 8).as_strided((2, 4, 1, 1, 8), (32, 8, 999, 777, 1))
    layout = Layout.from_vllm([t], chunk_tokens=1)
    assert layout.segments[0].page_bytes == 8 * 4


def test_to_core_segments():
    layout, _ = make("vllm", torch.float32, 16)
    assert layout.to_core_segments() == [
        (s.base_ptr, s.page_stride, s.page_bytes, s.num_pages) for s in layout.segments
    ]


def test_from_segments_splits_layers_evenly():
    segs = [Segment(0x1000 * (i + 1), 256, 256, 4, f"s{i}") for i in range(6)]
    layout = Layout.from_segments(
        segs, page_tokens=8, chunk_tokens=16, dtype="float16", page_shape=(8, 16), num_layers=3
    )
    assert layout.layer_segments(2) == (4, 5)
    assert layout.element_size == 2
    assert layout.chunk_bytes == 6 * 2 * 256
    assert layout.segment_offset_in_blob(3) == 3 * 2 * 256


def test_from_segments_with_different_page_bytes():
    segs = [Segment(0x1000, 512, 512, 4, "a"), Segment(0x9000, 128, 128, 4, "b")]
    layout = Layout.from_segments(segs, page_tokens=4, chunk_tokens=8, dtype="uint8", page_shape=(4, 128), num_layers=1)
    assert layout.segment_offset_in_blob(1) == 2 * 512
    assert layout.chunk_bytes == 2 * 512 + 2 * 128


def test_layout_is_immutable():
    layout, _ = make("mla", torch.float32, 16)
    with pytest.raises(AttributeError):
        layout.chunk_tokens = 512


def test_repr_names_the_essentials():
    layout, _ = make("vllm", torch.bfloat16, 16)
    text = repr(layout)
    assert "vllm" in text and "bfloat16" in text and layout.fingerprint_hex in text


# ---------------------------------------------------------------------------------------------
# Fingerprint


def fingerprint(kind, dtype=torch.float16, page_tokens=16, **kw):
    return make(kind, dtype, page_tokens, **kw)[0].fingerprint


def test_fingerprint_is_16_bytes_and_hex():
    layout, _ = make("vllm", torch.float16, 16)
    assert isinstance(layout.fingerprint, bytes) and len(layout.fingerprint) == FINGERPRINT_BYTES
    assert layout.fingerprint_hex == layout.fingerprint.hex()
    assert len(layout.fingerprint_hex) == 32


@pytest.mark.parametrize("kind", KINDS)
def test_fingerprint_ignores_pointers_strides_and_pool_size(kind):
    base = fingerprint(kind)
    assert fingerprint(kind, seed=99) == base  # other tensors, other pointers
    assert fingerprint(kind, padded=True) == base  # other strides
    assert fingerprint(kind, num_pages=NUM_PAGES + 5) == base  # a bigger pool


@pytest.mark.parametrize("kind", KINDS)
def test_fingerprint_changes_with_dtype_and_page_size(kind):
    seen = {fingerprint(kind, dtype=d, page_tokens=t) for d in DTYPES for t in PAGE_TOKENS}
    assert len(seen) == len(DTYPES) * len(PAGE_TOKENS)


def test_fingerprint_distinguishes_kinds():
    assert len({fingerprint(kind) for kind in KINDS}) == len(KINDS)


def test_fingerprint_distinguishes_nhd_from_hnd_with_equal_page_shapes():
    # heads == page_tokens: the page shapes read alike but the bytes are ordered differently.
    nhd = Layout.from_flashinfer([torch.zeros(4, 2, 8, 8, 16)], "NHD", chunk_tokens=8)
    hnd = Layout.from_flashinfer([torch.zeros(4, 2, 8, 8, 16)], "HND", chunk_tokens=8)
    assert nhd.page_shape == hnd.page_shape
    assert nhd.fingerprint != hnd.fingerprint


def test_fingerprint_changes_with_chunk_tokens():
    kv = [torch.zeros(2, 8, 16, 2, 8)]
    assert Layout.from_vllm(kv, chunk_tokens=256).fingerprint != Layout.from_vllm(kv, chunk_tokens=512).fingerprint


def test_fingerprint_changes_with_same_size_dtypes():
    a = Layout.from_mla([torch.zeros(4, 16, 32, dtype=torch.float16)], chunk_tokens=16)
    b = Layout.from_mla([torch.zeros(4, 16, 32, dtype=torch.bfloat16)], chunk_tokens=16)
    assert a.segments[0].page_bytes == b.segments[0].page_bytes
    assert a.fingerprint != b.fingerprint


def test_fingerprint_changes_with_page_shape_at_equal_page_bytes():
    # 4 heads x 32 dims and 8 heads x 16 dims: same bytes per page, different KV.
    a = Layout.from_vllm([torch.zeros(2, 4, 16, 4, 32)], chunk_tokens=16)
    b = Layout.from_vllm([torch.zeros(2, 4, 16, 8, 16)], chunk_tokens=16)
    assert a.segments[0].page_bytes == b.segments[0].page_bytes
    assert a.fingerprint != b.fingerprint


def _sharded(shard):
    t = torch.zeros(4, 16, 32)
    seg = Segment(t.data_ptr(), t.stride(0) * 4, 16 * 32 * 4, 4, "layer0")
    return Layout.from_segments(
        [seg], page_tokens=16, chunk_tokens=16, dtype="float32", page_shape=(16, 32), shard=shard, tensors=[t]
    )


def test_shard_names_blobs_per_rank_and_keys_per_split():
    plain = _sharded(None)
    assert plain.key_fingerprint == plain.fingerprint  # unsharded: keys as they always were
    assert _sharded(Shard()).fingerprint != plain.fingerprint  # a 1-way split still says so
    tp = [_sharded(Shard(tp_rank=r, tp_size=2)) for r in range(2)]
    pp = [_sharded(Shard(pp_rank=r, pp_size=2)) for r in range(2)]
    # ranks of one split: blobs apart (peers and disk files compare fingerprints), keys alike
    assert tp[0].fingerprint != tp[1].fingerprint and pp[0].fingerprint != pp[1].fingerprint
    assert tp[0].key_fingerprint == tp[1].key_fingerprint and pp[0].key_fingerprint == pp[1].key_fingerprint
    # another split: other keys, other blobs
    assert tp[0].key_fingerprint != pp[0].key_fingerprint and tp[0].fingerprint != pp[0].fingerprint
    assert len({x.fingerprint for x in tp + pp} | {plain.fingerprint}) == 5
    # a second deployment of the same split: the same fingerprints, so it shares shard for shard
    assert _sharded(Shard(tp_rank=1, tp_size=2)).fingerprint == tp[1].fingerprint
    assert Shard(tp_rank=1, tp_size=2, pp_rank=1, pp_size=3).rank == 3
    assert "tp1of2-pp0of1" in repr(tp[1])


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"tp_size": 0}, "tp_size"),
        ({"tp_rank": 2, "tp_size": 2}, "tp_rank"),
        ({"pp_rank": -1}, "pp_rank"),
        ({"pp_size": 1.5}, "pp_size"),
        ({"tp_rank": True, "tp_size": 2}, "tp_rank"),
    ],
)
def test_shard_refuses_bad_ranks(kw, field):
    with pytest.raises(InvalidArgumentError, match=field):
        Shard(**kw)
    with pytest.raises(InvalidArgumentError, match="shard"):
        _sharded((0, 2))


def test_fingerprint_changes_with_layer_count():
    one = Layout.from_mla([torch.zeros(4, 16, 32)], chunk_tokens=16)
    two = Layout.from_mla([torch.zeros(4, 16, 32)] * 2, chunk_tokens=16)
    assert one.fingerprint != two.fingerprint


def test_hf_fingerprint_ignores_sequence_length():
    def hf(seq):
        return Layout.from_hf_cache([(torch.zeros(1, 2, seq, 8), torch.zeros(1, 2, seq, 8))], chunk_tokens=32)

    assert hf(64).fingerprint == hf(4096).fingerprint


# ---------------------------------------------------------------------------------------------
# Errors: every one is a ValueError naming the problem


def vllm_kv(n=2, shape=(2, 4, 16, 2, 8), dtype=torch.float32):
    return [torch.zeros(shape, dtype=dtype) for _ in range(n)]


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: Layout.from_vllm([]), "empty"),
        (lambda: Layout.from_flashinfer([]), "empty"),
        (lambda: Layout.from_mla([]), "empty"),
        (lambda: Layout.from_hf_cache([]), "empty"),
        (lambda: Layout.from_vllm({}), "empty"),
    ],
)
def test_empty_inputs(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_mixed_devices():
    kv = [torch.zeros(2, 4, 16, 2, 8), torch.zeros(2, 4, 16, 2, 8, device="meta")]
    with pytest.raises(ValueError, match="mixed devices"):
        Layout.from_vllm(kv, chunk_tokens=16)


def test_meta_tensors():
    with pytest.raises(ValueError, match="meta"):
        Layout.from_mla([torch.zeros(4, 16, 8, device="meta")], chunk_tokens=16)


@pytest.mark.gpu
def test_mixed_cpu_and_cuda_devices(gpu):
    kv = [torch.zeros(2, 4, 16, 2, 8), torch.zeros(2, 4, 16, 2, 8, device=gpu)]
    with pytest.raises(ValueError, match="mixed devices"):
        Layout.from_vllm(kv, chunk_tokens=16)


@pytest.mark.gpu
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_layout_pointers_match_torch_views(gpu, kind, padded):
    # Device memory cannot be read through ctypes; torch's view pointers are the reference.
    layout, ref = make(kind, torch.bfloat16, 16, padded, device=gpu)
    assert layout.device == str(gpu)
    for s, seg in enumerate(layout.segments):
        for p in range(layout.num_pages):
            assert seg.page_ptr(p) == ref(s, p).data_ptr()
        assert seg.page_bytes == ref(s, 0).numel() * 2
    assert layout.fingerprint == make(kind, torch.bfloat16, 16, padded)[0].fingerprint


def test_mixed_dtypes():
    kv = [torch.zeros(2, 4, 16, 2, 8), torch.zeros(2, 4, 16, 2, 8, dtype=torch.float16)]
    with pytest.raises(ValueError, match=r"mixed dtypes.*float32.*float16"):
        Layout.from_vllm(kv, chunk_tokens=16)


def test_hf_key_value_dtypes_must_match():
    layers = [(torch.zeros(1, 2, 32, 8), torch.zeros(1, 2, 32, 8, dtype=torch.float16))]
    with pytest.raises(ValueError, match=r"mixed dtypes.*layers\[0\]\[1\]"):
        Layout.from_hf_cache(layers, chunk_tokens=32)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (
            lambda: Layout.from_vllm([torch.zeros(2, 4, 16, 2, 8), torch.zeros(2, 5, 16, 2, 8)]),
            r"shapes differ.*kv_caches\[1\]",
        ),
        (
            lambda: Layout.from_mla([torch.zeros(4, 16, 8), torch.zeros(4, 16, 9)]),
            "shapes differ",
        ),
        (
            lambda: Layout.from_hf_cache([(torch.zeros(1, 2, 32, 8), torch.zeros(1, 2, 32, 4))]),
            r"shapes differ.*layers\[0\]\[1\]",
        ),
    ],
)
def test_shapes_differ_between_layers(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: Layout.from_vllm([torch.zeros(4, 16, 2, 8)]), r"rank 4.*expected 5"),
        (lambda: Layout.from_flashinfer([torch.zeros(4, 2, 16, 2)]), r"rank 4.*expected 5"),
        (lambda: Layout.from_mla([torch.zeros(4, 16, 2, 8)]), r"rank 4.*expected 3"),
        (lambda: Layout.from_hf_cache([(torch.zeros(2, 32, 8),) * 2]), r"rank 3.*expected 4"),
        (lambda: Layout.from_cross_layer(torch.zeros(4, 2, 2, 16, 8)), r"rank 5.*expected 6"),
        (lambda: Layout.from_vllm([torch.zeros(3, 4, 16, 2, 8)]), r"dimension 0 must be 2"),
        (lambda: Layout.from_flashinfer([torch.zeros(4, 3, 16, 2, 8)]), r"dimension 1 must be 2"),
        (
            lambda: Layout.from_cross_layer(torch.zeros(4, 2, 3, 16, 2, 8)),
            r"dimension 2 must be 2",
        ),
    ],
)
def test_wrong_rank_or_kv_dimension(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (
            lambda: Layout.from_vllm([torch.zeros(2, 4, 16, 8, 2).transpose(3, 4)]),
            r"kv_caches\[0\].*not contiguous",
        ),
        (
            lambda: Layout.from_flashinfer([torch.zeros(4, 2, 8, 16, 2).transpose(2, 3)]),
            r"kv_caches\[0\].*not contiguous",
        ),
        (
            lambda: Layout.from_mla([torch.zeros(4, 8, 16).transpose(1, 2)]),
            "not contiguous",
        ),
        (
            # [batch, seq, heads, dim] transposed: one head's tokens are heads*dim apart.
            lambda: Layout.from_hf_cache([(torch.zeros(1, 32, 2, 8).transpose(1, 2),) * 2], chunk_tokens=32),
            r"layers\[0\]\[0\].*head's \[seq, head_dim\].*not contiguous",
        ),
        (
            lambda: Layout.from_cross_layer(torch.zeros(4, 2, 2, 16, 8, 2).transpose(4, 5)),
            "not contiguous",
        ),
        (
            # A page with a gap inside: only every other head_dim element.
            lambda: Layout.from_vllm([torch.zeros(2, 4, 16, 2, 16)[..., ::2]]),
            "not contiguous",
        ),
    ],
)
def test_pages_that_are_not_contiguous(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_overlapping_pages_are_rejected():
    t = torch.zeros(1024).as_strided((2, 4, 16, 2, 8), (128, 8, 16, 8, 1))
    with pytest.raises(ValueError, match="overlap"):
        Layout.from_vllm([t], chunk_tokens=16)


@pytest.mark.parametrize("chunk_tokens", [0, -16, 24, 8, 16.0, None, True])
@pytest.mark.parametrize("kind", KINDS)
def test_chunk_tokens_must_be_positive_multiple_of_page_tokens(kind, chunk_tokens):
    builders = {
        "vllm": lambda: Layout.from_vllm(vllm_kv(), chunk_tokens=chunk_tokens),
        "flashinfer_nhd": lambda: Layout.from_flashinfer([torch.zeros(4, 2, 16, 2, 8)], chunk_tokens=chunk_tokens),
        "flashinfer_hnd": lambda: Layout.from_flashinfer(
            [torch.zeros(4, 2, 2, 16, 8)], "HND", chunk_tokens=chunk_tokens
        ),
        "mla": lambda: Layout.from_mla([torch.zeros(4, 16, 8)], chunk_tokens=chunk_tokens),
        "hf": lambda: Layout.from_hf_cache(
            [(torch.zeros(1, 2, 32, 8),) * 2], page_tokens=16, chunk_tokens=chunk_tokens
        ),
        "cross_layer": lambda: Layout.from_cross_layer(torch.zeros(4, 2, 2, 16, 2, 8), chunk_tokens=chunk_tokens),
    }
    with pytest.raises(ValueError, match="chunk_tokens must be a positive multiple"):
        builders[kind]()


@pytest.mark.parametrize(
    "build",
    [
        lambda: Layout.from_vllm(vllm_kv(), page_tokens=32, chunk_tokens=64),
        lambda: Layout.from_flashinfer([torch.zeros(4, 2, 16, 2, 8)], page_tokens=8),
        lambda: Layout.from_mla([torch.zeros(4, 16, 8)], page_tokens=64),
        lambda: Layout.from_cross_layer(torch.zeros(4, 2, 2, 16, 2, 8), page_tokens=1),
    ],
)
def test_page_tokens_mismatch(build):
    with pytest.raises(ValueError, match=r"page_tokens=\d+ does not match"):
        build()


def test_hf_batch_must_be_one():
    with pytest.raises(ValueError, match="batch is 2"):
        Layout.from_hf_cache([(torch.zeros(2, 2, 32, 8),) * 2], chunk_tokens=32)


def test_hf_sequence_shorter_than_a_page():
    with pytest.raises(ValueError, match=r"seq \(10\) is shorter than page_tokens \(16\)"):
        Layout.from_hf_cache([(torch.zeros(1, 2, 10, 8),) * 2])


@pytest.mark.parametrize("page_tokens", [0, -16, 1.5])
def test_hf_bad_page_tokens(page_tokens):
    with pytest.raises(ValueError, match="page_tokens must be a positive int"):
        Layout.from_hf_cache([(torch.zeros(1, 2, 32, 8),) * 2], page_tokens=page_tokens)


def test_hf_layers_must_be_pairs():
    with pytest.raises(ValueError, match=r"layers\[0\] must be a \(key, value\) pair"):
        Layout.from_hf_cache([(torch.zeros(1, 2, 32, 8),)])
    with pytest.raises(ValueError, match="transformers Cache"):
        Layout.from_hf_cache(object())


def test_bad_kv_layout():
    with pytest.raises(ValueError, match="kv_layout"):
        Layout.from_flashinfer([torch.zeros(4, 2, 16, 2, 8)], kv_layout="NDH")


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: Layout.from_vllm([np.zeros((2, 4, 16, 2, 8))]), "must be a torch tensor"),
        (lambda: Layout.from_vllm(torch.zeros(2, 4, 16, 2, 8)), "must be a list"),
        (lambda: Layout.from_cross_layer([torch.zeros(4, 2, 2, 16, 2, 8)]), "one torch tensor"),
        (lambda: Layout.from_vllm([torch.zeros(2, 0, 16, 2, 8)]), "no elements"),
    ],
)
def test_wrong_argument_types(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"base_ptr": 0}, "non-null"),
        ({"page_bytes": 0}, "page_bytes"),
        ({"num_pages": 0}, "num_pages"),
        ({"page_stride": 100}, "overlap"),
        ({"base_ptr": 4096.0}, "base_ptr must be an int"),
        ({"num_pages": True}, "num_pages must be an int"),
    ],
)
def test_segment_validation(kwargs, match):
    fields = {"base_ptr": 4096, "page_stride": 256, "page_bytes": 256, "num_pages": 4, "name": "s"}
    with pytest.raises(ValueError, match=match):
        Segment(**{**fields, **kwargs})


def test_segment_page_ptr_bounds():
    seg = Segment(4096, 256, 128, 4, "s")
    assert seg.page_ptr(3) == 4096 + 3 * 256
    with pytest.raises(ValueError, match="out of range"):
        seg.page_ptr(4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"segments": []}, "segments must not be empty"),
        ({"dtype": "complex32"}, "element size"),
        ({"num_layers": 4}, "num_layers"),
        ({"layer_segments": [(0,), (2, 1)]}, "consecutive"),
        ({"layer_segments": [(0, 1), (2, 3)]}, "outside"),
        ({"page_tokens": 16, "chunk_tokens": 40}, "chunk_tokens"),
        (
            {"segments": [Segment(4096, 256, 256, 4, "a"), Segment(8192, 256, 256, 5, "b")]},
            "different num_pages",
        ),
    ],
)
def test_from_segments_validation(kwargs, match):
    args = {
        "segments": [Segment(4096, 256, 256, 4, "a"), Segment(8192, 256, 256, 4, "b")],
        "page_tokens": 8,
        "chunk_tokens": 16,
        "dtype": "float16",
        "page_shape": (8, 16),
        **kwargs,
    }
    with pytest.raises(ValueError, match=match):
        Layout.from_segments(**args)


def test_layer_and_segment_index_bounds():
    layout, _ = make("vllm", torch.float32, 16)
    with pytest.raises(ValueError, match="layer"):
        layout.layer_segments(LAYERS)
    with pytest.raises(ValueError, match="segment"):
        layout.segment_offset_in_blob(len(layout.segments) + 1)


def test_bad_layouts_raise_kvtiers_typed_error():
    from kvtier.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="page_bytes"):
        Segment(base_ptr=0x1000, page_stride=64, page_bytes=0, num_pages=2, name="x")
    seg = Segment(base_ptr=0x1000, page_stride=64, page_bytes=64, num_pages=2, name="x")
    with pytest.raises(InvalidArgumentError, match="out of range"):
        seg.page_ptr(2)
