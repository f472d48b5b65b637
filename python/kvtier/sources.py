"""Sources of chunks below a KVCache's own tiers: what a cache asks after its CPU and disk tiers
miss, and tells about the chunks it stores. kvtier.p2p's PeerService is one (chunks held by
other instances); the core knows only this interface, never p2p.

A cache gets its source from ``KVCache(..., peers=...)``:

* a callable ``factory(cache) -> ChunkSource``: called once the cache's tiers exist (the source
  may then use ``cache.tier`` and ``cache.layout``);
* a peer service's settings (a ``PeerConfig`` or a dict of its fields): built by the peers
  backend registered with :func:`register_peers_backend`. The ``kvtier`` package registers
  kvtier.p2p's, so ``KVCache(..., peers=PeerConfig(...))`` starts a PeerService.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np

from kvtier.errors import FailedPreconditionError

__all__ = ["ChunkSource", "PeersBackend", "PoolShare", "pool_share", "register_peers_backend", "start_source"]


@runtime_checkable
class ChunkSource(Protocol):
    """Chunks a cache can get beyond its own tiers. Keys are chunk keys (``ChunkKeyer``), in
    prompt order; the cache asks only for the keys after its own leading hits."""

    def lookup(self, keys: list[bytes]) -> int:
        """How many leading chunks of ``keys`` this source can bring."""

    def load(self, keys: list[bytes], pages: np.ndarray, stream: int):
        """Load ``keys`` into ``pages`` (``pages_per_chunk`` a chunk): the leading chunks the
        cache's tier holds, then those this source brings into the tier. Returns the tier's op
        (``chunks`` loaded, ``transfer`` to wait on), as ``CpuTier.load`` does."""

    def note_stored(self, keys: list[bytes]) -> None:
        """The cache now holds ``keys`` (stored, or in pages the source can read)."""

    def pull_rate(self) -> float | None:
        """Bytes per second this source has delivered so far, or None before enough of them."""

    def stats(self) -> dict:
        """Counters, shown as ``cache.stats()["peers"]``."""

    def close(self) -> None:
        """Stop; called by the cache's close(), before its tiers go."""


class PoolShare(Protocol):
    """How a PagedKVPool's own pages are shared with a source on this host (p2p's same-host
    sharing). ``allocate(shape, dtype)``, when not None, makes the pool's KV tensors (in memory
    other processes can map); otherwise the pool allocates them itself."""

    allocate: Callable[..., Any] | None

    def attach(self, source: ChunkSource, pool, tensors: list, page_dim: int) -> None:
        """The pool exists: ``tensors`` are its KV, pages along dimension ``page_dim``; the
        ``pool`` pins and unpins pages through its ``share_*`` methods."""

    def close(self) -> None:
        """The pool is closed: release what the sharing holds (shared memory files)."""


class PeersBackend(Protocol):
    """Builds a cache's source, and a pool's page sharing, from a peer service's settings."""

    def start(self, cache, peers) -> ChunkSource: ...

    def pool_share(self, peers, device) -> PoolShare | None: ...


_backend: PeersBackend | None = None


def register_peers_backend(backend: PeersBackend) -> None:
    """Make ``backend`` build the sources of ``peers=`` settings (the ``kvtier`` package
    registers kvtier.p2p's at import)."""
    global _backend
    _backend = backend


def _peers_backend() -> PeersBackend:
    if _backend is None:
        raise FailedPreconditionError(
            "peers= settings need a peers backend, and none is registered: import kvtier (which "
            "registers kvtier.p2p's) or pass peers=factory(cache) -> ChunkSource"
        )
    return _backend


def _is_factory(peers) -> bool:
    return callable(peers) and not isinstance(peers, (dict, type))


def start_source(cache, peers) -> ChunkSource:
    """The source of ``cache`` for its ``peers=`` argument (a factory, or peer settings)."""
    if _is_factory(peers):
        return peers(cache)
    return _peers_backend().start(cache, peers)


def pool_share(peers, device) -> PoolShare | None:
    """How a pool on ``device`` (a torch.device) shares its pages for its ``peers=`` argument;
    None when it does not (a factory, or settings that leave sharing off)."""
    if peers is None or _is_factory(peers):
        return None
    return _peers_backend().pool_share(peers, device)
