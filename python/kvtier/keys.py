"""Chunk keys: the 16-byte chained names under which kvtier stores and finds KV chunks.

A chunk key names a whole token prefix, not just one chunk::

    key_{-1} = namespace_key(model_id, layout_fingerprint, tenant_salt)
    key_i    = blake2b-128(key_{i-1} || int32-LE token ids of chunk i)

so two prompts share chunk ``i`` only if they agree on every token up to the end of chunk ``i``
and on the model, KV layout and tenant. Only full chunks get keys. This module is pure Python
(hashlib + numpy; torch only when handed a tensor) so that it works without the compiled core.

Example::

    >>> ns = namespace_key("meta-llama/Llama-3.1-8B", b"\\x00" * 16)
    >>> keys = chunk_keys(list(range(600)), chunk_tokens=256, namespace=ns)
    >>> len(keys), len(keys[0])
    (2, 16)
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from hashlib import blake2b

import numpy as np

from kvtier.errors import InvalidArgumentError

__all__ = ["KEY_BYTES", "MAX_TOKEN_ID", "ChunkKeyer", "chunk_keys", "namespace_key", "token_bytes"]

KEY_BYTES = 16
"""Length of a chunk key and of a namespace key, in bytes."""

MAX_TOKEN_ID = 2**31 - 1
"""Largest token id a key can encode: ids are hashed as little-endian int32."""

# Every bad argument raises InvalidArgumentError (a ValueError), wrong types included (hence the
# TRY004 waivers), so callers catch one class.

# Bumping the version tag re-keys every chunk, which is the point: a change to this encoding
# must never let old blobs match new prompts.
_NAMESPACE_TAG = b"kvtier-ns-v1"
_INT32_LE = np.dtype("<i4")


def _bytes_field(value: bytes) -> bytes:
    # Length-prefixed so that ("ab", "c") and ("a", "bc") encode differently.
    return struct.pack("<I", len(value)) + value


def _as_fingerprint_bytes(layout_fingerprint: bytes | bytearray | memoryview | str) -> bytes:
    if isinstance(layout_fingerprint, str):
        # A str is the hex form (Layout.fingerprint_hex), so that passing either form of the
        # same fingerprint gives the same namespace instead of silently splitting the cache.
        try:
            raw = bytes.fromhex(layout_fingerprint)
        except ValueError:
            raise InvalidArgumentError(
                "layout_fingerprint: a str must be the hex form of the fingerprint "
                f"(Layout.fingerprint_hex), got {layout_fingerprint!r}"
            ) from None
    elif isinstance(layout_fingerprint, (bytes, bytearray, memoryview)):
        raw = bytes(layout_fingerprint)
    else:
        raise InvalidArgumentError(
            f"layout_fingerprint must be bytes or a hex str, got {type(layout_fingerprint).__name__}"
        )
    if not raw:
        raise InvalidArgumentError("layout_fingerprint must not be empty")
    return raw


def namespace_key(
    model_id: str,
    layout_fingerprint: bytes | str,
    tenant_salt: bytes | str | None = None,
) -> bytes:
    """Derive the 16-byte namespace key (``key_{-1}`` of every chain) for one model, layout and
    tenant.

    Args:
        model_id: the model's name, e.g. ``"meta-llama/Llama-3.1-8B"``; non-empty.
        layout_fingerprint: ``Layout.fingerprint`` (bytes) or ``Layout.fingerprint_hex`` (str);
            both forms give the same namespace.
        tenant_salt: optional per-tenant secret. ``None`` (no salt) and ``b""`` (an empty salt)
            are different namespaces; a str salt is UTF-8 encoded, so ``"t1"`` equals ``b"t1"``.

    Returns:
        16 bytes: blake2b-128 over ``b"kvtier-ns-v1"`` followed by each field as a 4-byte
        little-endian length and its bytes (the salt preceded by a presence byte).

    Example::

        >>> ns = namespace_key("my-model", "00" * 16, tenant_salt="tenant-a")
        >>> len(ns)
        16
    """
    if not isinstance(model_id, str) or not model_id:
        raise InvalidArgumentError(f"model_id must be a non-empty str, got {model_id!r}")
    fingerprint = _as_fingerprint_bytes(layout_fingerprint)
    if tenant_salt is None:
        salt_field = b"\x00"
    elif isinstance(tenant_salt, str):
        salt_field = b"\x01" + _bytes_field(tenant_salt.encode("utf-8"))
    elif isinstance(tenant_salt, (bytes, bytearray, memoryview)):
        salt_field = b"\x01" + _bytes_field(bytes(tenant_salt))
    else:
        raise InvalidArgumentError(f"tenant_salt must be bytes, str or None, got {type(tenant_salt).__name__}")
    h = blake2b(_NAMESPACE_TAG, digest_size=KEY_BYTES)
    h.update(_bytes_field(model_id.encode("utf-8")))
    h.update(_bytes_field(fingerprint))
    h.update(salt_field)
    return h.digest()


def _check_range(ids: np.ndarray) -> None:
    """Raise InvalidArgumentError naming the first id outside [0, 2**31) of an integer array."""
    if ids.size == 0:
        return
    # One unsigned reduction checks both ends: a negative id wraps to a huge unsigned value.
    unsigned = ids.view(np.dtype(f"u{ids.dtype.itemsize}"))
    if int(unsigned.max()) <= MAX_TOKEN_ID:
        return
    if ids.dtype.kind == "u":
        bad = ids > MAX_TOKEN_ID
    else:
        bad = (ids < 0) | (ids > MAX_TOKEN_ID)
    pos = int(np.flatnonzero(bad)[0])
    raise InvalidArgumentError(
        f"tokens[{pos}] = {int(ids[pos])} is not a valid token id: ids must lie in "
        f"[0, {MAX_TOKEN_ID}] to be hashed as int32"
    )


def _from_numpy(ids: np.ndarray, what: str = "numpy array") -> np.ndarray:
    if ids.ndim != 1:
        raise InvalidArgumentError(f"tokens must be 1-D, got a {what} of shape {tuple(ids.shape)}")
    kind = ids.dtype.kind
    if kind == "b":
        raise InvalidArgumentError(f"tokens must be integer token ids, got a bool {what}")
    if kind in "fc":
        raise InvalidArgumentError(f"tokens must be integer token ids, got a {what} of dtype {ids.dtype}")
    if kind not in "iu":
        raise InvalidArgumentError(f"tokens must be integer token ids, got a {what} of dtype {ids.dtype}")
    if ids.dtype.byteorder == ">":
        ids = ids.astype(ids.dtype.newbyteorder("<"))
    _check_range(ids)
    # Free when the input is already contiguous little-endian int32; one pass otherwise.
    return np.ascontiguousarray(ids, dtype=_INT32_LE)


def _from_torch(tensor) -> np.ndarray:
    import torch  # only reached when handed a tensor, so torch stays optional

    if tensor.dim() != 1:
        raise InvalidArgumentError(f"tokens must be 1-D, got a torch tensor of shape {tuple(tensor.shape)}")
    if tensor.dtype == torch.bool:
        raise InvalidArgumentError("tokens must be integer token ids, got a bool torch tensor")
    if tensor.is_floating_point() or tensor.is_complex():
        raise InvalidArgumentError(f"tokens must be integer token ids, got a torch tensor of {tensor.dtype}")
    if tensor.device.type == "meta":
        raise InvalidArgumentError("tokens must hold token ids, got a torch tensor on the meta device (it has no data)")
    tensor = tensor.detach().cpu()
    try:
        ids = tensor.numpy()
    except TypeError:
        # Integer dtypes numpy cannot share memory with (e.g. older torch's uint32).
        ids = tensor.to(torch.int64).numpy()
    return _from_numpy(ids, what="torch tensor")


def _from_sequence(tokens: Sequence) -> np.ndarray:
    # numpy would silently truncate 1.5 to 1, read True as 1 and parse "7" as 7, so the element
    # types are checked first. One set over the types is cheap next to the conversion itself.
    types = set(map(type, tokens))
    if not types <= {int}:
        for t in types:
            if t is int:
                continue
            ok = issubclass(t, (int, np.integer)) and not issubclass(t, (bool, np.bool_))
            if not ok:
                pos = next(i for i, x in enumerate(tokens) if type(x) is t)
                if issubclass(t, (list, tuple, np.ndarray)):
                    problem = "tokens must be 1-D, got a nested sequence"
                else:
                    problem = "tokens must be integer token ids"
                raise InvalidArgumentError(f"{problem}: tokens[{pos}] = {tokens[pos]!r} is a {t.__name__}")
    try:
        ids = np.fromiter(tokens, dtype=np.int64, count=len(tokens))
    except OverflowError:
        pos, value = next((i, x) for i, x in enumerate(tokens) if not 0 <= int(x) <= MAX_TOKEN_ID)
        raise InvalidArgumentError(
            f"tokens[{pos}] = {int(value)} is not a valid token id: ids must lie in "
            f"[0, {MAX_TOKEN_ID}] to be hashed as int32"
        ) from None
    return _from_numpy(ids, what="sequence")


def token_bytes(tokens) -> np.ndarray:
    """Return ``tokens`` as a validated, contiguous little-endian int32 numpy array.

    ``tokens`` is a list/tuple/range of ints, a 1-D numpy integer array or a 1-D torch integer
    tensor (any device; it is copied to the CPU). Raises InvalidArgumentError for floats, bools, other
    dtypes, non-1-D input and ids outside ``[0, 2**31)``, naming the value and its position.

    Example::

        >>> token_bytes([1, 2, 3]).tobytes()
        b'\\x01\\x00\\x00\\x00\\x02\\x00\\x00\\x00\\x03\\x00\\x00\\x00'
    """
    # torch.Size is a tuple from the torch module: the sequence path below handles it.
    if type(tokens).__module__.startswith("torch") and not isinstance(tokens, tuple):
        return _from_torch(tokens)
    if isinstance(tokens, np.ndarray):
        return _from_numpy(tokens)
    if isinstance(tokens, (list, tuple, range)):
        if len(tokens) == 0:
            return np.empty(0, dtype=_INT32_LE)
        return _from_sequence(tokens)
    raise InvalidArgumentError(
        "tokens must be a list/tuple of ints, a 1-D numpy integer array or a 1-D torch integer "
        f"tensor, got {type(tokens).__name__}"
    )


def _check_chunk_tokens(chunk_tokens) -> int:
    if isinstance(chunk_tokens, (bool, np.bool_)) or not isinstance(chunk_tokens, (int, np.integer)):
        raise InvalidArgumentError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    if chunk_tokens <= 0:
        raise InvalidArgumentError(f"chunk_tokens must be a positive int, got {chunk_tokens}")
    return int(chunk_tokens)


def _check_namespace(namespace) -> bytes:
    if not isinstance(namespace, (bytes, bytearray, memoryview)):
        raise InvalidArgumentError(
            f"namespace must be {KEY_BYTES} bytes (see namespace_key), got {type(namespace).__name__}"
        )
    namespace = bytes(namespace)
    if len(namespace) != KEY_BYTES:
        raise InvalidArgumentError(
            f"namespace must be {KEY_BYTES} bytes (see namespace_key), got {len(namespace)} bytes"
        )
    return namespace


def chunk_keys(tokens, chunk_tokens: int, namespace: bytes) -> list[bytes]:
    """Compute the chained 16-byte key of every full chunk of ``tokens``.

    Args:
        tokens: token ids, shape ``[num_tokens]``: a list/tuple of ints, a numpy integer array or
            a torch integer tensor (any device). Every id must lie in ``[0, 2**31)``.
        chunk_tokens: tokens per chunk, a positive int (the layout's ``chunk_tokens``).
        namespace: 16 bytes, ``key_{-1}`` of the chain (see :func:`namespace_key`).

    Returns:
        ``num_tokens // chunk_tokens`` keys; a trailing partial chunk gets none.

    To extend a chain (more tokens appended after ``k`` full chunks), pass the last key as the
    namespace: ``chunk_keys(tokens[k * chunk_tokens:], chunk_tokens, keys[k - 1])`` continues it.

    Example::

        >>> ns = namespace_key("my-model", b"\\x01" * 16)
        >>> a = chunk_keys(list(range(600)), 256, ns)
        >>> b = chunk_keys(list(range(512)) + [7] * 88, 256, ns)
        >>> len(a), a == b
        (2, True)
    """
    chunk_tokens = _check_chunk_tokens(chunk_tokens)
    prev = _check_namespace(namespace)
    ids = token_bytes(tokens)
    num_chunks = ids.shape[0] // chunk_tokens
    view = memoryview(ids).cast("B")
    step = chunk_tokens * _INT32_LE.itemsize
    # The loop is the hot path (a 128k-token prompt is 512 chunks). Copying a fresh
    # 16-byte-digest hasher skips blake2b()'s keyword parsing on every chunk, memoryview slices
    # copy no token bytes, and bound locals spare lookups.
    keys: list[bytes] = []
    append = keys.append
    fresh_hasher = blake2b(digest_size=KEY_BYTES).copy
    for start in range(0, num_chunks * step, step):
        h = fresh_hasher()
        h.update(prev)
        h.update(view[start : start + step])
        prev = h.digest()
        append(prev)
    return keys


class ChunkKeyer:
    """Bundle of everything that scopes chunk keys: model, layout fingerprint, chunk size, tenant.

    Example::

        >>> keyer = ChunkKeyer("my-model", b"\\x02" * 16, chunk_tokens=256, tenant_salt="t1")
        >>> keys = keyer.keys(list(range(1000)))  # 3 full chunks
        >>> len(keys), keyer.num_full_chunks(1000)
        (3, 3)
    """

    __slots__ = ("_chunk_tokens", "_fingerprint", "_model_id", "_namespace", "_tenant_salt")

    def __init__(
        self,
        model_id: str,
        layout_fingerprint: bytes | str,
        chunk_tokens: int = 256,
        tenant_salt: bytes | str | None = None,
    ) -> None:
        self._namespace = namespace_key(model_id, layout_fingerprint, tenant_salt)
        self._model_id = model_id
        self._fingerprint = _as_fingerprint_bytes(layout_fingerprint)
        self._chunk_tokens = _check_chunk_tokens(chunk_tokens)
        self._tenant_salt = tenant_salt

    @classmethod
    def from_layout(cls, model_id: str, layout, tenant_salt: bytes | str | None = None) -> ChunkKeyer:
        """Keyer for a :class:`kvtier.layout.Layout`: takes its key_fingerprint (its fingerprint,
        less a shard's ranks) and chunk_tokens."""
        return cls(model_id, layout.key_fingerprint, layout.chunk_tokens, tenant_salt)

    @property
    def namespace(self) -> bytes:
        """The 16-byte ``key_{-1}`` of every chain this keyer computes."""
        return self._namespace

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def layout_fingerprint(self) -> bytes:
        return self._fingerprint

    @property
    def chunk_tokens(self) -> int:
        return self._chunk_tokens

    @property
    def tenant_salt(self) -> bytes | str | None:
        return self._tenant_salt

    def num_full_chunks(self, num_tokens: int) -> int:
        """How many keys a prompt of ``num_tokens`` tokens gets."""
        return num_tokens // self._chunk_tokens

    def keys(self, tokens) -> list[bytes]:
        """Chunk keys of ``tokens`` (shape ``[num_tokens]``); see :func:`chunk_keys`."""
        return chunk_keys(tokens, self._chunk_tokens, self._namespace)

    def __repr__(self) -> str:
        salt = "none" if self._tenant_salt is None else "set"
        return (
            f"ChunkKeyer(model_id={self._model_id!r}, fingerprint={self._fingerprint.hex()}, "
            f"chunk_tokens={self._chunk_tokens}, tenant_salt={salt})"
        )
