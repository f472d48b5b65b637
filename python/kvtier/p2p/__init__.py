"""Peer-to-peer KV sharing with no central server: membership by gossip, Bloom-filter digests as
the directory, a framed TCP protocol with an HMAC handshake, pulls straight into pinned blocks.

Inside a serving process::

    cache = kvtier.KVCache(layout, cpu_bytes=8 << 30, model_id="llama-3-8b",
                           peers=PeerConfig(listen="0.0.0.0:7070", seeds=("10.0.0.1:7070",),
                                            secret_file="/etc/kvtier/secret"))

Standalone (a cache-only node with a disk tier): ``kvtier peer --help``. See docs/p2p.md.
"""

from kvtier.p2p.config import PeerConfig
from kvtier.p2p.protocol import ChecksumError, ProtocolError
from kvtier.p2p.service import PeerService
from kvtier.p2p.transport import AuthenticationError

__all__ = ["AuthenticationError", "ChecksumError", "PeerConfig", "PeerService", "ProtocolError"]
