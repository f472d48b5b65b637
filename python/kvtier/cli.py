"""The `kvtier` command: `kvtier demo`, `kvtier info`, `kvtier peer`, `kvtier sim`."""

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


def main(argv: list[str] | None = None) -> int:
    from kvtier import __version__

    parser = argparse.ArgumentParser(prog="kvtier", description="kvtier KV-cache engine")
    parser.add_argument("--version", action="version", version=f"kvtier {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="version, CUDA, GPUs, I/O backend and pinned-memory support")
    p_info.add_argument("--json", action="store_true", help="print as JSON")
    p_info.set_defaults(func=_cmd_info)
    from kvtier.p2p.cli import add_parser as add_peer_parser  # `kvtier peer`: see kvtier/p2p

    add_peer_parser(sub)
    from kvtier.demo import add_demo_parser  # `kvtier demo`: see kvtier/demo.py

    add_demo_parser(sub)
    from kvtier.sim.cli import add_parser as add_sim_parser  # `kvtier sim`: see kvtier/sim

    add_sim_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
