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
from kvtier.factory import open_cache
from kvtier.keys import ChunkKeyer, chunk_keys, namespace_key
from kvtier.layout import Layout, Segment
from kvtier.pool import PagedKVPool
from kvtier.sources import ChunkSource, register_peers_backend

__version__: str = _core.__version__


class _P2PBackend:
    """kvtier.p2p as the peers backend (kvtier.sources): ``peers=PeerConfig(...)`` starts a
    PeerService. p2p is imported on first use, so ``import kvtier`` does not load it."""

    def start(self, cache, peers):
        from kvtier.p2p.cache_hooks import BACKEND

        return BACKEND.start(cache, peers)

    def pool_share(self, peers, device):
        from kvtier.p2p.cache_hooks import BACKEND

        return BACKEND.pool_share(peers, device)


register_peers_backend(_P2PBackend())

__all__ = [
    "CacheConfig",
    "CacheGeometryError",
    "ChunkKeyer",
    "ChunkSource",
    "CorruptionError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "KVCache",
    "KVTierError",
    "Layout",
    "LoadHandle",
    "NotFoundError",
    "PagedKVPool",
    "ResourceExhaustedError",
    "Segment",
    "StoreFuture",
    "UnavailableError",
    "__version__",
    "chunk_keys",
    "namespace_key",
    "open_cache",
]
