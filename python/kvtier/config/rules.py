"""Rules over several keys: the checks of keys that must fit together (disk.bytes with disk.dir,
gpu.bytes with gpu.pool_pages, model.chunk_tokens with gpu.page_tokens, cpu.verify_stores with
codec.name), in one list."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvtier.config.key_errors import _invalid


# Each rule reads some dotted keys and names one of them when they do not fit together. ``name``
# renders a dotted key as its caller knows it (``disk.bytes`` in a config, ``disk_bytes`` in a
# CacheConfig).
def _disk_needs_bytes(v: Mapping[str, Any], name: Any) -> None:
    if v["disk.dir"] is not None and v["disk.bytes"] < 1:
        raise _invalid(name("disk.bytes"), v["disk.bytes"], f"a size >= 1 byte when {name('disk.dir')} is set")


def _gpu_one_size(v: Mapping[str, Any], name: Any) -> None:
    if v["gpu.pool_pages"] is not None and v["gpu.bytes"] is not None:
        raise _invalid(
            name("gpu.bytes"),
            v["gpu.bytes"],
            f"null when {name('gpu.pool_pages')} is set (give one of the two)",
        )


def _chunk_of_pages(v: Mapping[str, Any], name: Any) -> None:
    if v["model.chunk_tokens"] % v["gpu.page_tokens"] != 0:
        raise _invalid(
            name("model.chunk_tokens"),
            v["model.chunk_tokens"],
            f"a multiple of {name('gpu.page_tokens')} ({v['gpu.page_tokens']})",
        )


def _verify_raw_blobs(v: Mapping[str, Any], name: Any) -> None:
    if v["cpu.verify_stores"] and v["codec.name"] != "none":
        raise _invalid(
            name("cpu.verify_stores"),
            v["cpu.verify_stores"],
            f"false when {name('codec.name')} is {v['codec.name']!r} "
            "(it compares raw blobs; the tier holds encoded ones)",
        )


_RULES: tuple[tuple[tuple[str, ...], Any], ...] = (
    (("disk.dir", "disk.bytes"), _disk_needs_bytes),
    (("gpu.pool_pages", "gpu.bytes"), _gpu_one_size),
    (("model.chunk_tokens", "gpu.page_tokens"), _chunk_of_pages),
    (("cpu.verify_stores", "codec.name"), _verify_raw_blobs),
)


def _check_rules(values: Mapping[str, Any], name: Any = str) -> None:
    """Every rule whose keys are all in ``values`` (dotted key -> checked value)."""
    for keys, rule in _RULES:
        if all(k in values for k in keys):
            rule(values, name)
