"""`kvtier peer`: run a standalone cache-only peer until SIGINT / SIGTERM."""

from __future__ import annotations

import argparse
import json
import signal
import threading


def add_parser(sub) -> None:
    p = sub.add_parser(
        "peer",
        help="run a cache-only peer (CPU pool + disk tier) in a peer cluster",
        description="Serve a CPU pool and a disk tier to a kvtier peer cluster.",
    )
    p.add_argument(
        "--layout",
        required=True,
        help='layout spec: JSON or a JSON file, {"blob_bytes": N, "fingerprint": HEX} '
        'or a model shape, with "codec" for a cluster whose caches encode chunks (see docs/p2p.md)',
    )
    p.add_argument("--listen", default="0.0.0.0:7070", help="host:port to accept peers on")
    p.add_argument("--advertise", default=None, help="host:port peers dial (default: listen)")
    p.add_argument("--seeds", default="", help="comma-separated host:port of members to join through")
    p.add_argument("--secret-file", required=True, help="file holding the cluster secret (>= 16 bytes)")
    p.add_argument("--tls-cert-file", default=None, help="this node's TLS certificate (PEM): peer connections in TLS")
    p.add_argument("--tls-key-file", default=None, help="the private key of --tls-cert-file (PEM)")
    p.add_argument("--tls-ca-file", default=None, help="CA (PEM) signing the members' certificates: mutual TLS")
    p.add_argument("--node-id", default=None)
    p.add_argument("--cache-dir", default=None, help="directory of the disk tier (omit: no disk tier)")
    p.add_argument(
        "--cpu-bytes",
        type=_size,
        default="1GiB",
        help="pinned pool size, default 1GiB. A size is bytes or a number with a unit, as "
        "in a config file: 8GiB = 8*2^30 (KiB MiB GiB TiB PiB), 8GB = 8*10^9 "
        "(kB MB GB TB PB); a bare 8G is refused as ambiguous",
    )
    p.add_argument(
        "--disk-bytes", type=_size, default="16GiB", help="disk tier size, default 16GiB (units as --cpu-bytes)"
    )
    p.add_argument("--disk-backend", default="auto", choices=("auto", "io_uring", "posix"))
    p.add_argument("--gossip-interval", type=float, default=0.2, help="seconds per protocol period")
    p.add_argument("--request-timeout", type=float, default=5.0)
    p.set_defaults(func=run)


def _size(text: str) -> int:
    """A size option, read as every kvtier size is (kvtier.config.parse_size)."""
    from kvtier.config import parse_size
    from kvtier.errors import InvalidArgumentError

    try:
        return parse_size(text)
    except InvalidArgumentError as e:  # argparse names the option
        raise argparse.ArgumentTypeError(f"invalid value {text!r}; allowed: {e.allowed}") from None


def run(args: argparse.Namespace) -> int:
    from kvtier.p2p.config import PeerConfig
    from kvtier.p2p.node import PeerNode

    cfg = PeerConfig(
        listen=args.listen,
        advertise=args.advertise,
        seeds=args.seeds,
        secret_file=args.secret_file,
        node_id=args.node_id,
        gossip_interval_s=args.gossip_interval,
        request_timeout_s=args.request_timeout,
        tls_cert_file=args.tls_cert_file,
        tls_key_file=args.tls_key_file,
        tls_ca_file=args.tls_ca_file,
    )
    node = PeerNode(
        args.layout,
        cfg,
        cache_dir=args.cache_dir,
        cpu_bytes=args.cpu_bytes,
        disk_bytes=args.disk_bytes,
        disk_backend=args.disk_backend,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    node.start()
    svc = node.service
    print(
        json.dumps(
            {
                "event": "ready",
                "node_id": svc.node_id,
                "address": f"{svc.address[0]}:{svc.address[1]}",
                "digest_keys": svc.stats()["digest"]["keys"],
            }
        ),
        flush=True,
    )
    try:
        while not stop.wait(1.0):
            pass
    finally:
        node.close()
        print(json.dumps({"event": "stopped", "node_id": svc.node_id}), flush=True)
    return 0
