"""Command line: argument parsing and exit codes. The only module that calls sys.exit.

Exit codes (a contract): 0 everything asked for was done; 1 some tunnels were not rotated (or a
known runtime failure); 2 usage or configuration error. Known failures print one line naming the
cause and the fix, never a traceback. Heavy imports happen inside the commands so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import sys
import time
from typing import TYPE_CHECKING, Any, NoReturn

from rotator import __version__
from rotator.errors import ConfigError, RotatorError

if TYPE_CHECKING:
    from rotator.config import Settings
    from rotator.rotation.ports import HistoryStore, VersionInfo
    from rotator.wiring import Runtime

# The status filters (service/inventory.FILTERS), repeated here so --help stays fast.
FILTERS = ("pending", "waiting", "failed", "drifted", "rolling_back", "unmanaged", "active")


ACCOUNT_RE = re.compile(r"^[0-9a-f]{32}$")
DONE_RESULTS = ("rotated", "would_rotate")
ACK_COMMAND = re.compile(r"rotator ack --account \S+ --tunnel \S+ --rotation \S+ --holds (new|previous)")


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line naming the problem and where to look, exit 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        sys.exit(2)


def account_id(value: str) -> str:
    if not ACCOUNT_RE.match(value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a Cloudflare account id: use the 32 lowercase hex digits from the dashboard URL")
    return value


def report_time(value: str) -> float:
    """A report's --from/--to: RFC 3339 (``2026-11-01T00:00:00Z``) or a UTC date (``2026-11-01``)."""
    from rotator.schedule import parse_time

    text = value.strip()
    ts = parse_time(text + "T00:00:00Z" if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text) else text)
    if ts is None or not re.match(r"\d{4}-\d{2}-\d{2}", text):
        raise argparse.ArgumentTypeError(f"{value!r} is not a time: use RFC 3339 (2026-11-01T00:00:00Z) or a date "
                                         "(2026-11-01)")
    return ts


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rotator", description="Rotate Cloudflare Magic IPsec pre-shared keys, Vault first.",
        epilog="Environment: VAULT_ADDR, VAULT_TOKEN, VAULT_NAMESPACE, VAULT_CACERT, CLOUDFLARE_API_TOKEN "
               "(or CLOUDFLARE_EMAIL + CLOUDFLARE_API_KEY), CLOUDFLARE_BASE_URL, ROTATOR_CONFIG, ROTATOR_ADMIN_TOKEN, "
               "ROTATOR_ADMIN_URL (a running daemon; without it the leader is found through its lease: rotate, "
               "reconcile, rollback and ack are handed to the daemon leading the account).")
    parser.add_argument("--version", action="version", version=f"psk-rotator {__version__}")
    parser.add_argument("--config", help="TOML config file (default: $ROTATOR_CONFIG; none needed for one-shot use)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str, account: bool = True) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument("--config", default=argparse.SUPPRESS,
                         help="TOML config file (also accepted before the command)")
        if account:
            cmd.add_argument("--account", required=True, type=account_id,
                             help="Cloudflare account id (32 lowercase hex digits)")
        return cmd

    def run_options(cmd: argparse.ArgumentParser) -> None:
        cmd.add_argument("--output", choices=("text", "json"), default="text",
                         help="text: a summary and the tunnels that need attention; json: the whole report")
        cmd.add_argument("--verbose", "-v", action="store_true", help="list every tunnel, not only those needing "
                                                                     "attention")
        cmd.add_argument("--local", action="store_true",
                         help="run here even when a daemon leads the account (found in its lease or at "
                              "ROTATOR_ADMIN_URL): wait for its lease instead of handing the request to it")
        cmd.add_argument("--no-wait", action="store_true",
                         help="fail at once when another live rotator holds the account's lease")

    rotate = command("rotate", "rotate the PSKs of an account's tunnels now")
    which = rotate.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every tunnel of the account")
    which.add_argument("--tunnel", action="append", metavar="ID_OR_NAME", help="a tunnel (repeatable)")
    which.add_argument("--due", action="store_true",
                       help="only what the schedule would rotate now: each tunnel's policy decides who is due, "
                            "and drift is handled as on_drift says (for cron and CI)")
    rotate.add_argument("--dry-run", action="store_true", help="plan and validate, change nothing")
    run_options(rotate)

    reconcile = command("reconcile", "finish every rotation left pending in Vault")
    run_options(reconcile)

    rollback = command("rollback", "return both ends of tunnels to their previous key, Vault first")
    rollback.add_argument("--tunnel", action="append", required=True, metavar="ID_OR_NAME",
                          help="a tunnel (repeatable)")
    run_options(rollback)

    ack = command("ack", "confirm what a manual device holds (the new key, or the previous one back), then "
                         "finish the rotation or the rollback; 'status' prints the exact command")
    ack.add_argument("--tunnel", action="append", required=True, metavar="ID_OR_NAME", help="a tunnel (repeatable)")
    ack.add_argument("--holds", choices=("new", "previous"),
                     help="what the device holds now: 'new' (the pending key of the rotation, typed in) or "
                          "'previous' (the old key put back, while the rotation is rolled back); required")
    ack.add_argument("--rotation", metavar="ROTATION_ID",
                     help="the rotation whose key you acted on (printed by the waiting run and by 'status'); "
                          "refused when the tunnel has moved on to another")
    run_options(ack)

    command("unlock", "clear an account's lease whose holder is known to be gone (kept in the lease's history)")

    history = command("history", "a tunnel's Vault record, version by version: when, rotation, state, outcome, "
                                 "device (never a key)")
    history.add_argument("--tunnel", required=True, metavar="ID_OR_NAME", help="the tunnel")
    history.add_argument("--output", choices=("text", "json"), default="text", help="a table or JSON")
    history.add_argument("--limit", type=int, default=20, metavar="N", help="the newest N versions (default 20)")

    status = command("status", "per tunnel: state, PSK age, pending, drift, last error (never a key)")
    status.add_argument("--output", choices=("text", "json"), default="text", help="a table or JSON")
    status.add_argument("--state", choices=FILTERS, help="only tunnels in this state (pending, failed, drifted ...)")
    status.add_argument("--tunnel", action="append", metavar="ID_OR_NAME",
                        help="only this tunnel (repeatable; a name may be a glob such as 'site-*')")
    status.add_argument("--device", help="only tunnels whose far-end device has this name")

    config = command("config", "configuration", account=False)
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = config_sub.add_parser("check", help="validate and print the effective config, secrets masked",
                                  description="Validate everything 'run' would refuse, print the effective config "
                                              "with secrets masked.")
    check.add_argument("--config", default=argparse.SUPPRESS, help="TOML config file")
    check.add_argument("--one-shot", action="store_true",
                       help="check only what one-shot commands need (no accounts or admin token required); "
                            "the default when no config file is given")

    report = command("report", "audit evidence from Vault's version history: key ages, rotations and how each "
                     "was verified, rollbacks, drift, policy breaches (never a key)", account=False)
    report.add_argument("--account", action="append", type=account_id,
                        help="Cloudflare account id (repeatable; default: every configured account)")
    report.add_argument("--from", dest="start", type=report_time, metavar="T",
                        help="start of the period, RFC 3339 or YYYY-MM-DD (default: 30 days before --to)")
    report.add_argument("--to", dest="end", type=report_time, metavar="T",
                        help="end of the period, RFC 3339 or YYYY-MM-DD (default: now)")
    report.add_argument("--output", choices=("json", "csv", "html"), default="json", help="the format (default json)")
    report.add_argument("--out", metavar="FILE", help="write the report to FILE (atomically) instead of stdout")
    report.add_argument("--check", metavar="FILE",
                        help="rebuild the JSON report FILE from Vault for its period and accounts; exit 0 when it "
                             "still matches, 1 with one line per difference")

    command("run", "run the daemon: schedules, admin API, metrics", account=False)

    demo = command("demo", "run the daemon against the built-in simulators", account=False)
    demo.add_argument("--listen", default="127.0.0.1:9477", help="admin API address (HOST:PORT or [IPV6]:PORT)")
    demo.add_argument("--ike", action="store_true", help="real IKE peers (strongSwan in network namespaces; root)")

    sim = command("sim", "start the Vault and Cloudflare simulators on loopback", account=False)
    sim.add_argument("--json", action="store_true", help="print one JSON line with addresses and credentials")
    sim.add_argument("--accounts", type=int, default=2, help="how many simulated accounts (default 2)")
    sim.add_argument("--tunnels", type=int, default=5, help="tunnels per account (default 5)")
    sim.add_argument("--cloudflare-latency", type=float, default=0.0, help="seconds added to every Cloudflare call")
    sim.add_argument("--vault-latency", type=float, default=0.0, help="seconds added to every Vault call")
    sim.add_argument("--aws", action="store_true",
                     help="also an EC2 fake whose VPN connections terminate the first account's tunnels (aws_vpn)")
    sim.add_argument("--aws-replacement", type=float, default=10.0,
                     help="seconds the EC2 fake takes to replace a modified tunnel (default 10)")
    sim.add_argument("--azure", action="store_true",
                     help="also an ARM fake (HTTPS) whose VPN connections terminate the first account's tunnels "
                          "(azure_vpn)")
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

        return run_sim(args.accounts, args.tunnels, args.json, args.cloudflare_latency, args.vault_latency,
                       aws=args.aws, aws_replacement=args.aws_replacement, azure=args.azure)
    if args.command == "demo":
        from rotator.demo import run_demo

        return run_demo(args.listen, ike=args.ike)
    from rotator import config as config_mod
    from rotator.service.logging import Redactor, configure

    settings = config_mod.load(args.config, cloudflare=args.command != "report")
    redactor = Redactor()
    for value in settings.secrets:
        redactor.add(value)
    if args.command == "config":
        # 'run' needs a file (accounts live there): with one, check everything 'run' would refuse.
        if not args.one_shot and settings.source != config_mod.ENV_ONLY:
            config_mod.check_for_daemon(settings)
        print(json.dumps(settings.masked(), indent=2))
        for warning in _device_warnings(settings):
            print(f"rotator: warning: {warning}", file=sys.stderr)
        return 0
    if args.command == "run":
        # The daemon logs to stdout, where container runtimes and journald look.
        configure(redactor, stream=sys.stdout)
        from rotator.service.daemon import run_daemon

        return run_daemon(settings, redactor)
    # One-shot commands keep stdout for their result (table or JSON) and log to stderr; what the
    # command prints itself (a failed run's error, retries) is not logged a second time.
    configure(redactor, stream=sys.stderr, drop=frozenset({"run_failed"}))
    _retries_as_one_line()
    from rotator.wiring import RunOptions, build_runtime, preflight

    if args.command == "report":
        from rotator.wiring import build_vault

        store, vault_auth = build_vault(settings)
        try:
            vault_auth.login()
            store.check()
            return _report(settings, store, args)
        finally:
            store.close()
    if args.command == "ack":
        runtime = build_runtime(settings)
        try:
            preflight(runtime)
            if not _ack(runtime, args):
                return 1
        finally:
            runtime.close()
    if args.command in ("unlock", "history"):
        runtime = build_runtime(settings)
        try:
            preflight(runtime)
            return _unlock(runtime, args.account) if args.command == "unlock" else _history(runtime, args)
        finally:
            runtime.close()
    if args.command in RUN_KINDS and not args.local:
        handed = _via_daemon(settings, args)
        if handed is not None:
            return handed

    progress = None
    if args.command != "status" and sys.stderr.isatty():  # stderr: the JSON on stdout stays whole
        progress = _Progress(args.account, args.command)
    runtime = build_runtime(settings, options=RunOptions(on_progress=progress.update if progress else None))
    try:
        preflight(runtime)
        if args.command == "status":
            return _status(runtime, args)
        if not getattr(args, "dry_run", False):
            handed = _meet_lease(runtime, args)
            if handed is not None:
                return handed
        if progress:
            progress.start()
        report = _rotate(runtime, args)
    finally:
        if progress:
            progress.done()
        runtime.close()
    return _show_run(report, args)


def _device_warnings(settings: Settings) -> list[str]:
    """Device tunnel patterns that match no listed tunnel: a warning, since tunnels come and go."""
    if not settings.devices or not settings.accounts:
        return []
    from rotator.wiring import build_runtime

    runtime = build_runtime(settings)
    try:
        listing = {a.id: runtime.cloudflare.list_tunnels(a.id) for a in settings.accounts}
    except RotatorError as exc:
        return [f"cannot list tunnels to check the devices' tunnel patterns: {exc}"]
    finally:
        runtime.close()
    return runtime.devices.unmatched_patterns(listing)


def _retries_as_one_line() -> None:
    """A retry is one short line on stderr with its attempt number, not the retry library's internals."""
    import stamina.instrumentation

    def hook(details: stamina.instrumentation.RetryDetails) -> None:
        cause = details.caused_by
        reason = str(getattr(cause, "error", cause)).split(" (")[0][:100]
        wait = getattr(cause, "wait_for", details.wait_for)  # the Cloudflare client waits on its own sleep
        sys.stderr.write(f"rotator: retrying (attempt {details.retry_num + 1}) in {wait:.1f}s: "
                         f"{reason}\n")

    stamina.instrumentation.set_on_retry_hooks([hook])


# The commands that run the protocol, and what each runs: an ack is followed by a reconcile.
RUN_KINDS = {"rotate": "rotate", "reconcile": "reconcile", "rollback": "rollback", "ack": "reconcile"}


def _rotate(runtime: Runtime, args: argparse.Namespace) -> dict[str, Any]:
    from rotator.rotation.engine import RunRequest

    kind = RUN_KINDS[args.command]
    schedule: dict[str, Any] = {}
    if getattr(args, "due", False):  # the schedule's own decision (rotation/plan.py), as the daemon's runs
        policy_for = runtime.schedule_for(args.account)
        schedule = {"policy_for": policy_for, "select": lambda t: policy_for(t) is not None}
    req = RunRequest(
        account_id=args.account,
        tunnels=None if kind == "reconcile" or getattr(args, "all", False) or schedule else args.tunnel,
        reconcile_only=kind == "reconcile", rollback=kind == "rollback", dry_run=getattr(args, "dry_run", False),
        **schedule, **runtime.request_options(args.account),
    )
    if not req.dry_run:
        # Wait (bounded, one line saying for whom) for a live holder; a gone holder of this host is taken over.
        runtime.leases.acquire_waiting(args.account, wait=not args.no_wait,
                                       notice=lambda line: print(f"rotator: {line}", file=sys.stderr, flush=True))
    try:
        return runtime.engine.run(req).as_dict()
    finally:
        runtime.leases.release(args.account)


def _unlock(runtime: Runtime, account: str) -> int:
    from rotator.rotation.lease import LocalProcesses, unlock

    print(unlock(runtime.store, account, LocalProcesses(), runtime.leases.holder))
    return 0


def _version_view(v: VersionInfo) -> dict[str, Any]:
    """What history shows of one version: never a key, nor anything derived from one."""
    rec = v.record
    out: dict[str, Any] = {"version": v.number, "written_at": v.created_time or None, "deleted": rec is None}
    if rec is None:
        return out
    outcome = rec.last_error or ("rotated" if rec.state == "active" and rec.psk is not None else rec.state)
    if rec.state == "pending" and rec.acked:
        outcome = "acknowledged: the device holds the new key" + (f" ({rec.last_error})" if rec.last_error else "")
    out.update({"rotation_id": rec.rotation_id, "state": rec.state, "pending": rec.pending_psk is not None,
                "outcome": outcome, "last_error": rec.last_error, "rotated_at": rec.rotated_at, "device": rec.device,
                "tunnel_name": rec.tunnel_name, "verified_at": rec.verified_at, "verified_by": rec.verified_by})
    return out


def _history(runtime: Runtime, args: argparse.Namespace) -> int:
    """The tunnel's record, version by version, newest first (the versions Vault still keeps, read as
    ``rotator report`` reads them); never a key or anything derived from one."""
    from rotator.errors import VaultError
    from rotator.rotation.ports import HistoryStore
    if args.limit < 1:
        raise ConfigError(f"--limit must be at least 1, not {args.limit}", "give --limit N with N >= 1")
    try:
        (tunnel,) = runtime.engine.named(args.account, [args.tunnel])
        tid, name = tunnel.id, tunnel.name
    except ConfigError:
        if not ACCOUNT_RE.match(args.tunnel):  # an id no longer listed still has its history in Vault
            raise
        tid, name = args.tunnel, None
    store = runtime.store
    if not isinstance(store, HistoryStore):
        raise RotatorError("this record store keeps no version history", "use Vault's KV v2")
    found = store.history_many(args.account, [tid])[tid]
    if isinstance(found, VaultError):
        raise found
    versions = [_version_view(v) for v in reversed(found.versions[-args.limit:])]
    if args.output == "json":
        print(json.dumps({"account_id": args.account, "tunnel_id": tid, "tunnel_name": name, "versions": versions},
                         indent=2))
        return 0
    print(f"History of tunnel {name or '?'} ({tid}) in account {args.account}, newest first")
    if not versions:
        print("(no versions: the rotator has never written this tunnel's record)")
        return 0
    rows = [[str(v["version"]), v["written_at"] or "-", "(deleted)", "", "", "", ""] if v["deleted"] else
            [str(v["version"]), v["written_at"] or "-", v["rotation_id"] or "-",
             v["state"] + (" (pending key)" if v["pending"] else ""), v["device"] or "-",
             " ".join(filter(None, (v["verified_by"], v["verified_at"]))) or "-", " ".join(v["outcome"].split())]
            for v in versions]
    print(_table(rows, ["VERSION", "WRITTEN", "ROTATION", "STATE", "DEVICE", "VERIFIED", "OUTCOME"]))
    return 0


def _ack(runtime: Runtime, args: argparse.Namespace) -> bool:
    """Record in Vault (CAS) what each named tunnel's manual device holds: the engine's acknowledge
    (model.ack), all or nothing. False, with one line per refusal naming the current state and the
    exact command, when any is refused (nothing is recorded then)."""
    answer = runtime.engine.acknowledge(args.account, args.tunnel, args.holds, args.rotation)
    refused = [why for why in answer.values() if why is not None]
    for why in refused:
        print(f"rotator: error: not acknowledged: {why}", file=sys.stderr)
    if not refused:
        print(f"rotator: acknowledged {len(answer)} tunnel(s): the device holds the {args.holds} key; "
              "finishing them", file=sys.stderr)
    return not refused


def _show_run(report: dict[str, Any], args: argparse.Namespace) -> int:
    """Print a run's report, local or from the daemon, the same way; returns the exit code."""
    if args.output == "json":
        print(json.dumps(report, indent=2))
    else:
        _print_report(report, args.command, args.verbose)
    if report.get("error") and not report.get("tunnels"):
        print(f"rotator: error: {report['error']}", file=sys.stderr)
    return 0 if report.get("ok") else 1


def _via_daemon(settings: Settings, args: argparse.Namespace) -> int | None:
    """Hand the request to the daemon at ROTATOR_ADMIN_URL when it leads the account; None: run here."""
    url = os.environ.get("ROTATOR_ADMIN_URL", "").rstrip("/")
    if not url:
        return None
    if settings.admin.token is None:
        raise ConfigError("ROTATOR_ADMIN_URL is set but no admin token is",
                          "export ROTATOR_ADMIN_TOKEN (or pass --local to run here)")
    return _hand_over(settings, args, url, None)


def _meet_lease(runtime: Runtime, args: argparse.Namespace) -> int | None:
    """Before waiting for another holder's lease: check the tunnel names, then hand the request to a
    leading daemon found in the lease (it records its admin URL there, rotation/lease.py). None: run
    here (the lease is free, ours to take, or held by another one-shot command: waited for, bounded).
    A daemon that cannot be reached is one line naming it, never a wait for a lease it renews forever."""
    from rotator.rotation.lease import Liveness

    lease = runtime.store.read_lease(args.account)
    if not lease.holder or lease.holder == runtime.leases.holder or lease.expires_at <= time.time():
        return None
    if runtime.leases.processes.probe(lease.holder) is Liveness.GONE:
        return None  # taken over at once by the run
    named = getattr(args, "tunnel", None)
    if named and RUN_KINDS[args.command] != "reconcile":
        runtime.engine.resolve(args.account, named)  # an unknown name fails now, not after a wait
    if not lease.admin_url or args.local:
        return None
    from urllib.parse import urlsplit

    from rotator.config import check_admin_url
    from rotator.rotation.lease import HolderId

    fix = ("set admin.advertise_url (or ROTATOR_ADMIN_ADVERTISE_URL) on the daemon to an address other hosts "
           "reach, or ROTATOR_ADMIN_URL here; or pass --local to wait for its lease here (--no-wait fails at once)")
    try:
        url = check_admin_url(lease.admin_url, "its admin URL")
    except ConfigError as exc:
        raise RotatorError(f"account {args.account} is led by the daemon {lease.holder}, whose lease names no usable "
                           f"admin URL ({exc.message})", fix) from None
    holder = HolderId.parse(lease.holder)
    if _loopback(urlsplit(url).hostname or "") and (holder is None or holder.host != runtime.leases.processes.host):
        raise RotatorError(f"account {args.account} is led by the daemon {lease.holder} on another host; its admin "
                           f"API {url} answers only there", fix)
    if runtime.settings.admin.token is None:
        raise ConfigError(f"account {args.account} is led by the daemon {lease.holder} (admin API {url}) and no "
                          "admin token is set to hand the request to it",
                          "export ROTATOR_ADMIN_TOKEN with the daemon's admin token, or pass --local to wait "
                          "for its lease here (--no-wait fails at once)")
    return _hand_over(runtime.settings, args, url, lease.holder)


def _loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _hand_over(settings: Settings, args: argparse.Namespace, url: str, holder: str | None) -> int | None:
    """POST the request to the daemon at ``url``, follow it and print its result; None when the daemon
    does not lead the account. ``holder``: the lease that named the URL (None: ROTATOR_ADMIN_URL did)."""
    import httpx

    assert settings.admin.token is not None
    auth = {"Authorization": f"Bearer {settings.admin.token.reveal()}"}
    if holder is None:
        unreachable = "check ROTATOR_ADMIN_URL, or pass --local to run here"
        where = f"the daemon at {url}"
    else:
        unreachable = ("set ROTATOR_ADMIN_URL to an address of its admin API that this host reaches, or pass "
                       "--local to wait for its lease here (--no-wait fails at once)")
        where = f"the daemon {holder} leading account {args.account} (admin API {url}, from its lease)"
    try:
        # A few seconds to connect: a daemon that does not answer is reported, not waited for.
        with httpx.Client(base_url=url, headers=auth, timeout=httpx.Timeout(10.0, connect=3.0)) as client:
            status = client.get("/v1/status")
            if status.status_code == 401:
                raise ConfigError(f"{where} refused the admin token", "check ROTATOR_ADMIN_TOKEN")
            leads = (status.json().get("accounts", {}).get(args.account) or {}).get("leader") is True
            if not leads and holder is not None:  # the lease says it leads: this is not the daemon it names
                raise RotatorError(f"{where} answers that it does not lead the account: the URL reaches another "
                                   "daemon", unreachable)
            if not leads:
                print(f"rotator: the daemon at {url} does not lead account {args.account}; running here",
                      file=sys.stderr)
                return None
            body: dict[str, Any] = {"account": args.account}
            kind = RUN_KINDS[args.command]
            if kind == "reconcile":
                body["reconcile"] = True
            elif kind == "rollback":
                body.update({"rollback": True, "tunnels": args.tunnel})
            else:
                body.update({"all": True} if args.all else {"due": True} if args.due else {"tunnels": args.tunnel})
                body["dry_run"] = bool(args.dry_run)
            answer = client.post("/v1/rotations", json=body)
            if answer.status_code != 202:
                error = answer.json().get("error", answer.text[:200])
                raise (ConfigError if answer.status_code == 400 else RotatorError)(
                    f"the daemon at {url} refused the request: {error}",
                    "wait and retry" if answer.status_code == 429 else "")
            run_id = answer.json()["id"]
            print(f"rotator: handed to the daemon at {url} (run {run_id}); following it", file=sys.stderr)
            view = _follow(client, run_id)
    except (httpx.HTTPError, ValueError) as exc:
        raise RotatorError(f"cannot talk to {where}: {exc}", unreachable) from None
    if view["state"] == "failed" or "result" not in view:
        raise RotatorError(f"the daemon's run {run_id} failed: {view.get('error')}", "see the daemon's log")
    return _show_run(view["result"], args)


FOLLOW_LIMIT = 6 * 3600.0  # a run the daemon does not finish in this long is reported, not waited for


def _follow(client: Any, run_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + FOLLOW_LIMIT
    while time.monotonic() < deadline:
        view: dict[str, Any] = client.get(f"/v1/rotations/{run_id}").json()
        if view.get("state") in ("done", "failed"):
            return view
        time.sleep(0.2)
    raise RotatorError(f"the daemon's run {run_id} did not finish in {FOLLOW_LIMIT:.0f}s",
                       f"follow it with GET /v1/rotations/{run_id}")


class _Progress:
    """One self-rewriting line on the terminal, from the start of the plan: tunnels settled so far."""

    def __init__(self, account: str, command: str) -> None:
        self.account, self.command = account, command
        self.started = time.monotonic()
        self.open = False

    def start(self) -> None:
        self.started = time.monotonic()
        self.open = True
        sys.stderr.write(f"{self.account[:8]}… {self.command}: listing tunnels and reading their Vault records")
        sys.stderr.flush()

    def update(self, settled: int, total: int) -> None:
        width = 30
        filled = width * settled // total if total else width
        sys.stderr.write(f"\r\033[K{self.account[:8]}… [{'#' * filled}{'.' * (width - filled)}] {settled}/{total} "
                         f"tunnels {time.monotonic() - self.started:6.1f}s")
        sys.stderr.flush()

    def done(self) -> None:
        if self.open:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.open = False


def _table(rows: list[list[str]], headers: list[str]) -> str:
    """Columns padded to their widest cell. On a terminal the last column is cut to what it has left;
    anywhere else (a pipe, a file) nothing is cut."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    if sys.stdout.isatty():
        room = shutil.get_terminal_size((160, 24)).columns - sum(widths[:-1]) - 2 * (len(widths) - 1)
        widths[-1] = max(len(headers[-1]), min(widths[-1], max(20, room)))

    def cut(text: str, width: int) -> str:
        return text if len(text) <= width else text[:width - 1] + "…"

    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(cut(c, w).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
    return "\n".join(lines)


GROUP_MIN = 3  # this many tunnels with the same result, device and reason are one line of the report
KEPT_OLD_KEY = ("refused", "unapplied", "rolled_back", "skipped")  # both ends stay on (or are back on) psk


def _print_report(report: dict[str, Any], command: str, verbose: bool) -> None:
    """The run's table: tunnels that need attention (``--verbose``: every one), identical reasons
    grouped into one line with their count; per-device totals; the summary; what to do next."""
    tunnels = report.get("tunnels") or []
    if report.get("error") and not tunnels:
        return
    kind = RUN_KINDS.get(command, command)
    title = "Dry run" if report.get("dry_run") else {"reconcile": "Reconcile", "rollback": "Rollback"}.get(
        kind, "Rotation")
    account = report["account_id"]
    print(f"{title} {report['rotation_id']} on account {account}")
    done = ("rolled_back",) if kind == "rollback" else DONE_RESULTS
    shown = tunnels if verbose else [t for t in tunnels if t["result"] not in done]

    def result(t: dict[str, Any]) -> str:
        return str(t["result"]) + (" (reconciled)" if t.get("reconciled") else "")

    def reason(t: dict[str, Any]) -> str:
        return " ".join((t.get("reason") or "").split())

    rows = []
    if verbose:
        rows = [[t["name"], t["tunnel_id"], result(t), t.get("device") or "-", reason(t)] for t in shown]
    else:
        groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for t in shown:
            groups.setdefault((result(t), t.get("device") or "-", reason(t)), []).append(t)
        for (res, device, why), members in groups.items():
            if len(members) < GROUP_MIN:
                rows.extend([t["name"], t["tunnel_id"], res, device, why] for t in members)
            else:
                names = sorted(t["name"] for t in members)
                rows.append([f"{len(members)} tunnels", f"{names[0]} … {names[-1]}", res, device, why])
    if rows:
        print(_table(rows, ["TUNNEL", "ID", "RESULT", "DEVICE", "REASON"]))
        for t in shown:  # the acknowledgement a manual device waits for, in full (never cut to the terminal)
            wanted = ACK_COMMAND.search(t.get("reason") or "")
            if wanted:
                print(f"{t['name']} waits for an operator; once the device holds the "
                      f"{wanted.group(1)} key: {wanted.group(0)}")
    if len(shown) < len(tunnels):
        print(f"({len(tunnels) - len(shown)} tunnels done as asked are not listed; --verbose lists every one)")
    elif len(rows) < len(shown):
        print("(tunnels with the same result, device and reason are one line; --verbose lists every one, "
              "--output json gives the whole report)")
    for line in _device_totals(tunnels):
        print(line)
    counts = ", ".join(f"{n} {r}" for r, n in report.get("counts", {}).items() if n)
    print(f"Summary: {counts or 'nothing to do'} in {report.get('duration_seconds', 0):.2f}s")
    for line in _next_steps(tunnels, account, done, kind):
        print(line)


def _device_totals(tunnels: list[dict[str, Any]]) -> list[str]:
    """``Device NAME: 1901 rotated, 99 refused`` per far-end device, when the run dealt with any."""
    by_device: dict[str, dict[str, int]] = {}
    for t in tunnels:
        counts = by_device.setdefault(t.get("device") or "", {})
        counts[t["result"]] = counts.get(t["result"], 0) + 1
    if not any(by_device):
        return []
    return [f"{'Device ' + name if name else 'No device'}: " + ", ".join(f"{n} {r}" for r, n in counts.items())
            for name, counts in sorted(by_device.items(), key=lambda kv: (kv[0] == "", kv[0]))]


def _next_steps(tunnels: list[dict[str, Any]], account: str, done: tuple[str, ...], kind: str) -> list[str]:
    """One line per kind of unfinished business: the command that moves it on."""
    def of(*results: str) -> list[dict[str, Any]]:
        return [t for t in tunnels if t["result"] in results and t["result"] not in done]

    lines = []
    unknown, waiting, failed, kept = of("unknown"), of("waiting"), of("failed"), of(*KEPT_OLD_KEY)
    if unknown:
        lines.append(f"Next: {len(unknown)} key(s) stay pending with an unknown outcome: 'rotator reconcile --account "
                     f"{account}' settles them (safe to repeat)")
    if waiting:
        lines.append(f"Next: {len(waiting)} key(s) wait for an operator: put each on its device, then run the "
                     f"'rotator ack' printed for it above ('rotator status --account {account} --state waiting' "
                     "lists them with the command)")
    if failed:
        lines.append(f"Next: {len(failed)} tunnel(s) failed and were not settled: 'rotator status --account {account} "
                     f"--state failed' says why and what each waits for; 'rotator reconcile --account {account}' "
                     "finishes what is left")
    if kept:
        devices = sorted({t.get("device") or "" for t in kept} - {""})
        where = f" on device {', '.join(devices)}" if devices else ""
        again = "rollback" if kind == "rollback" else "rotate"
        lines.append(f"Next: {len(kept)} tunnel(s) kept their current key on both ends: fix the cause named above"
                     f"{where}, then {again} them again: 'rotator {again} --account {account} --tunnel "
                     f"{kept[0]['tunnel_id']}{' --tunnel ...' if len(kept) > 1 else ''}' (--output json lists every id)")
    return lines


def _report(settings: Settings, store: HistoryStore, args: argparse.Namespace) -> int:
    """``rotator report``: build (or ``--check``) the audit report from Vault's version history."""
    from rotator.service import report as rpt

    manual = [d.name for d in settings.devices if d.kind == "manual"]
    lookup = rpt.policy_lookup(settings)
    if args.check:
        old = _report_file(args.check)
        period = old["period"]
        start, end = report_time(period["from"]), report_time(period["to"])
        new = rpt.collect(store, [a["account_id"] for a in old["accounts"]], lookup, start, end, manual)
        lines = [] if rpt.intact(old) else ["digest: the file's content no longer matches its own digest (edited)"]
        lines += rpt.differences(old, new)
        if not lines:
            print(f"rotator: {args.check} matches Vault's history ({old['digest']})")
            return 0
        for line in lines:
            print(f"rotator: differs: {line}")
        print(f"rotator: {args.check} does not match Vault's history: {len(lines)} difference(s)", file=sys.stderr)
        return 1
    accounts = args.account or [a.id for a in settings.accounts]
    if not accounts:
        raise ConfigError("no account to report on", "give --account ID or configure [[accounts]] in the file")
    end = args.end if args.end is not None else time.time()
    start = args.start if args.start is not None else end - 30 * 86400.0
    if start >= end:
        raise ConfigError("--from is not before --to", "give a period that starts before it ends")
    report = rpt.collect(store, list(dict.fromkeys(accounts)), lookup, start, end, manual)
    text = rpt.RENDERERS[args.output](report)
    if args.out:
        try:
            rpt.write_atomic(args.out, text)
        except OSError as exc:
            raise RotatorError(f"cannot write {args.out}: {exc.strerror or exc}",
                               "choose a writable --out path") from None
        print(f"rotator: report written to {args.out} ({report['digest']})", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _report_file(path: str) -> dict[str, Any]:
    """A JSON report to --check, or a usage error (exit 2) naming what is wrong with the file."""
    from rotator.service.report import FORMAT

    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as exc:
        raise ConfigError(f"--check: cannot read {path}: {exc.strerror or exc}", "name a report file") from None
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"--check: {path} is not JSON", "check the JSON report (--output json), not the CSV or "
                          "HTML one") from None
    period = data.get("period") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(period, dict) \
            or not isinstance(data.get("accounts"), list) or not isinstance(data.get("digest"), str):
        raise ConfigError(f"--check: {path} is not a {FORMAT} report", "check a file written by 'rotator report'")
    try:
        report_time(str(period.get("from"))), report_time(str(period.get("to")))
        [account_id(str(a.get("account_id"))) for a in data["accounts"]]
    except (argparse.ArgumentTypeError, AttributeError):
        raise ConfigError(f"--check: {path} has a malformed period or account id", "check an unedited report")\
            from None
    return data


def _status(runtime: Runtime, args: argparse.Namespace) -> int:
    from rotator.rotation.plan import listed_once
    from rotator.service.inventory import assess, summary

    tunnels = listed_once(runtime.cloudflare.list_tunnels(args.account))  # a tunnel listed twice: one row, refused
    records = runtime.store.read_many(args.account, [t.id for t in tunnels if t.problem is None])
    now = time.time()
    schedule = runtime.schedule_for(args.account)

    unread = RotatorError("not read: the listing makes this tunnel unusable")

    def view(t: Any) -> Any:
        record = records.get(t.id, unread)
        return assess(schedule(t), t, record, now, manual=runtime.is_manual(getattr(record, "device", None)))

    views = [view(t) for t in tunnels]
    views = [v for v in views if (args.state is None or v.matches(args.state))
             and (not args.tunnel or any(v.tunnel_id == w or fnmatch.fnmatchcase(v.name, w) for w in args.tunnel))
             and (args.device is None or v.device == args.device)]
    counts = summary(views)
    budget = runtime.budget_view()
    if args.output == "json":
        print(json.dumps({"account_id": args.account, "summary": counts, "cloudflare_rate_budget": budget,
                          "tunnels": [v.as_dict(now) for v in views]}, indent=2))
        return 0
    rows = [[v.name, v.tunnel_id, v.state + (" (drifted)" if v.drifted and v.state != "drifted" else ""),
             _age(None if v.last_rotated is None else int(now - v.last_rotated)), "yes" if v.pending else "no",
             v.device or "-", " ".join((v.last_error or "").split())] for v in views]
    print(_table(rows, ["TUNNEL", "ID", "STATE", "PSK AGE", "PENDING", "DEVICE", "LAST ERROR"]))
    for v in views:
        if v.ack_command:
            print(f"{v.name} ({v.tunnel_id}) waits for {v.waits_for}; acknowledge it with: {v.ack_command}")
    print("Summary: " + ", ".join(f"{n} {k}" for k, n in counts.items() if n or k == "tunnels"))
    if budget is not None:
        print(f"Cloudflare rate budget: {budget['remaining']} of {budget['limit'] or '?'} requests left in this "
              f"window ({budget['reserved']} kept for other tools)")
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
