"""KV codecs: one chunk's KV tensor to one self-describing byte blob and back, chosen by name.

Three codecs (``make_codec(name, **options)``):

- ``none``: the tensor's bytes as they are (the baseline: a copy).
- ``fp8``: float8 e4m3 (``torch.float8_e4m3fn``) with one scale per group of elements, stored
  beside the payload. By default a group is one row of the last dimension, which for a
  ``[..., tokens, heads, head_dim]`` or ``[..., heads, tokens, head_dim]`` chunk is one token of
  one head. Lossy, fixed size: :meth:`Codec.encoded_nbytes` is exact, so a fixed-slot tier can
  count how many chunks it holds.
- ``byteplane_zstd``: lossless. Each element's bytes are split into byte planes (the top byte of
  bf16/fp16, sign and exponent bits, in one plane; the low, mantissa byte in another), and the
  top plane is compressed with zstd, where the exponents' low entropy is. Variable size.

A blob is a 1-D ``torch.uint8`` tensor: a header (magic, codec id and version, dtype, shape, the
codec's parameters, a CRC32 of the header) padded to 16 bytes, then the payload. Decoding checks
the header before touching the payload: a blob of another codec, another version, a damaged
header or the wrong length raises :class:`~kvtier.errors.CorruptionError` naming what differs, so
a reader never decodes another codec's bytes. The payload has no checksum of its own: the tiers
(disk slots, peer transfers) already check a CRC32C over every blob they move.

Torch ops only (no custom kernels): ``none`` and ``fp8`` run on the tensor's device (CPU or
CUDA); ``byteplane_zstd`` splits the planes on the tensor's device and codes them on the CPU, so
its blobs are CPU tensors. The byte layout of each codec is in docs/codecs.md.

Example::

    >>> import torch
    >>> from kvtier.codecs import make_codec
    >>> kv = torch.randn(16, 8, 128, dtype=torch.bfloat16)      # [tokens, kv_heads, head_dim]
    >>> fp8 = make_codec("fp8", scale_dtype="bfloat16")
    >>> blob = fp8.encode(kv)
    >>> blob.numel() == fp8.encoded_nbytes(kv.shape, kv.dtype), blob.numel() < kv.nbytes
    (True, True)
    >>> fp8.decode(blob).shape
    torch.Size([16, 8, 128])
"""

from __future__ import annotations

import functools
import math
import struct
import zlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from kvtier.errors import CorruptionError, InvalidArgumentError, UnavailableError

__all__ = [
    "HEADER_ALIGN",
    "BlobHeader",
    "ByteplaneZstdCodec",
    "Codec",
    "Fp8Codec",
    "NoneCodec",
    "PagedChunks",
    "codec_from_settings",
    "codec_names",
    "make_codec",
    "read_header",
]

MAGIC = b"KVTC"
CONTAINER_VERSION = 1
HEADER_ALIGN = 16
"""Header length (and the fp8 scale block) is a multiple of this, so payload views stay aligned."""
MAX_NDIM = 8

# <magic, container version, codec id, codec version, dtype code, ndim, reserved, params length,
# header length>; then ndim u64 dims, the params, a u32 CRC32 of everything before it, zero padding.
_FIXED = struct.Struct("<4sBBBBBBHI")

_DTYPES = {1: torch.float16, 2: torch.bfloat16, 3: torch.float32}
_DTYPE_CODES = {dtype: code for code, dtype in _DTYPES.items()}
_SCALE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

_FP8 = torch.float8_e4m3fn
_FP8_SCALE_CODES = {torch.float32: 0, torch.bfloat16: 1}
_FP8_SCALE_BY_CODE = {code: dtype for dtype, code in _FP8_SCALE_CODES.items()}
_FP8_MAX = 448.0  # largest finite e4m3fn value
# Scales never go below the smallest normal float32 / bfloat16 (the same exponent range): a
# group of tiny or zero values still gets a finite, non-zero, normal scale.
_MIN_SCALE = torch.finfo(torch.float32).tiny


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class BlobHeader(NamedTuple):
    """What a blob's header says (:func:`read_header`).

    Attributes:
        codec: the codec's name, e.g. ``"fp8"``.
        codec_version: the codec's format version.
        dtype: the dtype of the tensor that was encoded (and that decode returns).
        shape: its shape.
        params: the codec's parameter bytes (decoded by the codec).
        header_nbytes: where the payload starts; a multiple of :data:`HEADER_ALIGN`.
    """

    codec: str
    codec_version: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    params: bytes
    header_nbytes: int


class PagedChunks(NamedTuple):
    """Raw chunks where a layout keeps them, in pages: chunk ``c`` is ``num_segments`` runs
    (segment-major, as a layout's blob orders them) of ``pages_per_chunk`` pages of
    ``page_bytes`` each, page ``j`` of segment ``s`` at ``segments[s, 0] + page_ids[c *
    pages_per_chunk + j] * segments[s, 1]``. The tensors are on the pages' device.

    Attributes:
        page_ids: int64, ``pages_per_chunk`` ids per chunk; each in its segment's range (the
            caller checks them: a kernel cannot).
        segments: int64 ``[num_segments, 2]``: each segment's base address and page stride.
        pages_per_chunk: pages of each segment per chunk.
        page_bytes: bytes of one page, the same in every segment.
    """

    page_ids: torch.Tensor
    segments: torch.Tensor
    pages_per_chunk: int
    page_bytes: int

    @property
    def chunks(self) -> int:
        return len(self.page_ids) // self.pages_per_chunk

    def kwargs(self) -> dict:
        """The paged arguments of ``_core.fp8_encode_rows`` / ``fp8_decode_rows``."""
        return dict(
            page_ids=self.page_ids.data_ptr(),
            segments=self.segments.data_ptr(),
            num_segments=len(self.segments),
            pages_per_chunk=self.pages_per_chunk,
            page_bytes=self.page_bytes,
        )


def _header_nbytes(ndim: int, params_len: int) -> int:
    raw = _FIXED.size + 8 * ndim + params_len + 4
    return -(-raw // HEADER_ALIGN) * HEADER_ALIGN


def _pack_header(codec: Codec, dtype: torch.dtype, shape: Sequence[int], params: bytes) -> bytes:
    length = _header_nbytes(len(shape), len(params))
    body = (
        _FIXED.pack(
            MAGIC,
            CONTAINER_VERSION,
            codec.codec_id,
            codec.version,
            _DTYPE_CODES[dtype],
            len(shape),
            0,
            len(params),
            length,
        )
        + struct.pack(f"<{len(shape)}Q", *shape)
        + params
    )
    body += struct.pack("<I", zlib.crc32(body))
    return body + bytes(length - len(body))


def _as_blob(blob) -> torch.Tensor:
    """A 1-D contiguous uint8 tensor over ``blob`` (a tensor as it is; other buffers copied only
    when read-only, since torch wraps only writable memory)."""
    if isinstance(blob, torch.Tensor):
        if blob.dtype != torch.uint8 or blob.dim() != 1:
            raise InvalidArgumentError(
                f"blob must be a 1-D torch.uint8 tensor, got {_dtype_name(blob.dtype)} of shape {tuple(blob.shape)}"
            )
        if not blob.is_contiguous():
            raise InvalidArgumentError("blob must be contiguous")
        return blob
    if isinstance(blob, np.ndarray):
        blob = np.ascontiguousarray(blob).reshape(-1).view(np.uint8)
        return torch.from_numpy(blob if blob.flags.writeable else blob.copy())
    if isinstance(blob, (bytes, bytearray, memoryview)):
        view = memoryview(blob)
        if view.readonly:
            view = memoryview(bytearray(view))
        if view.nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(view, dtype=torch.uint8)
    raise InvalidArgumentError(f"blob must be a uint8 tensor or a bytes-like object, got {type(blob).__name__}")


_CODEC_NAMES_BY_ID: dict[int, str] = {}


def read_header(blob) -> BlobHeader:
    """Parse and check a blob's header (magic, container version, CRC32, dtype, shape).

    Raises:
        CorruptionError: the bytes are not a kvtier codec blob, or the header is damaged or cut.
    """
    blob = _as_blob(blob)
    if blob.numel() < _FIXED.size:
        raise CorruptionError(f"codec blob truncated: {blob.numel()} bytes, shorter than the {_FIXED.size}-byte header")
    fixed = bytes(blob[: _FIXED.size].cpu().numpy())
    magic, container, codec_id, codec_version, dtype_code, ndim, _, params_len, length = _FIXED.unpack(fixed)
    if magic != MAGIC:
        raise CorruptionError(f"not a kvtier codec blob: magic is {magic!r}, expected {MAGIC!r}")
    if container != CONTAINER_VERSION:
        raise CorruptionError(f"codec blob container version {container}, this kvtier reads {CONTAINER_VERSION}")
    if length != _header_nbytes(ndim, params_len) or ndim > MAX_NDIM:
        raise CorruptionError(
            f"codec blob header damaged: length {length} for {ndim} dims and {params_len} parameter bytes"
        )
    if blob.numel() < length:
        raise CorruptionError(f"codec blob truncated: {blob.numel()} bytes, shorter than its {length}-byte header")
    head = bytes(blob[:length].cpu().numpy())
    end = _FIXED.size + 8 * ndim + params_len
    (crc,) = struct.unpack_from("<I", head, end)
    if crc != zlib.crc32(head[:end]) or any(head[end + 4 :]):
        raise CorruptionError("codec blob header damaged: its CRC32 or padding does not match")
    if dtype_code not in _DTYPES:
        raise CorruptionError(f"codec blob names unknown dtype code {dtype_code}")
    shape = struct.unpack_from(f"<{ndim}Q", head, _FIXED.size)
    codec = _CODEC_NAMES_BY_ID.get(codec_id, f"unknown codec id {codec_id}")
    params = head[_FIXED.size + 8 * ndim : end]
    return BlobHeader(codec, codec_version, _DTYPES[dtype_code], tuple(shape), params, length)


class Codec(ABC):
    """Encodes one chunk's KV tensor into one blob and decodes it back.

    Thread safety: a codec holds only its settings; its methods can be called from any thread.

    Subclasses set ``name``, ``codec_id`` (unique, written into every blob) and ``version``
    (bumped whenever the meaning of a blob's bytes changes, so old blobs are refused rather than
    misread).
    """

    name: str
    codec_id: int
    version: int
    lossless: bool
    fixed_size: bool

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.codec_id in _CODEC_NAMES_BY_ID:
            raise RuntimeError(f"codec id {cls.codec_id} taken twice")  # a bug in this module
        _CODEC_NAMES_BY_ID[cls.codec_id] = cls.name

    @property
    def spec(self) -> str:
        """The codec and the settings that change its bytes, e.g. ``"fp8/v1/scale=bfloat16/over=-1"``:
        what a slot's fingerprint will cover."""
        return f"{self.name}/v{self.version}"

    def encode(self, tensor: torch.Tensor) -> torch.Tensor:
        """Encode ``tensor`` (any shape of rank 1..8, float16 / bfloat16 / float32, contiguous,
        non-empty) into a 1-D ``torch.uint8`` blob.

        Raises:
            InvalidArgumentError: the tensor breaks one of those rules, or the codec's own (fp8:
                every value finite).
        """
        self._check_tensor(tensor)
        return self._encode(tensor)

    def decode(self, blob, *, device: torch.device | str | None = None) -> torch.Tensor:
        """Decode a blob written by this codec into a new tensor of the encoded dtype and shape.

        Args:
            blob: a 1-D ``torch.uint8`` tensor (CPU or CUDA) or a bytes-like object.
            device: where the result goes; the blob's device by default.

        Raises:
            CorruptionError: another codec or version wrote the blob, or it is damaged or cut.
        """
        blob = _as_blob(blob)
        header = read_header(blob)
        if header.codec != self.name:
            raise CorruptionError(f"codec blob was written by {header.codec!r}, this reader decodes {self.name!r}")
        if header.codec_version != self.version:
            raise CorruptionError(
                f"{self.name} blob has format version {header.codec_version}, this kvtier reads version {self.version}"
            )
        out = self._decode(blob, header)
        return out if device is None else out.to(device)

    def encoded_nbytes(self, shape: Sequence[int], dtype: torch.dtype) -> int | None:
        """The exact blob size for a tensor of ``shape`` and ``dtype``, or None when it depends on
        the values (a lossless coder)."""
        return None

    def max_encoded_nbytes(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        """The largest blob a tensor of ``shape`` and ``dtype`` can encode to: what a fixed-size
        slot must hold. Equal to :meth:`encoded_nbytes` for a fixed-size codec."""
        n = self.encoded_nbytes(shape, dtype)
        if n is None:  # a subclass of variable size overrides this
            raise NotImplementedError(f"{self.name} has no bound on its blob size")
        return n

    def blob_nbytes(self, buf) -> int:
        """The length of the blob this codec wrote at the start of ``buf`` (a slot may hold zero
        padding after it), read from its header.

        Raises:
            CorruptionError: ``buf`` does not start with a blob of this codec, or is shorter than it.
        """
        buf = _as_blob(buf)
        header = read_header(buf)
        if header.codec != self.name:
            raise CorruptionError(f"codec blob was written by {header.codec!r}, this reader decodes {self.name!r}")
        n = header.header_nbytes + self._payload_nbytes(header)
        if n > buf.numel():
            raise CorruptionError(f"{self.name} blob truncated: {buf.numel()} bytes, its header says {n}")
        return n

    def batch_header(self, shape: Sequence[int], dtype: torch.dtype) -> bytes | None:
        """The header bytes every blob of a tensor of ``shape`` and ``dtype`` starts with, or None
        when a blob's header depends on its values (a variable-size codec). A reader that finds
        these bytes at the start of each of several blobs can decode them together
        (:meth:`decode_many`)."""
        return None

    def encode_many(self, tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode each ``tensors[i]`` of a stack of like tensors (``[n, *shape]``, on one device),
        as one pass over the stack where the codec can: returns ``(blobs, ok)``, ``blobs`` a
        ``[n, encoded_nbytes]`` uint8 tensor whose row ``i`` is ``encode(tensors[i])``'s blob and
        ``ok`` an ``[n]`` bool tensor, False where the codec refuses ``tensors[i]`` (fp8: NaN or
        inf; that row holds no blob). On CUDA nothing waits for the device: read ``ok`` once the
        stream's work is done. Fixed-size codecs only.

        Raises:
            InvalidArgumentError: the stack is empty or breaks :meth:`encode`'s rules, or the
                codec's blobs vary in size.
        """
        self._check_stack(tensors)
        blobs = torch.empty(
            (len(tensors), self.encoded_nbytes(tensors.shape[1:], tensors.dtype)),
            dtype=torch.uint8,
            device=tensors.device,
        )
        ok = torch.ones(len(tensors), dtype=torch.bool)
        for i, t in enumerate(tensors):
            try:
                blobs[i] = self._encode(t)
            except InvalidArgumentError:
                ok[i] = False
        return blobs, ok.to(tensors.device)

    def pages_fused(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> bool:
        """Whether the codec codes chunks of ``shape`` and ``dtype`` on ``device`` in the pages
        that hold them (``encode_pages`` / ``decode_pages``, a fixed-size codec's): False here."""
        return False

    def decode_many(self, blobs: torch.Tensor, header: BlobHeader | None = None) -> torch.Tensor:
        """Decode the rows of ``blobs`` (``[n, blob_nbytes]`` uint8, CPU or CUDA), each a blob of
        this codec with the same header, into one ``[n, *shape]`` tensor on their device.

        Args:
            header: the rows' header, as :func:`read_header` gives it, when the caller has
                checked it (and that every row starts with its bytes: :meth:`batch_header`);
                None reads it from row 0 and checks every row's header against it, which on
                CUDA waits for the device.

        Raises:
            CorruptionError: a row is not a blob of this codec, or the rows' headers differ.
        """
        if not isinstance(blobs, torch.Tensor) or blobs.dtype != torch.uint8 or blobs.dim() != 2 or not len(blobs):
            raise InvalidArgumentError("blobs must be a non-empty 2-D torch.uint8 tensor, one blob per row")
        if header is None:
            header = read_header(blobs[0])
            head = blobs[:, : header.header_nbytes]
            if not bool((head == head[0]).all()):
                raise CorruptionError(f"{self.name}: the blobs' headers differ; decode them one by one")
        if header.codec != self.name or header.codec_version != self.version:
            raise CorruptionError(
                f"codec blobs were written by {header.codec!r} v{header.codec_version}, this reader decodes "
                f"{self.name!r} v{self.version}"
            )
        expected = header.header_nbytes + self._payload_nbytes(header)
        if blobs.shape[1] != expected:
            raise CorruptionError(
                f"{self.name} blobs of {blobs.shape[1]} bytes, expected {expected} for "
                f"{_dtype_name(header.dtype)} {header.shape}"
            )
        return self._decode_rows(blobs, header)

    # -- for subclasses ------------------------------------------------------------------------
    def _decode_rows(self, blobs: torch.Tensor, header: BlobHeader) -> torch.Tensor:
        """Rows of checked, equal-headered blobs to ``[n, *shape]``; one by one unless a codec
        does better."""
        return torch.stack([self._decode(b, header) for b in blobs])

    def _check_stack(self, tensors) -> None:
        if not isinstance(tensors, torch.Tensor) or tensors.dim() < 2 or not len(tensors):
            raise InvalidArgumentError(f"{self.name}: encode_many takes a non-empty stack [n, *shape] of tensors")
        self._check_tensor(tensors[0])
        if not tensors.is_contiguous():
            raise InvalidArgumentError(f"{self.name}: the stack of shape {tuple(tensors.shape)} is not contiguous")
        if not self.fixed_size:
            raise InvalidArgumentError(f"{self.name}: blobs vary in size; encode the tensors one by one")

    @abstractmethod
    def _encode(self, tensor: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _decode(self, blob: torch.Tensor, header: BlobHeader) -> torch.Tensor: ...

    @abstractmethod
    def _payload_nbytes(self, header: BlobHeader) -> int:
        """Payload bytes after the header, as the header says (CorruptionError if it cannot)."""

    def _check_tensor(self, tensor) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise InvalidArgumentError(f"{self.name}: expected a torch tensor, got {type(tensor).__name__}")
        if tensor.dtype not in _DTYPE_CODES:
            raise InvalidArgumentError(
                f"{self.name}: dtype {_dtype_name(tensor.dtype)} is not supported; "
                "expected float16, bfloat16 or float32"
            )
        if not 1 <= tensor.dim() <= MAX_NDIM:
            raise InvalidArgumentError(f"{self.name}: rank {tensor.dim()} is outside 1..{MAX_NDIM}")
        if tensor.numel() == 0:
            raise InvalidArgumentError(f"{self.name}: tensor of shape {tuple(tensor.shape)} is empty")
        if not tensor.is_contiguous():
            raise InvalidArgumentError(
                f"{self.name}: tensor of shape {tuple(tensor.shape)} and strides {tensor.stride()} is not "
                "contiguous (a chunk's KV is gathered into one contiguous blob first)"
            )

    def _check_payload(self, blob: torch.Tensor, header: BlobHeader, payload: int) -> None:
        expected = header.header_nbytes + payload
        if blob.numel() != expected:
            what = "truncated" if blob.numel() < expected else "longer than its header says"
            raise CorruptionError(
                f"{self.name} blob {what}: {blob.numel()} bytes, expected {expected} for "
                f"{_dtype_name(header.dtype)} {header.shape}"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


class NoneCodec(Codec):
    """The tensor's bytes after the header, unchanged: the baseline every codec is measured
    against, and what a deployment without compression stores."""

    name = "none"
    codec_id = 0
    version = 1
    lossless = True
    fixed_size = True

    def encoded_nbytes(self, shape, dtype) -> int:
        return _header_nbytes(len(shape), 0) + math.prod(shape) * _element_size(dtype)

    def batch_header(self, shape, dtype) -> bytes:
        return _pack_header(self, dtype, tuple(int(d) for d in shape), b"")

    def _encode(self, tensor):
        blobs, _ = self.encode_many(tensor.unsqueeze(0))
        return blobs[0]

    def encode_many(self, tensors):
        self._check_stack(tensors)
        n = len(tensors)
        header = self.batch_header(tensors.shape[1:], tensors.dtype)
        blobs = torch.empty((n, len(header) + tensors[0].nbytes), dtype=torch.uint8, device=tensors.device)
        blobs[:, : len(header)] = _header_tensor(header, tensors.device)
        blobs[:, len(header) :] = tensors.reshape(n, -1).view(torch.uint8)
        return blobs, torch.ones(n, dtype=torch.bool, device=tensors.device)

    def _payload_nbytes(self, header):
        return math.prod(header.shape) * _element_size(header.dtype)

    def _decode(self, blob, header):
        self._check_payload(blob, header, self._payload_nbytes(header))
        return self._decode_rows(blob.unsqueeze(0), header)[0]

    def _decode_rows(self, blobs, header):
        h = header.header_nbytes
        return (
            _packed(blobs[:, h : h + self._payload_nbytes(header)]).view(header.dtype).view(len(blobs), *header.shape)
        )


def _device_index(device: torch.device) -> int:
    """The core's device number of a tensor's device: the GPU's index, -1 for the CPU."""
    return -1 if device.type == "cpu" else device.index


def _stream_of(device: torch.device) -> int:
    """The stream the core queues a fused pass on: the current one of a GPU, 0 on the CPU."""
    return 0 if device.type == "cpu" else torch.cuda.current_stream(device).cuda_stream


def _packed(rows: torch.Tensor) -> torch.Tensor:
    """A new, contiguous copy of a stack's byte rows, flat: its start is aligned for any dtype view
    (a row of a stack may start at any byte)."""
    return rows.clone(memory_format=torch.contiguous_format).view(-1)


def _header_tensor(header: bytes, device) -> torch.Tensor:
    """``header`` as a uint8 tensor on ``device``; on a GPU, one copy made once and kept (read
    only): a copy from pageable memory would make the host wait for the stream's queued work."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.frombuffer(bytearray(header), dtype=torch.uint8)
    return _device_header(header, device)


@functools.lru_cache(maxsize=256)
def _device_header(header: bytes, device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(header), dtype=torch.uint8).to(device)


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _align(n: int) -> int:
    return -(-n // HEADER_ALIGN) * HEADER_ALIGN


class Fp8Codec(Codec):
    """float8 e4m3 values with one scale per group, stored beside them. Lossy, fixed size.

    A group is the set of elements that share a scale: ``scale_over`` names the dims it spans.
    ``(-1,)`` (the default) is one row of the last dim: one token of one head for KV shaped
    ``[..., tokens, heads, head_dim]`` or ``[..., heads, tokens, head_dim]``. Reshape the chunk
    to expose pages and pass e.g. ``(-2, -1)`` on ``[heads, pages, page_tokens, head_dim]`` for
    one scale per page per head, or ``(-2,)`` for one per page per channel (K's outlier channels).

    Each group's scale is ``amax / 448`` (448: e4m3's largest value), rounded up to
    ``scale_dtype`` so that the group's largest value still fits, and never below the smallest
    normal float32 (a group of zeros gets a finite, non-zero scale). A value ``x`` decodes to
    ``q * scale`` with ``q = e4m3(x / scale)``, rounded to nearest: within ``2**-4 * |x|`` when
    ``|x| / scale >= 2**-6`` (e4m3's normal range), within ``2**-10 * scale`` below it (its
    subnormals), plus the rounding of the decoded value to the tensor's dtype. Zero stays zero
    (its sign too).

    NaN and inf have no e4m3fn scale: encode refuses a tensor holding any (checked on the
    scales, which carry a NaN or inf of their group, so the check reads only the small scale
    tensor; on CUDA it is one synchronisation).

    Layout after the header: the scales (``scale_dtype``, the tensor's shape with the
    ``scale_over`` dims set to 1, row-major), zero-padded to 16 bytes; then one e4m3 byte per
    element, row-major.
    """

    name = "fp8"
    codec_id = 1
    version = 1
    lossless = False
    fixed_size = True

    # params: <scale dtype code (0 float32, 1 bfloat16), bitmask of the scale_over dims>
    _PARAMS = struct.Struct("<BB")

    def __init__(self, *, scale_dtype: str = "float32", scale_over: Sequence[int] = (-1,)) -> None:
        if scale_dtype not in _SCALE_DTYPES:
            raise InvalidArgumentError(f"fp8: scale_dtype must be one of {sorted(_SCALE_DTYPES)}, got {scale_dtype!r}")
        scale_over = tuple(scale_over)
        if not scale_over or not all(isinstance(d, int) and not isinstance(d, bool) for d in scale_over):
            raise InvalidArgumentError(f"fp8: scale_over must be a non-empty sequence of dims, got {scale_over!r}")
        if len(set(scale_over)) != len(scale_over):
            raise InvalidArgumentError(f"fp8: scale_over names a dim twice: {scale_over!r}")
        self.scale_dtype = _SCALE_DTYPES[scale_dtype]
        self.scale_over = scale_over

    @property
    def spec(self) -> str:
        over = ",".join(str(d) for d in self.scale_over)
        return f"{self.name}/v{self.version}/e4m3/scale={_dtype_name(self.scale_dtype)}/over={over}"

    def _dims(self, ndim: int) -> tuple[int, ...]:
        dims = []
        for d in self.scale_over:
            if not -ndim <= d < ndim:
                raise InvalidArgumentError(f"fp8: scale_over dim {d} is out of range for a tensor of rank {ndim}")
            dims.append(d % ndim)
        if len(set(dims)) != len(dims):
            raise InvalidArgumentError(f"fp8: scale_over {self.scale_over} names a dim twice for rank {ndim}")
        return tuple(sorted(dims))

    @staticmethod
    def _scale_shape(shape, dims) -> tuple[int, ...]:
        return tuple(1 if i in dims else int(s) for i, s in enumerate(shape))

    def encoded_nbytes(self, shape, dtype) -> int:
        shape = tuple(int(s) for s in shape)
        if dtype not in _DTYPE_CODES:
            raise InvalidArgumentError(f"fp8: dtype {_dtype_name(dtype)} is not supported")
        if not 1 <= len(shape) <= MAX_NDIM:
            raise InvalidArgumentError(f"fp8: rank {len(shape)} is outside 1..{MAX_NDIM}")
        dims = self._dims(len(shape))
        scales = math.prod(self._scale_shape(shape, dims)) * _element_size(self.scale_dtype)
        return _header_nbytes(len(shape), self._PARAMS.size) + _align(scales) + math.prod(shape)

    def _params(self, ndim: int) -> bytes:
        return self._PARAMS.pack(_FP8_SCALE_CODES[self.scale_dtype], sum(1 << d for d in self._dims(ndim)))

    def batch_header(self, shape, dtype) -> bytes:
        shape = tuple(int(d) for d in shape)
        return _pack_header(self, dtype, shape, self._params(len(shape)))

    def _encode(self, tensor):
        blobs, ok = self.encode_many(tensor.unsqueeze(0))
        if not bool(ok[0]):
            bad = "NaN" if bool(torch.isnan(tensor).any()) else "inf"
            raise InvalidArgumentError(
                f"fp8: the tensor holds {bad}, which e4m3 with a finite scale cannot encode "
                "(encode such KV with 'none' or 'byteplane_zstd')"
            )
        return blobs[0]

    def encode_many(self, tensors):
        self._check_stack(tensors)
        if self._fused(tensors.device, tuple(tensors.shape[1:]), tensors.dtype):
            return self._encode_fused(tensors)
        return self._encode_torch(tensors)

    def _fused(self, device: torch.device, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        """Whether the core's fused passes code this stack: on the CPU, or on a GPU of a build
        with CUDA; one scale per row (the default ``scale_over``), and rows whose scales stay
        aligned."""
        from kvtier import _core

        if device.type not in ("cpu", "cuda") or dtype not in _DTYPE_CODES:
            return False
        if device.type == "cuda" and not _core.CUDA_COMPILED:
            return False
        if self._dims(len(shape)) != (len(shape) - 1,):
            return False
        return self.encoded_nbytes(shape, dtype) % self.scale_dtype.itemsize == 0

    def _rows(self, shape: tuple[int, ...], dtype: torch.dtype, h: int) -> dict:
        """The fused kernels' geometry of blobs of tensors of ``shape`` whose header is ``h``
        bytes, one after another: keyword arguments of ``_core.fp8_encode_rows`` / ``fp8_decode_rows``."""
        rows = math.prod(shape[:-1])
        return dict(
            rows=rows,
            row_elems=shape[-1],
            elem=_dtype_name(dtype),
            scale=_dtype_name(self.scale_dtype),
            blob_stride=h + _align(rows * self.scale_dtype.itemsize) + math.prod(shape),
            scale_offset=h,
            payload_offset=h + _align(rows * self.scale_dtype.itemsize),
        )

    def _encode_fused(self, tensors):
        """encode_many in one kernel pass (the same bytes as :meth:`_encode_torch`)."""
        src = tensors.contiguous()
        shape = tuple(tensors.shape[1:])
        return self._encode_kernel(len(tensors), shape, tensors.dtype, src.device, raw=src.data_ptr())

    def _encode_kernel(
        self, n: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, out=None, threads=1, **where
    ):
        """The core's fused encode of ``n`` chunks of ``shape`` whose rows ``where`` says
        (``raw=`` an address, or paged arguments): ``(blobs, ok)``, headers included, the blobs
        in ``out`` where given."""
        from kvtier import _core

        header = self.batch_header(shape, dtype)
        header_t = _header_tensor(header, device)
        geo = self._rows(shape, dtype, len(header))
        blobs = out
        if blobs is None:
            blobs = torch.empty((n, geo["blob_stride"]), dtype=torch.uint8, device=device)
        elif (
            blobs.dtype != torch.uint8
            or tuple(blobs.shape) != (n, geo["blob_stride"])
            or not blobs.is_contiguous()
            or blobs.device != device
        ):
            raise InvalidArgumentError(
                f"fp8: out must be a contiguous uint8 tensor of shape ({n}, {geo['blob_stride']}) on {device}"
            )
        ok = torch.empty(n, dtype=torch.uint8, device=device)
        # The core writes headers and padding on the host and for chunks in pages; a GPU stack of
        # gathered chunks gets them from torch.
        in_core = device.type == "cpu" or "page_ids" in where
        if not in_core:
            blobs[:, : len(header)] = header_t
            blobs[:, len(header) + geo["rows"] * self.scale_dtype.itemsize : geo["payload_offset"]] = 0
        _core.fp8_encode_rows(
            device=_device_index(device),
            raw=where.pop("raw", 0),
            blobs=blobs.data_ptr(),
            ok=ok.data_ptr(),
            chunks=n,
            stream=_stream_of(device),
            header=header_t.data_ptr() if in_core else 0,
            header_bytes=len(header) if in_core else 0,
            host_threads=threads,
            **geo,
            **where,
        )
        return blobs, ok.view(torch.bool)  # 0 or 1 a byte: no copy

    def pages_fused(self, shape, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether :meth:`encode_pages` and :meth:`decode_pages` take chunks of ``shape`` and
        ``dtype`` on ``device`` (the core's fused passes code them)."""
        return self._fused(torch.device(device), tuple(int(d) for d in shape), dtype)

    def encode_pages(
        self, paged: PagedChunks, shape, dtype: torch.dtype, out: torch.Tensor | None = None, threads: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode_many` of the chunks in ``paged`` (each of ``shape`` and ``dtype``, its
        rows read in place: no gathered copy), queued on the pages' device's current stream.
        Needs :meth:`pages_fused`; the rows of ``shape`` fill the pages exactly. ``out``: the
        ``[chunks, encoded_nbytes]`` uint8 tensor on that device to write the blobs into (and
        returned); None allocates it. ``threads``: on the CPU, how many threads the core's host
        pass splits the rows among (the calling one and ``threads - 1`` of its own).

        Raises:
            InvalidArgumentError: the pages do not hold chunks of ``shape`` (the core's check),
                or ``out`` is not such a tensor.
        """
        device = paged.page_ids.device
        shape = tuple(int(d) for d in shape)
        if not self.pages_fused(shape, dtype, device):
            raise InvalidArgumentError(
                f"fp8: chunks of {_dtype_name(dtype)} {shape} on {device} are not coded in their pages"
            )
        return self._encode_kernel(paged.chunks, shape, dtype, device, out=out, threads=threads, **paged.kwargs())

    def decode_pages(
        self,
        blobs: torch.Tensor,
        header: BlobHeader,
        paged: PagedChunks,
        *,
        decoded: torch.Tensor | None = None,
        stop: torch.Tensor | None = None,
        threads: int = 1,
    ) -> None:
        """Decode the rows of ``blobs`` (blobs of ``header``, as for :meth:`decode_many`) into
        the chunks' pages of ``paged``, one chunk per row, queued on their device's current
        stream. Needs :meth:`pages_fused`.

        Args:
            decoded, stop: None where the caller has checked that every row starts with
                ``header``'s bytes; else one-element int32 tensors on the blobs' device, and the
                check is made on the device, in the same queue: only the rows before the first
                that does not start with them are decoded, their number is written to
                ``decoded``, and ``stop`` is set to 1 where a row did not; with ``stop`` already
                nonzero nothing is decoded (a stack queued behind one that stopped leaves its
                pages alone). Nothing waits for the device.
            threads: on the CPU, how many threads the core's host pass splits the rows among.
        """

        if not self._decodes_fused(blobs, header) or len(blobs) != paged.chunks:
            raise InvalidArgumentError(
                f"fp8: {len(blobs)} blobs of {_dtype_name(header.dtype)} {header.shape} on {blobs.device} "
                f"do not decode into {paged.chunks} chunks of pages"
            )
        check = {}
        if decoded is not None or stop is not None:
            for name, t in (("decoded", decoded), ("stop", stop)):
                if t is None or t.dtype != torch.int32 or t.numel() != 1 or t.device != blobs.device:
                    raise InvalidArgumentError(f"fp8: `{name}` must be a one-element int32 tensor on {blobs.device}")
            want = _header_tensor(self.batch_header(header.shape, header.dtype), blobs.device)
            check = dict(
                header=want.data_ptr(), header_bytes=len(want), decoded=decoded.data_ptr(), stop=stop.data_ptr()
            )
        self._decode_kernel(blobs, header, threads=threads, **paged.kwargs(), **check)

    def _encode_torch(self, tensors):
        """encode_many in torch operations (any device, any ``scale_over``)."""
        n, shape = len(tensors), tuple(tensors.shape[1:])
        dims = tuple(d + 1 for d in self._dims(len(shape)))  # of the stack: dim 0 is the tensor
        amax = tensors.abs().amax(dim=dims, keepdim=True).float()
        ok = torch.isfinite(amax).reshape(n, -1).all(dim=1)  # a NaN or inf of a group is in its amax
        # A tensor divisor: CUDA divides by a Python scalar as a multiply by its reciprocal, which
        # 448 does not have exactly, so its float32 scales came out an ulp off the CPU's.
        scale = torch.div(amax, torch.full_like(amax, _FP8_MAX)).clamp_min(_MIN_SCALE)
        stored = scale.to(self.scale_dtype)
        if self.scale_dtype != torch.float32:
            # Rounded down, the group's largest value would exceed 448 after division: step up
            # to the next bfloat16 (scales are positive and finite, so that is the bit pattern + 1).
            up = (stored.view(torch.int16) + 1).view(self.scale_dtype)
            stored = torch.where(stored.float() < scale, up, stored)
        # Divides in float32 (bf16/fp16 promote), so each value is rounded once, by the e4m3 cast.
        scaled = torch.div(tensors, stored.float()).clamp_(-_FP8_MAX, _FP8_MAX)

        header = self.batch_header(shape, tensors.dtype)
        h = len(header)
        scale_bytes = stored[0].numel() * stored.element_size()
        start = h + _align(scale_bytes)
        blobs = torch.empty((n, start + math.prod(shape)), dtype=torch.uint8, device=tensors.device)
        blobs[:, :h] = _header_tensor(header, tensors.device)
        blobs[:, h : h + scale_bytes] = stored.reshape(n, -1).view(torch.uint8)
        blobs[:, h + scale_bytes : start] = 0
        blobs[:, start:].view(_FP8).view(n, *shape).copy_(scaled)  # the e4m3 cast, into the blobs
        return blobs, ok

    def _read_params(self, header) -> tuple[torch.dtype, tuple[int, ...], int]:
        """(scale dtype, scale shape, scale bytes) from a blob's header."""
        if len(header.params) != self._PARAMS.size:
            raise CorruptionError(f"fp8 blob header damaged: {len(header.params)} parameter bytes")
        scale_code, mask = self._PARAMS.unpack(header.params)
        if scale_code not in _FP8_SCALE_BY_CODE:
            raise CorruptionError(f"fp8 blob names unknown scale dtype code {scale_code}")
        ndim = len(header.shape)
        dims = tuple(d for d in range(ndim) if mask >> d & 1)
        if not dims or mask >> ndim:
            raise CorruptionError(f"fp8 blob header damaged: scale dims mask {mask:#x} for rank {ndim}")
        scale_dtype = _FP8_SCALE_BY_CODE[scale_code]
        scale_shape = self._scale_shape(header.shape, dims)
        return scale_dtype, scale_shape, math.prod(scale_shape) * _element_size(scale_dtype)

    def _payload_nbytes(self, header):
        return _align(self._read_params(header)[2]) + math.prod(header.shape)

    def _decode(self, blob, header):
        self._check_payload(blob, header, self._payload_nbytes(header))
        return self._decode_rows(blob.unsqueeze(0), header)[0]

    def _decode_rows(self, blobs, header):
        if self._decodes_fused(blobs, header):
            return self._decode_fused(blobs, header)
        return self._decode_torch(blobs, header)

    def _decodes_fused(self, blobs, header) -> bool:
        """Whether the core's fused pass decodes these rows of blobs of ``header``."""
        scale_dtype, scale_shape, _ = self._read_params(header)
        return (
            scale_dtype == self.scale_dtype
            and scale_shape == (*header.shape[:-1], 1)  # one scale per row
            and blobs.stride(1) == 1
            and blobs.data_ptr() % scale_dtype.itemsize == 0
            and blobs.stride(0) % scale_dtype.itemsize == 0
            and self._fused(blobs.device, header.shape, header.dtype)
        )

    def _decode_fused(self, blobs, header):
        """_decode_rows in one kernel pass (the same values as :meth:`_decode_torch`)."""
        out = torch.empty((len(blobs), *header.shape), dtype=header.dtype, device=blobs.device)
        self._decode_kernel(blobs, header, raw=out.data_ptr())
        return out

    def _decode_kernel(self, blobs, info: BlobHeader, threads=1, **where) -> None:
        """The core's fused decode of the rows of ``blobs`` (blobs ``info`` describes) into the
        raw chunks ``where`` says (``raw=`` an address, or paged arguments, and a header check)."""
        from kvtier import _core

        geo = self._rows(info.shape, info.dtype, info.header_nbytes)
        geo["blob_stride"] = blobs.stride(0)
        _core.fp8_decode_rows(
            device=_device_index(blobs.device),
            blobs=blobs.data_ptr(),
            raw=where.pop("raw", 0),
            chunks=len(blobs),
            stream=_stream_of(blobs.device),
            host_threads=threads,
            **geo,
            **where,
        )

    def _decode_torch(self, blobs, header):
        scale_dtype, scale_shape, scale_bytes = self._read_params(header)
        n, numel, h = len(blobs), math.prod(header.shape), header.header_nbytes
        # A copy (small: a scale per group): a row's scales may start at any byte of the stack.
        scale = _packed(blobs[:, h : h + scale_bytes]).view(scale_dtype).view(n, *scale_shape).float()
        start = h + _align(scale_bytes)
        q = blobs[:, start : start + numel].view(n, *header.shape)
        if q.device.type == "cpu":
            # torch's own e4m3 -> float32 cast runs at ~0.15 GB/s on a CPU; a 256-entry table
            # built from that same cast gives the same values several times faster.
            values = torch.from_numpy(np.take(_fp8_table(), q.numpy()))
        else:
            values = q.view(_FP8).float()
        return values.mul_(scale).to(header.dtype)


@functools.cache
def _fp8_table() -> np.ndarray:
    """float32 value of each of the 256 e4m3fn codes, as torch casts them."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(_FP8).float().numpy()


class ByteplaneZstdCodec(Codec):
    """Lossless: byte planes, the top plane compressed with zstd. Bit-exact for every value,
    NaN payloads, infinities, -0.0 and subnormals included. Variable size.

    An element of ``E`` bytes (2 for bf16/fp16, 4 for fp32) is split into ``E`` planes, plane 0
    holding every element's most significant byte (sign and the top exponent bits), plane
    ``E-1`` the least significant. Exponents of KV cluster in a few values, so plane 0 codes to
    a fraction of its size; mantissa bytes are close to random and are stored as they are unless
    ``coded_planes`` asks otherwise (a plane whose code is no smaller is stored raw anyway).

    Needs the ``zstandard`` package (``pip install kvtier[codecs]``).

    Layout after the header: the planes in order, each either raw (``numel`` bytes) or one zstd
    frame (with its content size); the header's parameters give each plane's method and stored
    length.
    """

    name = "byteplane_zstd"
    codec_id = 2
    version = 1
    lossless = True
    fixed_size = False

    # params: <element size, zstd level (signed)>, then per plane <method (0 raw, 1 zstd), length>
    _PARAMS = struct.Struct("<Bb")
    _PLANE = struct.Struct("<BQ")

    def __init__(self, *, level: int = 1, coded_planes: int = 1) -> None:
        try:
            import zstandard
        except ImportError as e:
            raise UnavailableError(
                "byteplane_zstd needs the zstandard package: pip install 'kvtier[codecs]' (or zstandard)"
            ) from e
        if not isinstance(level, int) or not -7 <= level <= 22:
            raise InvalidArgumentError(f"byteplane_zstd: level must be an int in -7..22, got {level!r}")
        if not isinstance(coded_planes, int) or not 1 <= coded_planes <= 4:
            raise InvalidArgumentError(f"byteplane_zstd: coded_planes must be 1..4, got {coded_planes!r}")
        self._zstd = zstandard
        self.level = level
        self.coded_planes = coded_planes

    @property
    def spec(self) -> str:
        # The level and plane choice change the bytes but not how they are read: left out.
        return f"{self.name}/v{self.version}"

    def _encode(self, tensor):
        esize = tensor.element_size()
        rows = tensor.view(-1).view(torch.uint8).view(-1, esize)
        # Little-endian bytes: column esize-1 is the most significant; plane 0 takes it.
        compressor = self._zstd.ZstdCompressor(level=self.level, write_content_size=True)
        pieces, table = [], []
        for plane in range(esize):
            raw = rows[:, esize - 1 - plane].contiguous().cpu().numpy()
            method, data = 0, raw
            if plane < self.coded_planes:
                coded = compressor.compress(raw)
                if len(coded) < raw.nbytes:
                    method, data = 1, np.frombuffer(coded, dtype=np.uint8)
            pieces.append(data)
            table.append(self._PLANE.pack(method, data.nbytes))
        params = self._PARAMS.pack(esize, self.level) + b"".join(table)
        header = _pack_header(self, tensor.dtype, tensor.shape, params)
        out = np.empty(len(header) + sum(p.nbytes for p in pieces), dtype=np.uint8)
        out[: len(header)] = np.frombuffer(header, dtype=np.uint8)
        pos = len(header)
        for p in pieces:
            out[pos : pos + p.nbytes] = p
            pos += p.nbytes
        return torch.from_numpy(out)

    def max_encoded_nbytes(self, shape, dtype) -> int:
        # Every plane stored raw (a coded plane is kept only when smaller).
        esize = _element_size(dtype)
        params = self._PARAMS.size + esize * self._PLANE.size
        return _header_nbytes(len(shape), params) + math.prod(int(s) for s in shape) * esize

    def _payload_nbytes(self, header):
        return sum(length for _, length in self._read_planes(header))

    def _read_planes(self, header) -> list[tuple[int, int]]:
        """Each plane's (method, stored length) from a blob's header."""
        esize = _element_size(header.dtype)
        numel = math.prod(header.shape)
        expected_params = self._PARAMS.size + esize * self._PLANE.size
        if len(header.params) != expected_params:
            raise CorruptionError(
                f"byteplane_zstd blob header damaged: {len(header.params)} parameter bytes, "
                f"expected {expected_params} for {_dtype_name(header.dtype)}"
            )
        if self._PARAMS.unpack_from(header.params)[0] != esize:
            raise CorruptionError(f"byteplane_zstd blob header damaged: element size does not match {header.dtype}")
        at = self._PARAMS.size
        planes = [self._PLANE.unpack_from(header.params, at + i * self._PLANE.size) for i in range(esize)]
        for method, length in planes:
            if method not in (0, 1) or (method == 0 and length != numel):
                raise CorruptionError(f"byteplane_zstd blob header damaged: plane (method {method}, length {length})")
        return planes

    def _decode(self, blob, header):
        esize = _element_size(header.dtype)
        numel = math.prod(header.shape)
        planes = self._read_planes(header)
        self._check_payload(blob, header, sum(length for _, length in planes))
        device = blob.device
        data = blob.cpu().numpy()
        rows = np.empty((numel, esize), dtype=np.uint8)
        decompressor = self._zstd.ZstdDecompressor()
        pos = header.header_nbytes
        for plane, (method, length) in enumerate(planes):
            stored = data[pos : pos + length]
            pos += length
            if method == 1:
                try:
                    plain = decompressor.decompress(stored, max_output_size=numel)
                except self._zstd.ZstdError as e:
                    raise CorruptionError(f"byteplane_zstd blob: plane {plane} does not decode: {e}") from e
                if len(plain) != numel:
                    raise CorruptionError(
                        f"byteplane_zstd blob: plane {plane} decodes to {len(plain)} bytes, expected {numel}"
                    )
                stored = np.frombuffer(plain, dtype=np.uint8)
            rows[:, esize - 1 - plane] = stored
        out = torch.from_numpy(rows).view(-1).view(header.dtype).view(header.shape)
        return out if device.type == "cpu" else out.to(device)


_CODECS: dict[str, type[Codec]] = {c.name: c for c in (NoneCodec, Fp8Codec, ByteplaneZstdCodec)}


def codec_names() -> list[str]:
    """The names :func:`make_codec` takes."""
    return list(_CODECS)


def make_codec(name: str, **options) -> Codec:
    """The codec called ``name`` with its options.

    ``none`` takes none; ``fp8`` takes ``scale_dtype`` (``"float32"`` or ``"bfloat16"``) and
    ``scale_over`` (dims a scale spans, default ``(-1,)``); ``byteplane_zstd`` takes ``level``
    (zstd level, default 1) and ``coded_planes`` (default 1).

    Raises:
        InvalidArgumentError: unknown name or option.
        UnavailableError: the codec's library is not installed.
    """
    cls = _CODECS.get(name)
    if cls is None:
        raise InvalidArgumentError(f"unknown codec {name!r}; known: {', '.join(_CODECS)}")
    try:
        return cls(**options)
    except TypeError as e:
        raise InvalidArgumentError(f"codec {name!r}: {e}") from e


def codec_from_settings(name: str, *, fp8_scale_dtype: str = "bfloat16", zstd_level: int = 1) -> Codec:
    """The codec a ``codec`` config section names (``codec.name``, ``codec.fp8_scale_dtype``,
    ``codec.zstd_level``): the one a cache encodes its tiers with, and a standalone peer node
    serving them derives its blob format from.

    Raises:
        InvalidArgumentError / UnavailableError: as :func:`make_codec`.
    """
    options = {"fp8": {"scale_dtype": fp8_scale_dtype}, "byteplane_zstd": {"level": zstd_level}}.get(name, {})
    return make_codec(name, **options)
