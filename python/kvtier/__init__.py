"""kvtier: a tiered KV-cache engine for LLM inference (GPU, pinned CPU, NVMe, peers)."""

from __future__ import annotations

from kvtier import _core
from kvtier.cache import CacheConfig, KVCache, LoadHandle, StoreFuture
from kvtier.errors import (
    CacheGeometryError,
    CorruptionError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    KVTierError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from kvtier.keys import ChunkKeyer, chunk_keys, namespace_key
from kvtier.layout import Layout, Segment
from kvtier.pool import PagedKVPool

__version__: str = _core.__version__

__all__ = [
    "__version__",
    "KVCache",
    "CacheConfig",
    "StoreFuture",
    "LoadHandle",
    "PagedKVPool",
    "Layout",
    "Segment",
    "ChunkKeyer",
    "chunk_keys",
    "namespace_key",
    "KVTierError",
    "InvalidArgumentError",
    "NotFoundError",
    "ResourceExhaustedError",
    "FailedPreconditionError",
    "DeadlineExceededError",
    "CorruptionError",
    "CacheGeometryError",
    "UnavailableError",
]
