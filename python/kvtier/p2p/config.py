"""PeerConfig: the settings of a peer service (inside a KVCache or a standalone `kvtier peer`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from kvtier.errors import InvalidArgumentError


def parse_address(addr: str, what: str) -> tuple[str, int]:
    """``"host:port"`` (IPv6 as ``"[::1]:port"``) -> (host, port); ValueError naming ``what``."""
    if not isinstance(addr, str) or ":" not in addr:
        raise InvalidArgumentError(f"{what} must be 'host:port', got {addr!r}")
    host, _, port_s = addr.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_s)
    except ValueError:
        raise InvalidArgumentError(f"{what}: port must be an int, got {addr!r}") from None
    if not host or not 0 <= port <= 65535:
        raise InvalidArgumentError(f"{what} must be 'host:port' with a port in [0, 65535], got {addr!r}")
    return host, port


@dataclass(frozen=True)
class PeerConfig:
    """Settings of a peer service. Every field is checked; a bad value raises ValueError naming it.

    Attributes:
        listen: ``"host:port"`` to accept peers on (port 0: any free port).
        seeds: addresses of members to join through; any member can be one. Empty: start a cluster.
        secret / secret_file: the cluster secret (>= 16 bytes); exactly one of them.
        advertise: the address peers dial (default: the bound listen address).
        node_id: this member's name (default: the advertised ``host:port``).
        request_timeout_s: deadline of a peer lookup (confirm round trip) and of a pull.
        connect_timeout_s: deadline of a TCP connect plus handshake.
        gossip_interval_s: the protocol period: one probe, one gossip exchange.
        ack_timeout_s: a direct probe unanswered by then goes indirect.
        indirect_probes: members asked to probe a silent peer.
        suspicion_mult: suspect -> dead after ``suspicion_mult * log10(n+1)`` periods.
        dead_retention_s: how long a dead member's record is kept (refuses stale gossip).
        sync_interval_s: full-state push-pull with one random member, this often.
        digest_capacity / digest_fp_rate: Bloom filter sizing (keys, false-positive rate).
        digest_rebuild_s: rebuild this member's filter from the keys still held, this often.
        digest_fetches_per_tick: peers whose digest we are behind on, caught up per period.
        max_sources: peers a lookup asks to confirm (and pulls from) at most.
        max_request_chunks: chunks one request names at most.
        max_connections: authenticated inbound connections served at once. Each peer identity
            has a fair share: when they are all taken, a login of an identity holding fewer
            than the largest holder closes that holder's least recently active connection; idle
            connections are closed after ``idle_timeout_s``, or after ``scarce_idle_timeout_s``
            once half the slots are taken. Handshakes in progress have their own bound
            (``max_connections // 8``, at least 4), so unauthenticated connections never take an
            authenticated slot.
        idle_timeout_s / scarce_idle_timeout_s: see ``max_connections``.
        tls_cert_file / tls_key_file: this member's TLS certificate and key (PEM): every peer
            connection runs in TLS, the HMAC handshake inside it, bound to the server's
            certificate. All members of a cluster use TLS or none do.
        tls_ca_file: the CA (PEM) that signs the members' certificates: mutual TLS, each side
            refuses a peer certificate the CA did not sign. Needs the two keys above.
        share_pool: how a ``PagedKVPool`` shares its own pages with peers on this host (see
            docs/p2p.md, "Same-host sharing"): ``"off"`` (default), ``"auto"`` (CUDA IPC when
            the pool is on a GPU, nothing on a CPU), ``"cuda"`` or ``"shm"`` (a CPU pool in
            /dev/shm files). Off by default until the CUDA path has run on a GPU machine.
    """

    listen: str = "127.0.0.1:0"
    seeds: tuple[str, ...] = ()
    secret: bytes | str | None = field(default=None, repr=False)
    secret_file: str | None = None
    advertise: str | None = None
    node_id: str | None = None
    request_timeout_s: float = 5.0
    connect_timeout_s: float = 1.0
    gossip_interval_s: float = 0.2
    ack_timeout_s: float = 0.15
    indirect_probes: int = 2
    suspicion_mult: float = 4.0
    dead_retention_s: float = 30.0
    sync_interval_s: float = 3.0
    digest_capacity: int = 1 << 17
    digest_fp_rate: float = 0.001
    digest_rebuild_s: float = 60.0
    digest_fetches_per_tick: int = 4
    max_sources: int = 4
    max_request_chunks: int = 1024
    max_connections: int = 256
    idle_timeout_s: float = 300.0
    scarce_idle_timeout_s: float = 10.0
    share_pool: str = "off"
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_ca_file: str | None = None

    def __post_init__(self) -> None:
        parse_address(self.listen, "peers.listen")
        if isinstance(self.seeds, str):
            object.__setattr__(self, "seeds", tuple(s for s in self.seeds.split(",") if s))
        object.__setattr__(self, "seeds", tuple(self.seeds))
        for s in self.seeds:
            parse_address(s, "peers.seeds entry")
        if self.advertise is not None:
            parse_address(self.advertise, "peers.advertise")
        if (self.secret is None) == (self.secret_file is None):
            raise InvalidArgumentError("peers: give exactly one of secret and secret_file")
        if self.secret_file is not None and not os.path.isfile(self.secret_file):
            raise InvalidArgumentError(f"peers.secret_file={self.secret_file!r} is not a file")
        for name in ("request_timeout_s", "connect_timeout_s", "gossip_interval_s", "ack_timeout_s",
                     "suspicion_mult", "dead_retention_s", "sync_interval_s", "digest_rebuild_s",
                     "idle_timeout_s", "scarce_idle_timeout_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise InvalidArgumentError(f"peers.{name} must be a positive number, got {v!r}")
        for name in ("indirect_probes", "digest_capacity", "max_sources", "max_request_chunks",
                     "max_connections", "digest_fetches_per_tick"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise InvalidArgumentError(f"peers.{name} must be a positive int, got {v!r}")
        if not 0 < self.digest_fp_rate < 0.5:
            raise InvalidArgumentError(f"peers.digest_fp_rate must be in (0, 0.5), got {self.digest_fp_rate!r}")
        if self.max_request_chunks > 4096:
            raise InvalidArgumentError(f"peers.max_request_chunks must be <= 4096, got {self.max_request_chunks}")
        if self.share_pool not in ("auto", "cuda", "shm", "off"):
            raise InvalidArgumentError(f"peers.share_pool must be 'auto', 'cuda', 'shm' or 'off', got {self.share_pool!r}")
        if self.node_id is not None and (not self.node_id or len(self.node_id.encode()) > 64):
            raise InvalidArgumentError(f"peers.node_id must be 1..64 bytes, got {self.node_id!r}")
        for name in ("tls_cert_file", "tls_key_file", "tls_ca_file"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, (str, os.PathLike)):
                raise InvalidArgumentError(f"peers.{name} must be a file path, got {v!r}")
            if v is not None:
                object.__setattr__(self, name, os.fspath(v))
        self.tls()  # loads the files: a missing or mismatched one is refused here, naming its key

    def tls(self):
        """The :class:`~kvtier.p2p.transport.TlsSettings` of the ``tls_*`` keys, or None."""
        from kvtier.p2p.transport import TlsSettings

        return TlsSettings.from_config(self.tls_cert_file, self.tls_key_file, self.tls_ca_file)
