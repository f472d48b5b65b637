"""kvtier.p2p as a cache's ChunkSource (kvtier.sources): the PeerService of a KVCache built from
its ``peers=`` settings, and the same-host page sharing of a PagedKVPool. The ``kvtier`` package
registers :data:`BACKEND`; the core never imports this module."""

from __future__ import annotations

from kvtier.errors import InvalidArgumentError
from kvtier.p2p.config import PeerConfig
from kvtier.p2p.gpu_share import CudaIpc, GpuShare, SharedMemory
from kvtier.p2p.service import PeerService


def peer_config(peers) -> PeerConfig:
    """``peers`` as a :class:`PeerConfig` (it is one, or a dict of its fields)."""
    if isinstance(peers, dict):
        peers = PeerConfig(**peers)
    if not isinstance(peers, PeerConfig):
        raise InvalidArgumentError(f"peers must be a kvtier.p2p.PeerConfig or a dict, got {type(peers).__name__}")
    return peers


def start_peers(cache, peers) -> PeerService:
    """Start the peer service of ``cache``. ``peers`` is a :class:`PeerConfig` or a dict of its
    fields. A disk tier keeps the key journal in its directory, so a restart rebuilds the digest.
    Disk-only chunks are not served to peers (a serving process has no spare pages to promote
    them through); they are served again once a local load has promoted them. The handshake
    carries the cache's blob fingerprint (layout and codec), so peers of different codecs never
    exchange chunks."""
    svc = PeerService(cache.tier, cache.blob_fingerprint, peer_config(peers), journal_dir=cache.config.disk_dir)
    return svc.start()


class PoolPages:
    """A pool's pages shared with peers on this host (``peers.share_pool``) through
    ``mechanism`` (CUDA IPC, or /dev/shm files that also hold the pool's tensors)."""

    def __init__(self, mechanism) -> None:
        self.mechanism = mechanism
        self.allocate = getattr(mechanism, "allocate", None)

    def attach(self, source: PeerService, pool, tensors: list, page_dim: int) -> None:
        source.share_gpu(GpuShare(self.mechanism, tensors, page_dim, pool))

    def close(self) -> None:
        close = getattr(self.mechanism, "close", None)
        if close is not None:
            close()  # shared memory: remove the pool's files


def pool_share(peers, device) -> PoolPages | None:
    """How a pool on ``device`` (a torch.device) shares its pages (``peers.share_pool``)."""
    mode = peer_config(peers).share_pool
    if mode == "auto":
        mode = "cuda" if device.type == "cuda" else "off"
    if mode == "off":
        return None
    if mode == "cuda":
        if device.type != "cuda":
            raise InvalidArgumentError(f"peers.share_pool='cuda' needs a pool on a CUDA device, not {device}")
        import torch

        return PoolPages(CudaIpc(device.index if device.index is not None else torch.cuda.current_device()))
    if device.type != "cpu":
        raise InvalidArgumentError(f"peers.share_pool='shm' needs a pool on the CPU, not {device}")
    return PoolPages(SharedMemory())


class _Backend:
    """kvtier.sources.PeersBackend of kvtier.p2p."""

    start = staticmethod(start_peers)
    pool_share = staticmethod(pool_share)


BACKEND = _Backend()
