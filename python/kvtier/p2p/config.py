"""PeerConfig: the settings of a peer service (inside a KVCache or a standalone `kvtier peer`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from kvtier.config import _PeerSchema, parse_address
from kvtier.errors import InvalidArgumentError

__all__ = ["PeerConfig", "parse_address"]


@dataclass(frozen=True)
class PeerConfig(_PeerSchema):
    """Settings of a peer service. Every field is checked; a bad value raises InvalidArgumentError
    naming it (``peers.<field>``), the value and what is allowed. The fields, their checks,
    defaults and docs are those of the ``peers`` keys in :mod:`kvtier.config`, which the
    ``peers:`` section of a config file (:class:`kvtier.config.PeersSection`) checks as well;
    this class adds what a running service needs: exactly one of ``secret`` / ``secret_file``,
    and the secret and TLS files readable.

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

    def _check_together(self) -> None:
        if (self.secret is None) == (self.secret_file is None):
            raise InvalidArgumentError("peers: give exactly one of secret and secret_file")
        if self.secret_file is not None and not os.path.isfile(self.secret_file):
            raise InvalidArgumentError(f"peers.secret_file={self.secret_file!r} is not a file")
        self.tls()  # loads the files: a missing or mismatched one is refused here, naming its key

    def tls(self):
        """The :class:`~kvtier.p2p.transport.TlsSettings` of the ``tls_*`` keys, or None."""
        from kvtier.p2p.transport import TlsSettings

        return TlsSettings.from_config(self.tls_cert_file, self.tls_key_file, self.tls_ca_file)
