"""kvtier.codecs: lossless round trips bit-exact, fp8 within e4m3's error bound, every damaged,
cut or foreign blob refused, bad tensors refused; the same round trips on CUDA (marker gpu)."""

from __future__ import annotations

import math
import struct
import zlib

import pytest

torch = pytest.importorskip("torch")

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvtier.codecs import HEADER_ALIGN, ByteplaneZstdCodec, Fp8Codec, codec_names, make_codec, read_header
from kvtier.errors import CorruptionError, InvalidArgumentError, UnavailableError

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
INT_VIEW = {2: torch.int16, 4: torch.int32}


def lossless_codecs():
    out = [make_codec("none")]
    try:
        import zstandard  # noqa: F401
    except ImportError:
        return out
    return out + [make_codec("byteplane_zstd"), make_codec("byteplane_zstd", coded_planes=4, level=3)]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = INT_VIEW[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(ints).cpu(), b.view(ints).cpu())


def random_bits(shape, dtype, seed: int) -> torch.Tensor:
    """Every bit pattern equally likely: NaNs with any payload, infinities, -0.0, subnormals."""
    gen = torch.Generator().manual_seed(seed)
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(-(2 ** (8 * size - 1)), 2 ** (8 * size - 1), shape, generator=gen, dtype=torch.int64)
    return raw.to(INT_VIEW[size]).view(dtype)


def special_values(dtype) -> torch.Tensor:
    fi = torch.finfo(dtype)
    size = torch.empty((), dtype=dtype).element_size()
    ints = INT_VIEW[size]
    top = -(2 ** (8 * size - 1))
    nan_payloads = torch.tensor([0x7FC1 if size == 2 else 0x7FC00001, 0x7F81 if size == 2 else 0x7F800001], dtype=ints)
    vals = torch.tensor(
        [0.0, -0.0, math.inf, -math.inf, fi.max, -fi.max, fi.tiny, -fi.tiny, fi.smallest_normal / 4, 1.0],
        dtype=dtype,
    )
    neg_nan = torch.tensor([top | (0x7FC0 if size == 2 else 0x7FC00000)], dtype=ints).view(dtype)
    subnormal_min = torch.tensor([1, top | 1], dtype=ints).view(dtype)
    return torch.cat([vals, nan_payloads.view(dtype), neg_nan, subnormal_min])


shapes = st.lists(st.integers(1, 9), min_size=1, max_size=4).map(tuple)


# ---------------------------------------------------------------------------------------------
# Lossless


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shapes, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_lossless_round_trip_is_bit_exact_on_any_bits(shape, dtype, seed):
    x = random_bits(shape, dtype, seed)
    for codec in lossless_codecs():
        blob = codec.encode(x)
        assert blob.dtype == torch.uint8 and blob.dim() == 1
        assert same_bits(codec.decode(blob), x), codec


@pytest.mark.parametrize("dtype", DTYPES)
def test_lossless_keeps_nan_payloads_inf_signed_zero_and_subnormals(dtype):
    x = special_values(dtype)
    for codec in lossless_codecs():
        y = codec.decode(codec.encode(x))
        assert same_bits(y, x), codec
        assert torch.signbit(y[1]) and y[1] == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_byteplane_zstd_shrinks_kv_like_values(dtype):
    pytest.importorskip("zstandard")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, 128, generator=gen).to(dtype)  # exponents cluster, as KV's do
    codec = make_codec("byteplane_zstd")
    blob = codec.encode(x)
    assert blob.numel() < 0.9 * x.nbytes
    assert same_bits(codec.decode(blob), x)


def test_byteplane_zstd_stores_incompressible_planes_raw():
    pytest.importorskip("zstandard")
    x = random_bits((4096,), torch.bfloat16, 1)
    codec = make_codec("byteplane_zstd", coded_planes=2)
    blob = codec.encode(x)
    header = read_header(blob)
    assert blob.numel() <= header.header_nbytes + x.nbytes  # never larger than the raw planes
    assert same_bits(codec.decode(blob), x)


# ---------------------------------------------------------------------------------------------
# fp8


def fp8_scales(blob: torch.Tensor, x: torch.Tensor, codec: Fp8Codec) -> torch.Tensor:
    """The stored scales, broadcastable against x."""
    header = read_header(blob)
    dims = codec._dims(x.dim())
    scale_shape = tuple(1 if i in dims else s for i, s in enumerate(x.shape))
    n = math.prod(scale_shape) * codec.scale_dtype.itemsize
    start = header.header_nbytes
    return blob[start : start + n].view(codec.scale_dtype).view(scale_shape).float()


SCALE_OVERS = [(-1,), (-2, -1), (0,), (-2,)]


def kv_like(shape, dtype, seed: int) -> torch.Tensor:
    """Values over many decades (per-element exponents), with zeros, -0.0 and, where the dtype
    has them, subnormals."""
    gen = torch.Generator().manual_seed(seed)
    mag = torch.randn(shape, generator=gen) * torch.pow(10.0, torch.randint(-6, 4, shape, generator=gen).float())
    mag = mag.to(dtype)
    flat = mag.view(-1)
    flat[:: max(1, flat.numel() // 5)] = 0.0
    flat[1 :: max(1, flat.numel() // 7)] = -0.0
    if flat.numel() > 3:
        flat[2] = torch.finfo(dtype).smallest_normal / 2  # a subnormal
    return mag


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(1, 9), min_size=2, max_size=4).map(tuple),
    dtype=st.sampled_from(DTYPES),
    scale_dtype=st.sampled_from(["float32", "bfloat16"]),
    scale_over=st.sampled_from(SCALE_OVERS),
    seed=st.integers(0, 2**31 - 1),
)
def test_fp8_error_within_e4m3_step(shape, dtype, scale_dtype, scale_over, seed):
    x = kv_like(shape, dtype, seed)
    codec = make_codec("fp8", scale_dtype=scale_dtype, scale_over=scale_over)
    blob = codec.encode(x)
    assert blob.numel() == codec.encoded_nbytes(x.shape, x.dtype)
    y = codec.decode(blob)
    assert y.dtype == dtype and y.shape == x.shape

    scale = fp8_scales(blob, x, codec)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    xf, yf = x.float(), y.float()
    # Every group's largest value fits e4m3 after scaling (scales round up, never down).
    assert (xf.abs() <= 448.0 * scale * (1 + 2**-20)).all()
    out_eps = torch.finfo(dtype).eps / 2  # the decoded value's rounding to the tensor's dtype
    err = (yf - xf).abs()
    normal = xf.abs() >= scale * 2**-6
    bound = torch.where(normal, 2**-4 * xf.abs(), scale * 2**-10) + out_eps * yf.abs() + torch.finfo(dtype).tiny
    assert (err <= bound).all(), f"worst excess {(err - bound).max().item()}"
    # Zero stays zero, sign included.
    zeros = xf == 0
    assert (yf[zeros] == 0).all()
    assert torch.equal(torch.signbit(y[zeros]), torch.signbit(x[zeros]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_group_of_zeros_gets_a_finite_nonzero_scale(dtype):
    x = torch.zeros(3, 4, 8, dtype=dtype)
    x[1] = torch.randn(4, 8).to(dtype)
    codec = make_codec("fp8")
    blob = codec.encode(x)
    scale = fp8_scales(blob, x, codec)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    y = codec.decode(blob)
    assert (y[0] == 0).all() and (y[2] == 0).all()


def test_fp8_bfloat16_scales_round_up():
    # amax / 448 just above a bfloat16 value: rounded to nearest, the scale would go down and the
    # group's largest value would exceed e4m3's range.
    x = torch.tensor([[448.0 * 1.0039, 1.0], [448.0 * 1.0077, 1.0]], dtype=torch.float32)
    codec = make_codec("fp8", scale_dtype="bfloat16")
    blob = codec.encode(x)
    scale = fp8_scales(blob, x, codec)
    assert (scale.view(-1) >= x[:, 0] / 448.0).all()
    assert (scale.view(-1) - x[:, 0] / 448.0 < 2**-7).all()  # one bfloat16 step at most
    y = codec.decode(blob)
    assert ((y - x).abs() <= 2**-4 * x.abs()).all()


@pytest.mark.parametrize(
    ("scale_dtype", "scale_over", "shape", "expected_scales"),
    [
        ("float32", (-1,), (16, 8, 128), 16 * 8 * 4),
        ("bfloat16", (-1,), (16, 8, 128), 16 * 8 * 2),
        ("bfloat16", (-2, -1), (8, 4, 16, 128), 8 * 4 * 2),
        ("float32", (0,), (3, 5), 5 * 4),
    ],
)
def test_fp8_encoded_nbytes_is_exact(scale_dtype, scale_over, shape, expected_scales):
    codec = make_codec("fp8", scale_dtype=scale_dtype, scale_over=scale_over)
    n = codec.encoded_nbytes(shape, torch.bfloat16)
    header = read_header(codec.encode(torch.ones(shape, dtype=torch.bfloat16))).header_nbytes
    padded = -(-expected_scales // HEADER_ALIGN) * HEADER_ALIGN
    assert n == header + padded + math.prod(shape)
    assert n == codec.encode(torch.ones(shape, dtype=torch.float32)).numel()  # the same for every dtype


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_fp8_refuses_nan_and_inf(bad):
    x = torch.randn(4, 8)
    x[2, 3] = bad
    with pytest.raises(InvalidArgumentError, match="NaN" if math.isnan(bad) else "inf"):
        make_codec("fp8").encode(x)


def test_none_encoded_nbytes_is_exact():
    codec = make_codec("none")
    x = torch.randn(3, 7, 5, dtype=torch.float16)
    assert codec.encode(x).numel() == codec.encoded_nbytes(x.shape, x.dtype)


# ---------------------------------------------------------------------------------------------
# Blobs refused


def all_blobs():
    x = torch.randn(4, 2, 16).to(torch.bfloat16)
    return [(codec, codec.encode(x)) for codec in [make_codec("fp8"), *lossless_codecs()]]


def test_every_truncation_and_extension_is_refused():
    for codec, blob in all_blobs():
        for cut in range(blob.numel()):
            with pytest.raises(CorruptionError):
                codec.decode(blob[:cut].clone())
        longer = torch.cat([blob, torch.zeros(1, dtype=torch.uint8)])
        with pytest.raises(CorruptionError, match="longer than its header says"):
            codec.decode(longer)


def test_every_header_byte_flip_is_refused():
    for codec, blob in all_blobs():
        header = read_header(blob)
        for i in range(header.header_nbytes):
            bad = blob.clone()
            bad[i] ^= 0x01
            with pytest.raises(CorruptionError):
                codec.decode(bad)


def test_a_blob_of_another_codec_is_refused_by_name():
    blobs = all_blobs()
    for reader, _ in blobs:
        for writer, blob in blobs:
            if writer.name == reader.name:
                continue
            with pytest.raises(
                CorruptionError, match=f"written by '{writer.name}', this reader decodes '{reader.name}'"
            ):
                reader.decode(blob)


def with_header_field(blob: torch.Tensor, offset: int, value: int) -> torch.Tensor:
    """A copy of blob with one header byte changed and the header CRC made right again."""
    header = read_header(blob)
    raw = bytearray(blob[: header.header_nbytes].numpy().tobytes())
    raw[offset] = value
    end = 16 + 8 * len(header.shape) + len(header.params)
    struct.pack_into("<I", raw, end, zlib.crc32(bytes(raw[:end])))
    out = blob.clone()
    out[: header.header_nbytes] = torch.frombuffer(raw, dtype=torch.uint8)
    return out


def test_another_version_and_unknown_codec_are_refused():
    codec, blob = all_blobs()[0]
    with pytest.raises(CorruptionError, match="format version 9"):
        codec.decode(with_header_field(blob, 6, 9))
    with pytest.raises(CorruptionError, match="unknown codec id 77"):
        codec.decode(with_header_field(blob, 5, 77))
    with pytest.raises(CorruptionError, match="container version"):
        codec.decode(with_header_field(blob, 4, 2))
    with pytest.raises(CorruptionError, match="not a kvtier codec blob"):
        codec.decode(torch.randint(0, 256, (200,), dtype=torch.uint8))


def test_byteplane_zstd_refuses_a_damaged_frame():
    pytest.importorskip("zstandard")
    codec = make_codec("byteplane_zstd")
    blob = codec.encode(torch.randn(64, 32).to(torch.bfloat16))
    bad = blob.clone()
    bad[read_header(blob).header_nbytes] ^= 0xFF  # the zstd frame's magic
    with pytest.raises(CorruptionError, match="plane 0 does not decode"):
        codec.decode(bad)


def test_decode_takes_bytes_like_blobs():
    x = torch.randn(5, 6).to(torch.float16)
    for codec in [make_codec("fp8"), *lossless_codecs()]:
        blob = codec.encode(x)
        raw = blob.numpy().tobytes()
        for form in (raw, bytearray(raw), memoryview(raw), blob.numpy()):
            y = codec.decode(form)
            assert torch.equal(y, codec.decode(blob))


# ---------------------------------------------------------------------------------------------
# Bad tensors and settings


@pytest.mark.parametrize("name", ["none", "fp8", "byteplane_zstd"])
def test_bad_tensors_are_refused(name):
    if name == "byteplane_zstd":
        pytest.importorskip("zstandard")
    codec = make_codec(name)
    cases = [
        (torch.ones(4, dtype=torch.int32), "dtype int32 is not supported"),
        (torch.ones(4, dtype=torch.float64), "dtype float64 is not supported"),
        (torch.ones(4).to(torch.float8_e4m3fn), "dtype float8_e4m3fn is not supported"),
        (torch.ones(4, 6).t(), "not contiguous"),
        (torch.ones(0, 8), "is empty"),
        (torch.tensor(1.0), "rank 0"),
        (torch.ones([1] * 9), "rank 9"),
        ([1.0, 2.0], "expected a torch tensor"),
    ]
    for tensor, message in cases:
        with pytest.raises(InvalidArgumentError, match=message):
            codec.encode(tensor)


def test_bad_names_and_options_are_refused():
    assert codec_names() == ["none", "fp8", "byteplane_zstd"]
    with pytest.raises(InvalidArgumentError, match="unknown codec 'int4'"):
        make_codec("int4")
    with pytest.raises(InvalidArgumentError, match="scale_dtype"):
        make_codec("fp8", scale_dtype="float16")
    with pytest.raises(InvalidArgumentError, match="twice"):
        make_codec("fp8", scale_over=(1, 1))
    with pytest.raises(InvalidArgumentError, match="codec 'none'"):
        make_codec("none", level=3)
    with pytest.raises(InvalidArgumentError, match="out of range"):
        make_codec("fp8", scale_over=(3,)).encode(torch.ones(2, 2))
    with pytest.raises(InvalidArgumentError, match="twice for rank 2"):
        make_codec("fp8", scale_over=(1, -1)).encode(torch.ones(2, 2))
    with pytest.raises(InvalidArgumentError, match=r"1-D torch\.uint8"):
        make_codec("none").decode(torch.ones(4))
    if len(lossless_codecs()) > 1:  # zstandard installed
        with pytest.raises(InvalidArgumentError, match="level"):
            ByteplaneZstdCodec(level=99)


def test_spec_names_the_settings_that_change_bytes():
    assert make_codec("none").spec == "none/v1"
    assert make_codec("fp8").spec == "fp8/v1/e4m3/scale=float32/over=-1"
    assert make_codec("fp8", scale_dtype="bfloat16", scale_over=(-2, -1)).spec.endswith("scale=bfloat16/over=-2,-1")


# ---------------------------------------------------------------------------------------------
# Stacks: encode_many / decode_many (the GPU codec tier encodes and decodes a call's chunks at once)


def fixed_size_codecs():
    return [
        make_codec("none"),
        make_codec("fp8"),
        make_codec("fp8", scale_dtype="bfloat16"),
        make_codec("fp8", scale_over=(-3, -1)),
    ]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 4),
    shape=st.lists(st.integers(1, 7), min_size=3, max_size=4).map(tuple),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_encode_many_rows_are_the_blobs_encode_makes(n, shape, dtype, seed):
    x = kv_like((n, *shape), dtype, seed)
    for codec in fixed_size_codecs():
        blobs, ok = codec.encode_many(x)
        assert ok.dtype == torch.bool and ok.tolist() == [True] * n
        assert blobs.shape == (n, codec.encoded_nbytes(shape, dtype))
        for i in range(n):
            assert torch.equal(blobs[i], codec.encode(x[i])), (codec, i)
            assert bytes(blobs[i, : len(codec.batch_header(shape, dtype))].numpy()) == codec.batch_header(shape, dtype)
        out = codec.decode_many(blobs)
        assert out.shape == (n, *shape)
        for i in range(n):
            assert same_bits(out[i], codec.decode(blobs[i])), (codec, i)
        header = read_header(blobs[0])
        assert same_bits(codec.decode_many(blobs, header), out)


def test_encode_many_flags_the_tensors_fp8_refuses_and_keeps_the_others():
    x = kv_like((4, 3, 8, 16), torch.bfloat16, 1)
    x[1, 2, 5, 7] = math.nan
    x[3, 0, 0, 0] = -math.inf
    fp8 = make_codec("fp8")
    blobs, ok = fp8.encode_many(x)
    assert ok.tolist() == [True, False, True, False]
    for i in (0, 2):
        assert torch.equal(blobs[i], fp8.encode(x[i]))
    with pytest.raises(InvalidArgumentError, match="NaN"):
        fp8.encode(x[1])
    with pytest.raises(InvalidArgumentError, match="inf"):
        fp8.encode(x[3])


def test_stacks_refused_where_they_cannot_be_handled_together():
    fp8 = make_codec("fp8")
    x = kv_like((2, 4, 8), torch.float16, 2)
    with pytest.raises(InvalidArgumentError, match="stack"):
        fp8.encode_many(x[0, 0])  # rank 1: no stack
    with pytest.raises(InvalidArgumentError, match="not contiguous"):
        fp8.encode_many(x.transpose(0, 1))
    with pytest.raises(InvalidArgumentError, match="float16, bfloat16 or float32"):
        fp8.encode_many(x.to(torch.int32))
    blobs, _ = fp8.encode_many(x)
    # Rows with different headers (another dtype, same length) are not decoded as one stack.
    other = fp8.encode(kv_like((4, 8), torch.bfloat16, 3))
    mixed = torch.stack([blobs[0], other])
    with pytest.raises(CorruptionError, match="headers differ"):
        fp8.decode_many(mixed)
    with pytest.raises(CorruptionError, match="written by 'fp8'"):
        make_codec("none").decode_many(blobs)
    with pytest.raises(CorruptionError, match="bytes, expected"):
        fp8.decode_many(blobs[:, :-16], read_header(blobs[0]))
    with pytest.raises(InvalidArgumentError, match="2-D"):
        fp8.decode_many(blobs[0])
    try:
        zstd = make_codec("byteplane_zstd")
    except UnavailableError:  # zstandard not installed
        return
    assert zstd.batch_header((4, 8), torch.float16) is None
    with pytest.raises(InvalidArgumentError, match="vary in size"):
        zstd.encode_many(x)


# ---------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trips_on_cuda(gpu, dtype):
    x = random_bits((4, 16, 8, 64), dtype, 3).to(gpu)
    for codec in lossless_codecs():
        y = codec.decode(codec.encode(x), device=gpu)
        assert y.device == x.device and same_bits(y, x), codec
    x = kv_like((4, 16, 8, 64), dtype, 4)
    for codec in (make_codec("fp8"), make_codec("fp8", scale_dtype="bfloat16", scale_over=(-2, -1))):
        blob = codec.encode(x.to(gpu))
        assert blob.device == x.to(gpu).device and blob.numel() == codec.encoded_nbytes(x.shape, dtype)
        on_gpu = codec.decode(blob)
        on_cpu = codec.encode(x)
        # The same bytes and values as the CPU path (the e4m3 cast rounds alike on both).
        assert torch.equal(blob.cpu(), on_cpu)
        assert same_bits(on_gpu.cpu(), codec.decode(on_cpu))
    # A stack encodes and decodes on the GPU to the CPU's bytes and values, row by row.
    stack = kv_like((3, 16, 8, 64), dtype, 5)
    stack[1, 0, 0, 0] = math.nan
    for codec in fixed_size_codecs():
        blobs, ok = codec.encode_many(stack.to(gpu))
        assert blobs.device == torch.device(gpu) and ok.device == torch.device(gpu)
        on_cpu, ok_cpu = codec.encode_many(stack)
        assert ok.tolist() == ok_cpu.tolist()
        keep = ok_cpu.nonzero().reshape(-1)
        assert torch.equal(blobs.cpu()[keep], on_cpu[keep]), codec
        out = codec.decode_many(blobs[keep], read_header(on_cpu[0]))
        assert same_bits(out.cpu(), codec.decode_many(on_cpu[keep])), codec


def edge_stack(dtype) -> torch.Tensor:
    """Five chunks of rows spanning many decades, with whole rows of zeros, of -0.0, of the
    dtype's extremes and of subnormals; chunk 3 holds a NaN and chunk 4 an inf."""
    stack = kv_like((5, 64, 8, 128), dtype, 11)
    fi = torch.finfo(dtype)
    stack[0, 0, 0] = 0.0
    stack[0, 0, 1] = -0.0
    stack[0, 0, 2] = fi.max
    stack[0, 0, 3] = -fi.max
    stack[0, 0, 4] = fi.smallest_normal / 4  # subnormal rows
    stack[0, 0, 5, ::2] = fi.tiny
    stack[0, 0, 6] = torch.linspace(-1, 1, 128).to(dtype) * 448
    specials = special_values(dtype)
    finite = specials[torch.isfinite(specials.float())]
    stack[1, 1, 1, : len(finite)] = finite[:128]
    stack[3, 5, 2, 7] = math.nan
    stack[4, 0, 0, 0] = -math.inf
    return stack


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16"])
def test_fused_fp8_on_the_host_gives_the_torch_paths_bytes_and_values(dtype, scale_dtype):
    """On the CPU, the core's fused pass (one scale per row, what encode_many / decode_many use
    there) against the torch path: the same blob bytes, the same decoded bits, the same chunks
    refused."""
    codec = make_codec("fp8", scale_dtype=scale_dtype)
    stack = edge_stack(dtype)
    assert codec._fused(stack.device, tuple(stack.shape[1:]), dtype)
    blobs, ok = codec.encode_many(stack)
    want, want_ok = codec._encode_torch(stack)
    assert ok.tolist() == want_ok.tolist() == [True, True, True, False, False]
    assert torch.equal(blobs[:3], want[:3])
    header = read_header(want[0])
    out = codec.decode_many(want[:3], header)
    assert same_bits(out, codec._decode_torch(want[:3], header))
    # Rows of a stack whose blobs sit farther apart than a blob (a buffer of larger slots).
    wide = torch.zeros((3, blobs.shape[1] + 64), dtype=torch.uint8)
    wide[:, : blobs.shape[1]] = blobs[:3]
    assert same_bits(codec.decode_many(wide[:, : blobs.shape[1]], header), out)
    # Another grouping keeps the torch path, on the CPU too.
    assert not make_codec("fp8", scale_over=(-2, -1))._fused(stack.device, tuple(stack.shape[1:]), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16"])
def test_fp8_host_pass_builds_give_the_same_bytes(dtype, scale_dtype):
    """The host pass's build for this CPU (AVX2 where it has it: `_core.fp8_host_isa()`) and its
    portable build: the same blobs, flags and decoded bits, over the edge stack and KV-like rows
    whose lengths leave vector remainders."""
    from kvtier import _core

    codec = make_codec("fp8", scale_dtype=scale_dtype)
    for stack in (edge_stack(dtype), kv_like((3, 40, 3, 77), dtype, 5)):
        geo = codec._rows(tuple(stack.shape[1:]), dtype, 0)
        n, good = len(stack), 3
        out = {}
        for isa in ("auto", "portable"):
            blobs = torch.zeros((n, geo["blob_stride"]), dtype=torch.uint8)
            ok = torch.zeros(n, dtype=torch.uint8)
            raw = torch.empty_like(stack[:good])
            args = dict(device=-1, chunks=n, stream=0, host_isa=isa, **geo)
            _core.fp8_encode_rows(raw=stack.data_ptr(), blobs=blobs.data_ptr(), ok=ok.data_ptr(), **args)
            args["chunks"] = good
            _core.fp8_decode_rows(blobs=blobs.data_ptr(), raw=raw.data_ptr(), **args)
            out[isa] = (blobs[:good], ok.tolist()[:good], raw)
        assert out["auto"][1] == out["portable"][1] == [1] * good
        assert torch.equal(out["auto"][0], out["portable"][0])
        assert same_bits(out["auto"][2], out["portable"][2])
    assert _core.fp8_host_isa() in ("avx2", "portable")
    with pytest.raises(InvalidArgumentError, match="host_isa must be 'auto' or 'portable', got 'sse9'"):
        _core.fp8_decode_rows(blobs=blobs.data_ptr(), raw=raw.data_ptr(), **{**args, "host_isa": "sse9"})


@pytest.mark.parametrize("threads", [2, 3, 7])
def test_fp8_host_pass_on_several_threads_gives_one_threads_bytes(threads):
    """The host pass split among threads (rows in ranges that cut chunks in two): the same blobs
    and decoded bits as on one, and a chunk holding a NaN in a row of a later range is still
    refused while the others are kept."""
    from kvtier import _core

    codec = make_codec("fp8", scale_dtype="bfloat16")
    stack = kv_like((3, 4096, 4, 64), torch.bfloat16, 9)  # 3 x 16384 rows
    stack[1, 3000, 2, 5] = math.nan
    geo = codec._rows(tuple(stack.shape[1:]), torch.bfloat16, 0)
    out = {}
    for t in (1, threads):
        blobs = torch.zeros((3, geo["blob_stride"]), dtype=torch.uint8)
        ok = torch.zeros(3, dtype=torch.uint8)
        args = dict(device=-1, stream=0, host_threads=t, **geo)
        _core.fp8_encode_rows(raw=stack.data_ptr(), blobs=blobs.data_ptr(), ok=ok.data_ptr(), chunks=3, **args)
        kept = blobs[[0, 2]].contiguous()
        raw = torch.empty_like(stack[:2])
        _core.fp8_decode_rows(blobs=kept.data_ptr(), raw=raw.data_ptr(), chunks=2, **args)
        out[t] = (ok.tolist(), kept, raw)
    assert out[1][0] == out[threads][0] == [1, 0, 1]
    assert torch.equal(out[1][1], out[threads][1])
    assert same_bits(out[1][2], out[threads][2])
    with pytest.raises(InvalidArgumentError, match=r"host_threads must be in \[1, 256\], got 0"):
        _core.fp8_decode_rows(blobs=kept.data_ptr(), raw=raw.data_ptr(), chunks=2, **{**args, "host_threads": 0})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16"])
def test_fused_fp8_kernels_give_the_torch_paths_bytes_and_values(gpu, dtype, scale_dtype):
    """The core's fused kernels (one scale per row, on a GPU) against the torch path on the
    CPU: the same blob bytes, the same decoded bits, the same chunks refused, over rows spanning
    many decades, whole rows of zeros, of -0.0, of the dtype's extremes and of subnormals."""
    codec = make_codec("fp8", scale_dtype=scale_dtype)
    stack = edge_stack(dtype)
    on_gpu = stack.to(gpu)
    assert codec._fused(on_gpu.device, tuple(stack.shape[1:]), dtype)
    blobs, ok = codec.encode_many(on_gpu)
    want, want_ok = codec._encode_torch(stack)  # the torch path, on the CPU
    assert ok.tolist() == want_ok.tolist() == [True, True, True, False, False]
    assert torch.equal(blobs[:3].cpu(), want[:3])
    header = read_header(want[0])
    out = codec.decode_many(blobs[:3], header)
    assert same_bits(out.cpu(), codec._decode_torch(want[:3], header))
    # Rows of a stack whose blobs sit farther apart than a blob (a buffer of larger slots).
    wide = torch.zeros((3, blobs.shape[1] + 64), dtype=torch.uint8, device=on_gpu.device)
    wide[:, : blobs.shape[1]] = blobs[:3]
    assert same_bits(codec.decode_many(wide[:, : blobs.shape[1]], header), out)
