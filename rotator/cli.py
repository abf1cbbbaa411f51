"""Command line: argument parsing and exit codes. The only module that calls sys.exit.

Exit codes (a contract): 0 everything asked for was done; 1 some tunnels were not rotated (or a
known runtime failure); 2 usage or configuration error. Known failures print one line naming the
cause and the fix, never a traceback. Heavy imports happen inside the commands so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from rotator import __version__
from rotator.errors import ConfigError, RotatorError

if TYPE_CHECKING:
    from rotator.rotation.engine import RunReport
    from rotator.wiring import Runtime


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rotator", description="Rotate Cloudflare Magic IPsec pre-shared keys, Vault first.",
        epilog="Environment: VAULT_ADDR, VAULT_TOKEN, VAULT_NAMESPACE, VAULT_CACERT, CLOUDFLARE_API_TOKEN "
               "(or CLOUDFLARE_EMAIL + CLOUDFLARE_API_KEY), CLOUDFLARE_BASE_URL, ROTATOR_CONFIG, ROTATOR_ADMIN_TOKEN.")
    parser.add_argument("--version", action="version", version=f"psk-rotator {__version__}")
    parser.add_argument("--config", help="TOML config file (default: $ROTATOR_CONFIG; none needed for one-shot use)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    rotate = sub.add_parser("rotate", help="rotate the PSKs of an account's tunnels now")
    rotate.add_argument("--account", required=True, help="Cloudflare account id")
    which = rotate.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every tunnel of the account")
    which.add_argument("--tunnel", action="append", metavar="ID_OR_NAME", help="a tunnel (repeatable)")
    rotate.add_argument("--dry-run", action="store_true", help="plan and validate, change nothing")
    rotate.add_argument("--output", choices=("text", "json"), default="text")
    rotate.add_argument("--no-wait", action="store_true", help="fail at once when another rotator holds the account")

    reconcile = sub.add_parser("reconcile", help="finish every rotation left pending in Vault")
    reconcile.add_argument("--account", required=True)
    reconcile.add_argument("--output", choices=("text", "json"), default="text")
    reconcile.add_argument("--no-wait", action="store_true", help="fail at once when another rotator holds the account")

    unlock = sub.add_parser("unlock", help="clear an account's lease whose holder is known to be gone")
    unlock.add_argument("--account", required=True, help="Cloudflare account id")

    status = sub.add_parser("status", help="per tunnel: state, PSK age, pending, last error (never a key)")
    status.add_argument("--account", required=True)
    status.add_argument("--output", choices=("text", "json"), default="text")

    config = sub.add_parser("config", help="configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    config_sub.add_parser("check", help="validate and print the effective config, secrets masked")

    sub.add_parser("run", help="run the daemon: schedules, admin API, metrics")

    demo = sub.add_parser("demo", help="run the daemon against the built-in simulators")
    demo.add_argument("--listen", default="127.0.0.1:9477", help="admin API address (HOST:PORT)")

    sim = sub.add_parser("sim", help="start the Vault and Cloudflare simulators on loopback")
    sim.add_argument("--json", action="store_true", help="print one JSON line with addresses and credentials")
    sim.add_argument("--accounts", type=int, default=2)
    sim.add_argument("--tunnels", type=int, default=5)
    sim.add_argument("--cloudflare-latency", type=float, default=0.0, help="seconds added to every Cloudflare call")
    sim.add_argument("--vault-latency", type=float, default=0.0, help="seconds added to every Vault call")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if exc.code in (0, None) else 2
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"rotator: configuration error: {exc}", file=sys.stderr)
        return 2
    except RotatorError as exc:
        print(f"rotator: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("rotator: interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "sim":
        from rotator.sim import run_sim

        return run_sim(args.accounts, args.tunnels, args.json, args.cloudflare_latency, args.vault_latency)
    if args.command == "demo":
        from rotator.demo import run_demo

        return run_demo(args.listen)
    from rotator import config as config_mod
    from rotator.service.logging import Redactor, configure

    if args.command == "unlock" and not config_mod.HEX32.match(args.account):
        raise ConfigError(f"--account {args.account!r} is not a Cloudflare account id",
                          "use the 32-lowercase-hex-character id from the dashboard URL")

    settings = config_mod.load(args.config)
    redactor = Redactor()
    for value in (settings.vault_token, settings.cloudflare_token, settings.cloudflare_key, settings.admin_token):
        if value is not None:
            redactor.add(value)
    # The daemon logs to stdout, where container runtimes and journald look; one-shot commands keep
    # stdout for their result (table or JSON) and log to stderr.
    configure(redactor, stream=sys.stdout if args.command == "run" else sys.stderr)
    if args.command == "config":
        print(json.dumps(settings.masked(), indent=2))
        return 0
    if args.command == "run":
        from rotator.service.daemon import run_daemon

        return run_daemon(settings, redactor)
    from rotator.wiring import build_runtime, preflight

    runtime = build_runtime(settings)
    try:
        preflight(runtime)
        if args.command == "status":
            return _status(runtime, args.account, args.output)
        if args.command == "unlock":
            return _unlock(runtime, args.account)
        return _rotate(runtime, args)
    finally:
        runtime.close()


def _rotate(runtime: Runtime, args: argparse.Namespace) -> int:
    from rotator.rotation.engine import RunRequest

    reconcile = args.command == "reconcile"
    req = RunRequest(
        account_id=args.account,
        tunnels=None if reconcile or getattr(args, "all", False) else args.tunnel,
        reconcile_only=reconcile, dry_run=getattr(args, "dry_run", False),
        psk_for=runtime.psk_for(args.account),
    )
    progress = _Progress(args.account) if args.output == "text" and sys.stderr.isatty() else None
    if progress:
        runtime.engine.on_progress = progress.update
    if not req.dry_run:
        # Wait (bounded, one line saying for whom) for a live holder; a gone holder of this host is taken over.
        runtime.leases.acquire_waiting(args.account, wait=not args.no_wait,
                                       notice=lambda line: print(f"rotator: {line}", file=sys.stderr, flush=True))
    try:
        report = runtime.engine.run(req)
    finally:
        runtime.leases.release(args.account)
    if progress:
        progress.done()
    if args.output == "json":
        print(json.dumps(report.as_dict(), indent=2))
    else:
        _print_report(report)
    if report.error and not report.outcomes:
        print(f"rotator: error: {report.error}", file=sys.stderr)
    return 0 if report.ok else 1


def _unlock(runtime: Runtime, account_id: str) -> int:
    from rotator.rotation.lease import LocalProcesses, unlock

    print(unlock(runtime.store, account_id, LocalProcesses(), runtime.leases.holder))
    return 0


class _Progress:
    """One self-rewriting line on the terminal: tunnels settled so far, of those selected."""

    def __init__(self, account: str) -> None:
        self.account = account
        self.started = time.monotonic()

    def update(self, settled: int, total: int) -> None:
        width = 30
        filled = width * settled // total if total else width
        sys.stderr.write(f"\r{self.account[:8]}… [{'#' * filled}{'.' * (width - filled)}] {settled}/{total} tunnels "
                         f"{time.monotonic() - self.started:6.1f}s")
        sys.stderr.flush()

    def done(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
    return "\n".join(lines)


def _print_report(report: RunReport) -> None:
    verb = "Dry run" if report.dry_run else "Rotation"
    if report.error and not report.outcomes:
        return
    print(f"{verb} {report.rotation_id} on account {report.account_id}")
    if report.outcomes:
        rows = [[o.name, o.tunnel_id, o.result + (" (reconciled)" if o.reconciled else ""), o.reason or ""]
                for o in report.outcomes]
        print(_table(rows, ["TUNNEL", "ID", "RESULT", "REASON"]))
    counts = ", ".join(f"{n} {r}" for r, n in report.counts().items() if n)
    print(f"Summary: {counts or 'nothing to do'} in {report.finished_at - report.started_at:.2f}s")


def _status(runtime: Runtime, account_id: str, output: str) -> int:
    from rotator.schedule import parse_time

    tunnels = runtime.cloudflare.list_tunnels(account_id)
    records = runtime.store.read_many(account_id, [t.id for t in tunnels])
    now = time.time()
    rows: list[dict[str, Any]] = []
    for t in tunnels:
        rec = records[t.id]
        if isinstance(rec, RotatorError):
            rows.append({"tunnel_id": t.id, "name": t.name, "state": "error", "psk_age_seconds": None,
                         "pending": None, "last_error": str(rec)})
            continue
        rotated = parse_time(rec.rotated_at)
        state = "unmanaged" if rec.version == 0 else rec.state
        rows.append({"tunnel_id": t.id, "name": t.name, "state": state,
                     "psk_age_seconds": None if rotated is None else int(now - rotated),
                     "pending": rec.pending_psk is not None, "rotation_id": rec.rotation_id,
                     "last_error": rec.last_error})
    if output == "json":
        print(json.dumps({"account_id": account_id, "tunnels": rows}, indent=2))
        return 0
    table_rows = [[r["name"], r["tunnel_id"], r["state"], _age(r["psk_age_seconds"]),
                   "yes" if r["pending"] else "no", (r["last_error"] or "")[:80]] for r in rows]
    print(_table(table_rows, ["TUNNEL", "ID", "STATE", "PSK AGE", "PENDING", "LAST ERROR"]))
    return 0


def _age(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


if __name__ == "__main__":
    sys.exit(main())
