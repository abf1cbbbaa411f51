"""Command line: argument parsing and exit codes. The only module that calls sys.exit."""

from __future__ import annotations

import argparse
import sys

from rotator import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rotator", description="Rotate Cloudflare Magic IPsec PSKs, Vault first.")
    parser.add_argument("--version", action="version", version=f"psk-rotator {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("sim", help="start the Vault and Cloudflare simulators on loopback")
    sim.add_argument("--json", action="store_true", help="print one JSON line with addresses and credentials")
    sim.add_argument("--accounts", type=int, default=2)
    sim.add_argument("--tunnels", type=int, default=5)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "sim":
        from rotator.sim import run_sim

        return run_sim(args.accounts, args.tunnels, args.json)
    return 2


if __name__ == "__main__":
    sys.exit(main())
