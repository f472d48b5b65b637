"""A standalone, cache-only peer: a CPU pool and a disk tier serving chunks to the cluster,
with no model and no GPU (``kvtier peer``).

It needs only the blob format it serves, given as a *layout spec* (a small JSON object), one of:

- ``{"blob_bytes": 33554432, "fingerprint": "<32 hex digits>", "chunk_tokens": 256}`` — exactly
  what the serving instances' ``Layout`` says (``layout_spec(layout)`` prints it);
  ``chunk_tokens`` is optional, but a disk directory a ``KVCache`` wrote records it and opens
  only with it;
- a model shape, from which kvtier derives both the way a serving instance would::

    {"kind": "vllm", "num_layers": 32, "kv_heads": 8, "head_dim": 128, "dtype": "bfloat16",
     "page_tokens": 16, "chunk_tokens": 256}

  (``kind`` one of ``vllm``, ``cross_layer``; needs torch.)

A cluster whose caches encode their chunks (``codec.name`` other than ``none``, docs/codecs.md)
moves encoded blobs between members, so a node serving it stores those: give the shape form a
``"codec"`` object with the serving instances' ``codec`` settings (``name``, and where set,
``fp8_scale_dtype``, ``zstd_level``, ``slot_fraction``), or pass the codec to ``layout_spec``,
which adds the codec's spec (and a reduced slot's ``slot_fraction``) to the explicit form so the
node's disk file carries the label a serving instance's does.

Chunks found only on its disk are promoted into the pool before they are served (the node owns a
one-chunk scratch page for the disk tier's load path), so a peer sees pool and disk alike. The
node's key journal lives in the cache directory: restart it on the same directory and its digest
is rebuilt from the chunks still on disk.
"""

from __future__ import annotations

import json
import os
import threading

import numpy as np

from kvtier import _core
from kvtier.errors import InvalidArgumentError
from kvtier.layout import disk_geometry_label
from kvtier.p2p.config import PeerConfig
from kvtier.p2p.service import PeerService


def layout_spec(layout, codec=None, slot_fraction: float = 1.0) -> dict:
    """The minimal spec of the blobs a cache of ``layout`` moves, for ``kvtier peer --layout``:
    its raw chunks, or with ``codec`` (a :class:`kvtier.codecs.Codec` other than ``none``) and
    the cache's ``codec.slot_fraction``, its encoded slots."""
    spec = {
        "blob_bytes": int(layout.chunk_bytes),
        "fingerprint": layout.fingerprint_hex,
        "chunk_tokens": int(layout.chunk_tokens),
    }
    if codec is None or codec.name == "none":
        return spec
    from kvtier.codec_tier import codec_fingerprint, slot_nbytes

    spec["blob_bytes"] = slot_nbytes(layout, codec, slot_fraction)
    spec["fingerprint"] = codec_fingerprint(layout, codec, slot_fraction).hex()
    spec["codec"] = codec.spec
    if slot_fraction != 1.0:
        spec["slot_fraction"] = slot_fraction
    return spec


def resolve_spec(spec: dict | str) -> tuple[int, bytes]:
    """(blob_bytes, fingerprint) from a spec dict, a JSON string or a path to a JSON file."""
    return _resolve(spec)[:2]


_CODEC_KEYS = ("name", "fp8_scale_dtype", "zstd_level", "slot_fraction")


def _resolve(spec: dict | str) -> tuple[int, bytes, str]:
    """(blob_bytes, fingerprint, disk geometry label) of a spec, as :func:`resolve_spec`."""
    if isinstance(spec, str):
        text = spec
        if not spec.lstrip().startswith("{"):
            try:
                with open(spec) as f:
                    text = f.read()
            except OSError as e:
                raise InvalidArgumentError(f"layout spec {spec!r}: {e.strerror}") from None
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidArgumentError(f"layout spec is not valid JSON: {e}") from None
    if not isinstance(spec, dict):
        raise InvalidArgumentError(f"layout spec must be a JSON object, got {type(spec).__name__}")
    if "blob_bytes" in spec:
        bb, fp = spec.get("blob_bytes"), spec.get("fingerprint")
        if isinstance(bb, bool) or not isinstance(bb, int) or bb <= 0:
            raise InvalidArgumentError(f"layout spec: blob_bytes must be a positive int, got {bb!r}")
        try:
            fpb = bytes.fromhex(fp)
        except (TypeError, ValueError):
            fpb = b""
        if len(fpb) != 16:
            raise InvalidArgumentError(f"layout spec: fingerprint must be 32 hex digits, got {fp!r}")
        ct = spec.get("chunk_tokens")
        if ct is not None and (isinstance(ct, bool) or not isinstance(ct, int) or ct <= 0):
            raise InvalidArgumentError(f"layout spec: chunk_tokens must be a positive int, got {ct!r}")
        codec = spec.get("codec")
        if codec is not None and (not isinstance(codec, str) or not codec or codec.startswith("none")):
            raise InvalidArgumentError(
                f"layout spec: codec must be an encoding codec's spec string (layout_spec prints it), got {codec!r}"
            )
        reduced = spec.get("slot_fraction", 1.0) != 1.0
        if reduced and codec is None:
            raise InvalidArgumentError("layout spec: slot_fraction needs a codec")
        return bb, fpb, disk_geometry_label(ct, codec, bb if reduced else None)
    return _from_shape(spec)


def _from_shape(spec: dict) -> tuple[int, bytes, str]:
    import torch

    from kvtier.layout import Layout

    need = ("kind", "num_layers", "kv_heads", "head_dim", "dtype", "page_tokens", "chunk_tokens")
    missing = [k for k in need if k not in spec]
    if missing:
        raise InvalidArgumentError(f"layout spec: missing {missing} (or give blob_bytes + fingerprint)")
    try:
        dtype = getattr(torch, spec["dtype"])
    except AttributeError:
        raise InvalidArgumentError(f"layout spec: unknown dtype {spec['dtype']!r}") from None
    L, H, D, pt = (int(spec[k]) for k in ("num_layers", "kv_heads", "head_dim", "page_tokens"))
    # One page is enough: the fingerprint and blob size do not depend on the number of pages.
    if spec["kind"] == "vllm":
        layout = Layout.from_vllm(
            [torch.zeros(2, 1, pt, H, D, dtype=dtype) for _ in range(L)], chunk_tokens=int(spec["chunk_tokens"])
        )
    elif spec["kind"] == "cross_layer":
        layout = Layout.from_cross_layer(
            torch.zeros(1, L, 2, pt, H, D, dtype=dtype), chunk_tokens=int(spec["chunk_tokens"])
        )
    else:
        raise InvalidArgumentError(f"layout spec: kind must be 'vllm' or 'cross_layer', got {spec['kind']!r}")
    codec = spec.get("codec")
    if codec is None:
        return layout.chunk_bytes, layout.fingerprint, layout.geometry_label
    from kvtier.codec_tier import codec_fingerprint, codec_geometry_label, slot_nbytes
    from kvtier.codecs import codec_from_settings

    if not isinstance(codec, dict) or "name" not in codec or set(codec) - set(_CODEC_KEYS):
        raise InvalidArgumentError(
            f"layout spec: codec must be an object with 'name' and any of {list(_CODEC_KEYS[1:])} "
            f"(the serving instances' codec settings), got {codec!r}"
        )
    settings = {k: codec[k] for k in ("fp8_scale_dtype", "zstd_level") if k in codec}
    made = codec_from_settings(codec["name"], **settings)
    fraction = codec.get("slot_fraction", 1.0)
    if isinstance(fraction, bool) or not isinstance(fraction, int | float):
        raise InvalidArgumentError(f"layout spec: codec.slot_fraction must be a number, got {fraction!r}")
    fraction = float(fraction)
    return (
        slot_nbytes(layout, made, fraction),
        codec_fingerprint(layout, made, fraction),
        codec_geometry_label(layout, made, fraction),
    )


class PeerNode:
    """A cache-only member: pinned pool + disk tier in ``cache_dir``, served by a PeerService."""

    def __init__(
        self,
        spec,
        peers: PeerConfig,
        *,
        cache_dir: str | None,
        cpu_bytes: int,
        disk_bytes: int = 0,
        disk_backend: str = "auto",
    ) -> None:
        blob_bytes, fingerprint, label = _resolve(spec)
        if cpu_bytes < 2 * blob_bytes:
            raise InvalidArgumentError(f"cpu_bytes={cpu_bytes} must hold at least 2 chunks of {blob_bytes} bytes")
        if cache_dir is not None and not os.path.isdir(cache_dir):
            raise InvalidArgumentError(f"cache_dir={cache_dir!r} is not an existing directory")
        if cache_dir is not None and disk_bytes <= 0:
            raise InvalidArgumentError("disk_bytes must be positive with a cache_dir")
        self.blob_bytes, self.fingerprint = blob_bytes, fingerprint
        # The scratch page the disk tier's load path scatters into when promoting a chunk.
        self._scratch = np.zeros(blob_bytes, dtype=np.uint8)
        base = self._scratch.ctypes.data
        self.tier = _core.CpuTier(
            [(base, blob_bytes, blob_bytes, 1)],
            -1,
            1,
            [[0]],
            cpu_bytes,
            "cpu",
            1 << 20,
            1,
            disk_dir=cache_dir or "",
            disk_bytes=disk_bytes if cache_dir else 0,
            layout_fingerprint=fingerprint,
            disk_backend=disk_backend,
            disk_geometry_label=label,
        )
        self._promote_lock = threading.Lock()
        self.service = PeerService(self.tier, fingerprint, peers, promote=self._promote, journal_dir=cache_dir)

    def _promote(self, key: bytes) -> bool:
        with self._promote_lock:
            op = self.tier.load(key, np.zeros(1, dtype=np.int64), 0)
            if op.transfer is not None:
                op.transfer.wait(self.service.config.request_timeout_s)
            return op.chunks == 1

    def start(self) -> PeerNode:
        self.service.start()
        return self

    def close(self) -> None:
        self.service.close()
        self.tier.drain(30.0)

    def __enter__(self) -> PeerNode:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
