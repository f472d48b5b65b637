"""The `kvtier` command: `kvtier demo`, `kvtier info`, `kvtier peer`, `kvtier sim`, `kvtier route`, `kvtier cache`."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict


def _cmd_info(args: argparse.Namespace) -> int:
    from kvtier.info import format_info, system_info

    info = system_info()
    if args.json:
        d = asdict(info)
        d["io_backend_active"] = info.io_backend_active
        print(json.dumps(d, indent=2))
    else:
        print(format_info(info))
    return 0


def _cmd_cache_reset(args: argparse.Namespace) -> int:
    from kvtier import _core
    from kvtier.errors import KVTierError, NotFoundError

    try:
        held = _core.disk_cache_reset(args.dir)
    except NotFoundError as e:
        print(f"kvtier cache reset: nothing to reset: {e}")
        return 0
    except KVTierError as e:
        print(f"kvtier cache reset: {e}", file=sys.stderr)
        return 1
    print(f"kvtier cache reset: deleted the disk cache in {args.dir!r} ({held})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from kvtier import __version__

    parser = argparse.ArgumentParser(prog="kvtier", description="kvtier KV-cache engine")
    parser.add_argument("--version", action="version", version=f"kvtier {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="version, CUDA, GPUs, I/O backend and pinned-memory support")
    p_info.add_argument("--json", action="store_true", help="print as JSON")
    p_info.set_defaults(func=_cmd_info)
    p_cache = sub.add_parser("cache", help="manage a disk tier's cache directory")
    cache_sub = p_cache.add_subparsers(dest="cache_command", required=True)
    p_reset = cache_sub.add_parser(
        "reset",
        help="delete the disk cache file in DIR, whatever geometry it holds (refused while a "
        "running kvtier has it open)",
    )
    p_reset.add_argument("dir", help="the disk tier's directory (disk.dir)")
    p_reset.set_defaults(func=_cmd_cache_reset)
    from kvtier.p2p.cli import add_parser as add_peer_parser  # `kvtier peer`: see kvtier/p2p

    add_peer_parser(sub)
    from kvtier.demo import add_demo_parser  # `kvtier demo`: see kvtier/demo.py

    add_demo_parser(sub)
    from kvtier.sim.cli import add_parser as add_sim_parser  # `kvtier sim`: see kvtier/sim

    add_sim_parser(sub)
    from kvtier.router import add_parser as add_route_parser  # `kvtier route`: see kvtier/router.py

    add_route_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
