"""The glue between KVCache and its PeerService (called from the clearly marked hooks in
cache.py): builds the service for a cache, so cache.py needs no p2p imports at module level."""

from __future__ import annotations

from kvtier.errors import InvalidArgumentError
from kvtier.p2p.config import PeerConfig
from kvtier.p2p.service import PeerService


def start_peers(cache, peers) -> PeerService:
    """Start the peer service of ``cache``. ``peers`` is a :class:`PeerConfig` or a dict of its
    fields. A disk tier keeps the key journal in its directory, so a restart rebuilds the digest.
    Disk-only chunks are not served to peers (a serving process has no spare pages to promote
    them through); they are served again once a local load has promoted them."""
    if isinstance(peers, dict):
        peers = PeerConfig(**peers)
    if not isinstance(peers, PeerConfig):
        raise InvalidArgumentError(f"peers must be a kvtier.p2p.PeerConfig or a dict, got {type(peers).__name__}")
    svc = PeerService(cache._tier, cache.layout.fingerprint, peers,
                      journal_dir=cache.config.disk_dir)
    return svc.start()
