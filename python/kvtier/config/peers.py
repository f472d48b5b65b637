"""The keys of a peer service (_PeerSchema, which kvtier.p2p.PeerConfig is made from) and the
``peers:`` section of a config file (PeersSection), which checks them with the same checkers."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from kvtier.config.checks import (
    _Address,
    _AddressList,
    _Check,
    _checked,
    _Choice,
    _File,
    _Float,
    _Int,
    _Optional,
    _Salt,
    _Text,
)
from kvtier.config.sections import _field, _plain, _Section


@dataclass(frozen=True)
class _PeerSchema(_Section):
    """The keys of a peer service: checker, default and doc of each. :class:`kvtier.p2p.PeerConfig`
    (a running service's settings: Python values, a secret required, files opened) is this with
    the rules that need the files; :class:`PeersSection` (the ``peers:`` section of a config file)
    checks the keys it is given with these checkers."""

    SECTION: ClassVar[str] = "peers"
    TYPED: ClassVar[bool] = True
    listen: str = _field(
        "127.0.0.1:0",
        _Address(),
        "address the peer service listens on (port 0: any free port)",
    )
    seeds: tuple[str, ...] = _field(
        (), _AddressList(), "peers to join through (any member can be a seed); none: a new cluster"
    )
    secret: bytes | str | None = _field(
        None,
        _Optional(_Salt(), "use secret_file", none_words=()),
        "the cluster secret (>= 16 bytes); give exactly one of secret and secret_file",
        show=False,
    )
    secret_file: str | None = _field(
        None,
        _Optional(_File(), "no cluster secret"),
        "file holding the cluster secret (HMAC of every connection)",
    )
    advertise: str | None = _field(
        None,
        _Optional(_Address(), "the bound listen address"),
        "the address peers dial",
    )
    node_id: str | None = _field(
        None,
        _Optional(_Text(what="a string of 1 to 64 bytes", max_bytes=64), "the advertised host:port"),
        "this member's name",
    )
    request_timeout_s: float = _field(
        5.0, _Float(), "deadline of a peer lookup (confirm round trip) and of a pull, in seconds"
    )
    connect_timeout_s: float = _field(1.0, _Float(), "deadline of a TCP connect plus handshake, in seconds")
    gossip_interval_s: float = _field(0.2, _Float(), "the protocol period (one probe, one gossip exchange), in seconds")
    ack_timeout_s: float = _field(0.15, _Float(), "a direct probe unanswered by then goes indirect, in seconds")
    indirect_probes: int = _field(2, _Int(1), "members asked to probe a silent peer")
    suspicion_mult: float = _field(4.0, _Float(), "suspect -> dead after suspicion_mult * log10(n+1) periods")
    dead_retention_s: float = _field(30.0, _Float(), "how long a dead member's record is kept (refuses stale gossip)")
    sync_interval_s: float = _field(3.0, _Float(), "full-state push-pull with one random member, this often (seconds)")
    digest_capacity: int = _field(1 << 17, _Int(1), "keys the Bloom filter digest is sized for")
    digest_fp_rate: float = _field(0.001, _Float(hi=0.5, hi_open=True), "the digest's false-positive rate")
    digest_rebuild_s: float = _field(
        60.0, _Float(), "rebuild this member's digest from the keys still held, this often"
    )
    digest_fetches_per_tick: int = _field(4, _Int(1), "peers whose digest we are behind on, caught up per period")
    max_sources: int = _field(4, _Int(1), "peers a lookup asks to confirm (and pulls from) at most")
    max_request_chunks: int = _field(1024, _Int(1, 4096), "chunks one request names at most")
    max_connections: int = _field(
        256,
        _Int(1),
        "authenticated inbound connections served at once. Each peer identity has a fair share: "
        "when they are all taken, a login of an identity holding fewer than the largest holder "
        "closes that holder's least recently active connection. Handshakes in progress have "
        "their own bound (max_connections // 8, at least 4), so unauthenticated connections "
        "never take an authenticated slot",
    )
    idle_timeout_s: float = _field(300.0, _Float(), "an idle connection is closed after this many seconds")
    scarce_idle_timeout_s: float = _field(
        10.0,
        _Float(),
        "an idle connection is closed after this many seconds once half the max_connections slots are taken",
    )
    share_pool: str = _field(
        "off",
        _Choice(("auto", "cuda", "shm", "off")),
        "how a PagedKVPool shares its own pages with peers on this host (docs/p2p.md, "
        "'Same-host sharing'): off, auto (CUDA IPC for a GPU pool, nothing on a CPU), cuda, or "
        "shm (a CPU pool in /dev/shm files); off by default until the CUDA path has run on a GPU "
        "machine",
    )
    transport: str = _field(
        "auto",
        _Choice(("auto", "tcp", "nixl")),
        "how pulled chunks move (docs/nixl.md): auto (one-sided NIXL READs of the holder's blocks "
        "where both members have the nixl package and NIXL is the faster path: a peer on this host, "
        "or any peer when this machine has an RDMA device; the TCP stream otherwise, chosen per "
        "peer), tcp (the stream only), or nixl (NIXL with every peer that offers it; the service "
        "refuses to start without the nixl package)",
    )
    tls_cert_file: str | None = _field(
        None,
        _Optional(_File(), "plain TCP"),
        "this member's TLS certificate (PEM); with tls_key_file every peer connection runs in "
        "TLS, the HMAC handshake inside it bound to the server's certificate (all members of a "
        "cluster use TLS or none do)",
    )
    tls_key_file: str | None = _field(None, _Optional(_File(), "plain TCP"), "the private key of tls_cert_file (PEM)")
    tls_ca_file: str | None = _field(
        None,
        _Optional(_File(), "no CA: certificates bound by the handshake only"),
        "CA (PEM) signing the members' certificates: mutual TLS, each side refuses a peer "
        "certificate the CA did not sign (needs tls_cert_file and tls_key_file)",
    )


# The keys of the `peers:` section that config_keys() lists and the environment sets. The section
# checks every other PeerConfig key it is given with its PeerConfig checker too, and passes keys
# PeerConfig does not have through.
_PEERS_SECTION_KEYS = (
    "listen",
    "seeds",
    "secret_file",
    "tls_cert_file",
    "tls_key_file",
    "tls_ca_file",
)
_PEER_FIELDS = {f.name: f for f in dataclasses.fields(_PeerSchema)}


def _peers_section_default(name: str) -> Any:
    """A key's value when a config file leaves it out: PeerConfig's, but no ``listen`` (no peer
    service)."""
    return None if name == "listen" else _PEER_FIELDS[name].default


def _peers_section_check(name: str) -> _Check:
    """The checker of one key in the `peers:` section: PeerConfig's, where ``listen`` may also be
    null (no peer service)."""
    check: _Check = _PEER_FIELDS[name].metadata["check"]
    if name == "listen":
        return _Optional(check, "no peer service")
    return check


class PeersSection(Mapping):
    """The ``peers:`` section of a config file: a read-only mapping (also readable as
    attributes), handed to the peer service.

    ``listen`` null means no peer service; no secret is required here. Every key that is a
    :class:`PeerConfig` field is checked by PeerConfig's checker; other keys are kept as given.
    """

    SECTION: ClassVar[str] = "peers"
    KNOWN: ClassVar[dict[str, tuple[Any, _Check, str]]] = {
        name: (
            _peers_section_default(name),
            _peers_section_check(name),
            _PEER_FIELDS[name].metadata["doc"],
        )
        for name in _PEERS_SECTION_KEYS
    }
    __slots__ = ("_data",)

    def __init__(self, /, **values: Any):
        data: dict[str, Any] = {}
        for name, (default, _, _) in self.KNOWN.items():
            data[name] = values.pop(name, default)
        data.update(values)
        for name, raw in data.items():
            if name in self.KNOWN:
                data[name] = _checked(f"peers.{name}", self.KNOWN[name][1], raw)
            elif name in _PEER_FIELDS:
                data[name] = _checked(f"peers.{name}", _PEER_FIELDS[name].metadata["check"], raw)
            else:
                data[name] = copy.deepcopy(raw)
        object.__setattr__(self, "_data", data)

    listen = property(lambda self: self._data["listen"])
    seeds = property(lambda self: self._data["seeds"])
    secret_file = property(lambda self: self._data["secret_file"])

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __hash__(self) -> int:  # equal mappings have equal known values and key sets
        return hash((self.listen, self.seeds, self.secret_file, frozenset(self._data)))

    def __repr__(self) -> str:
        shown = (k for k in self._data if k not in _PEER_FIELDS or _PEER_FIELDS[k].repr)
        return "PeersSection(" + ", ".join(f"{k}={self._data[k]!r}" for k in shown) + ")"

    def to_dict(self) -> dict[str, Any]:
        return {k: _plain(v) for k, v in self._data.items()}

    def __reduce__(self):  # pickle and deepcopy rebuild through __init__ (no setattr on slots)
        return (_rebuild_peers, (dict(self._data),))


def _rebuild_peers(data: dict[str, Any]) -> PeersSection:
    return PeersSection(**data)
