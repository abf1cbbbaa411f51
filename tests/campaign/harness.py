"""A seeded, randomized, bounded fault campaign against real rotator processes (issue 9, "The campaign").

In the spirit of Jepsen: both simulators run in this process; rotators run as real processes (``rotator
rotate``, ``rotator reconcile`` and the ``rotator run`` daemon), two or three at once, so SIGKILL and
SIGTERM are real. Each round mixes, at random, the enabled fault classes (see ``CLASSES``) while a
monitor thread checks the invariant continuously (``monitor.py``). At the end of a round every
rotator is killed, every fault lifted, the simulators drained of requests in flight, and a
fault-free ``rotator reconcile`` of each account must reach the strict form: every record active,
no pending_psk, Cloudflare holding the record's psk.

Environment: ``ROTATOR_CAMPAIGN_SEED`` (replay a schedule; process timing still varies),
``ROTATOR_CAMPAIGN_ROUND`` (start at this round number: with the seed, replays that round's schedule
first), ``ROTATOR_CAMPAIGN_SECONDS`` (the time budget for rounds), ``ROTATOR_CAMPAIGN_FAULTS`` (``all``, a
comma list of classes, or ``all,-drift`` to leave some out), ``ROTATOR_CAMPAIGN_TUNNELS`` (total, in two
accounts; at least 200).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from rotator.httpserver import ServerThread
from rotator.sim import RateLimit, Simulators
from tests.campaign.gate import Gate
from tests.campaign.monitor import PREFIX, Figures, Monitor, Violation

CLASSES: dict[str, str] = {
    "kill": "SIGKILL of a rotator process at a random moment",
    "term": "SIGTERM of a rotator process at a random moment",
    "latency": "latency on Cloudflare and Vault routes (below the client's call deadline)",
    "drop": "the request takes effect, the connection is dropped unanswered (Cloudflare and Vault)",
    "late": "the request takes effect, the answer comes after the client's deadline",
    "status": "429 with Retry-After and 5xx answers from Cloudflare and Vault (nothing takes effect)",
    "contradict": "contradictory bulk-set answers: another key echoed, a tunnel both applied and unapplied",
    "trickle": "an apply answer whose body trickles in for longer than the call deadline",
    "vault_refuse": "Vault refuses writes (403) or is sealed for a while",
    "vault_garbage": "Vault answers 200 with a login page or the wrong JSON types; a lease with garbage expiry",
    "cf_garbage": "an apply that took effect answered by a proxy's HTML page",
    "drift": "keys changed outside the rotator (psk_generate, as a dashboard user would)",
    "daemon": "a `rotator run` daemon among the rotators, with on-demand rotations through its admin API",
    "short_lease": "leases of a few seconds (otherwise 60s)",
    "oddids": "tunnels whose ids are not 32 hex digits (../other-account/tunnel, ../_leases/account, sub/dir, ..)",
    "devices": "a simulated far-end device (webhook) for every tunnel: refusals, failed verifications, "
               "hangs, garbage, late and lost answers; its key is checked like Cloudflare's",
    "takeover": "the fault-free reconcile finds the leases the killed rotators held and must take them over at once",
    "twice": "Cloudflare's listing names a tunnel twice (a second entry with the same id under another name)",
    "manual_ack": "a manual device for a few tunnels (ack_timeout 3s): an operator types keys in late or never and "
                  "acknowledges right, or in forms that must be refused (no --holds, a stale rotation, --holds new "
                  "while the key is withdrawn); the key the operator typed is checked like Cloudflare's",
    "vendors": "vendor device kinds: 40 tunnels of the second account end on AWS Site-to-Site VPN (aws_vpn through "
               "boto3 against the EC2 fake), 20 more on Azure VPN Gateway (azure_vpn through azure-mgmt-network "
               "against the ARM fake over TLS): refused, throttled, 5xx, late and lost modifications, a denied "
               "DescribeVpnConnections or sharedKey/write, Azure updates that fail or hang, tunnels that never come "
               "UP; and 10 tunnels of the first account on each simulated firewall (panos, vyos, fortigate, over "
               "HTTPS): refused keys, failed commits, no re-authentication, 5xx, late, lost and garbage answers; "
               "the vendor's key is checked like Cloudflare's",
}
# What the suite runs by default: every class. On main at a113232 four of them broke it (kept here as
# the campaign's record; replay with the seed and ROTATOR_CAMPAIGN_FAULTS set to the class):
# contradict (seed 201: a contradictory apply answer unstaged the key Cloudflare holds), drift (seed
# 104: a reconcile left a key set outside the rotator in place), oddids (seed 105: every rotate and
# reconcile of the account crashed with a traceback, leaving keys pending) and vault_garbage (seed 202:
# tracebacks). All four pass since the adapters and core branches were merged.
# takeover (issue 9 item 8: a dead holder on this host is taken over at once) failed until leases named
# host, pid and a start nonce (seed 701: 37 tunnels left pending); kill,takeover for 172 s: 0 violations.
# devices is skipped, with a note, while the configuration has no [[devices]].
DEFAULT_FAULTS = tuple(CLASSES)

ADMIN_TOKEN = "campaign-admin-" + "7f3a9c" * 5
TOKEN_RUN = re.compile(r"[A-Za-z0-9._~+/=-]{16,}")  # every character a key or token of this campaign can hold
CF_TIMEOUT = 2.0  # seconds; every injected pre-handling latency stays below it
MANUAL_PER_ACCOUNT = 3  # tunnels of each account on the manual device (manual_ack)
WAITING_NOTE = "waiting for an operator to put the new key"  # steps._waiting's note: the run asked for the key


class ManualEnd:
    """The manual device's end (manual_ack): the key the campaign's operator typed into it per tunnel.
    The monitor checks it like the simulated device's (a ``lock`` and ``held``)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.keys: dict[tuple[str, str], str] = {}

    def held(self, account: str, tunnel: str) -> str | None:
        return self.keys.get((account, tunnel))
LATE_DELAY = (2.5, 4.0)  # answers that come after the client's deadline
AWS_TUNNELS = 40  # of the second account, two per VPN connection
AWS_TIMEOUT = 3.0  # the aws_vpn device's call deadline (a short lease of 6 s still covers it twice)
FIREWALL_TUNNELS = 10  # of the first account, per firewall kind (vendors)
FIREWALL_KINDS = ("panos", "vyos", "fortigate")
AWS_REPLACEMENT = 1.0  # seconds the EC2 fake takes to replace a tunnel (at least 1: EC2 reports whole seconds)
AZURE_TUNNELS = 20  # of the second account, after the manual and AWS ones, two per Azure VPN gateway
AZURE_TIMEOUT = 3.0  # the azure_vpn device's call deadline


def parse_faults(text: str | None, default: tuple[str, ...] = DEFAULT_FAULTS) -> tuple[str, ...]:
    if not text:
        return default
    chosen: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part == "all":
            chosen.extend(c for c in CLASSES if c not in chosen)
        elif part.startswith("-") and part[1:] in CLASSES:
            chosen = [c for c in chosen if c != part[1:]]
        elif part in CLASSES:
            chosen.append(part) if part not in chosen else None
        else:
            raise ValueError(f"ROTATOR_CAMPAIGN_FAULTS: unknown fault class {part!r}; known: {', '.join(CLASSES)}")
    return tuple(chosen)


class GatedSimulators(Simulators):
    """The simulators served through a Gate each (requests in flight, rewritten answers)."""

    def start(self) -> GatedSimulators:
        self.vault_gate, self.cf_gate = Gate(self.vault), Gate(self.cloudflare)
        self._servers = [ServerThread(self.vault_gate).start(), ServerThread(self.cf_gate).start()]
        return self


@dataclass
class Proc:
    name: str
    kind: str  # rotate | rotate-some | reconcile | daemon
    account: str | None
    popen: subprocess.Popen[bytes]
    out: Path
    err: Path
    started: float
    admin_url: str | None = None
    signalled: str | None = None
    doom: tuple[float, signal.Signals] | None = None  # (monotonic time, signal) chosen at its start
    fault_free: bool = False
    must_refuse: tuple[str, str, str] | None = None  # an ack that must be refused: (account, tunnel, why)

    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class Event:
    at: float
    round: int
    text: str

    def line(self) -> str:
        return f"t=+{self.at:7.2f}s round {self.round:3d}  {self.text}"


@dataclass
class Result:
    seed: int
    faults: tuple[str, ...]
    tunnels: int
    rounds: int = 0
    seconds: float = 0.0
    figures: Figures = field(default_factory=Figures)
    violations: list[Violation] = field(default_factory=list)
    strict_failures: int = 0
    tracebacks: list[str] = field(default_factory=list)
    leaks: int = 0
    processes: int = 0
    kills: int = 0
    faults_armed: int = 0
    rewritten: int = 0  # answers the gates rewrote (contradictions, garbage, trickles)
    device_calls: int = 0  # calls the simulated device received
    applies: int = 0  # bulk-set applies Cloudflare received during the rounds (the setup's not counted)
    acks: int = 0  # `rotator ack` processes the manual device's operator ran (manual_ack)
    acks_refused: int = 0  # of those that had to be refused, refused (exit 1)
    trace: list[Event] = field(default_factory=list)  # the schedule of the round with the first violation
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)
    rounds_by_class: dict[str, int] = field(default_factory=dict)
    violating_rounds_by_class: dict[str, int] = field(default_factory=dict)
    violating_rounds: list[tuple[int, str]] = field(default_factory=list)  # (round, its active classes)

    @property
    def ok(self) -> bool:
        return not self.violations and not self.tracebacks and not self.leaks

    def summary(self) -> str:
        f = self.figures
        return (f"campaign seed={self.seed} faults={','.join(self.faults)}"
                f"{' (interrupted)' if self.interrupted else ''}\n"
                f"  {self.rounds} rounds in {self.seconds:.0f}s over {self.tunnels} tunnels in 2 accounts; "
                f"{self.processes} rotator processes ({self.kills} signalled), {self.faults_armed} faults armed, "
                f"{self.rewritten} answers rewritten, {self.applies} applies received, {self.device_calls} device calls"
                + (f", {self.acks} acks ({self.acks_refused} refused as they must be)" if self.acks else "") + "\n"
                f"  invariant checks: {f.snapshots} atomic snapshots, {f.tunnel_checks} tunnel checks "
                f"(longest {f.longest_check_ms:.1f} ms); drifted tunnel sightings {f.drifted_seen}\n"
                f"  violations: {f.violations} continuous, {self.strict_failures} strict after reconcile; "
                f"tracebacks: {len(self.tracebacks)}; keys in output: {self.leaks}\n"
                f"  rounds with a violation / rounds active, by class: "
                + ", ".join(f"{c} {self.violating_rounds_by_class.get(c, 0)}/{n}"
                            for c, n in sorted(self.rounds_by_class.items())))

    def report(self) -> str:
        lines = [self.summary(), *self.notes]
        if self.violations:
            first = min(self.violations, key=lambda v: v.at)
            lines.append(f"first violation (replay its round with ROTATOR_CAMPAIGN_SEED={self.seed} "
                         f"ROTATOR_CAMPAIGN_ROUND={first.round} ROTATOR_CAMPAIGN_FAULTS={','.join(self.faults)}):")
            lines.append("  " + first.line())
            lines.append("rounds with a violation (round: active classes): "
                         + "; ".join(f"{r}: {c}" for r, c in self.violating_rounds[:20]))
            lines.append(f"fault schedule of round {first.round} up to it:")
            lines.extend("  " + e.line() for e in self.trace if e.at <= first.at + 0.5)
            if len(self.violations) > 1:
                lines.append(f"  ... and {len(self.violations) - 1} more violations, e.g.")
                lines.extend("  " + v.line() for v in sorted(self.violations, key=lambda v: v.at)[1:4])
        for tb in self.tracebacks[:3]:
            lines.append("traceback: " + tb)
        return "\n".join(lines)


class Campaign:
    def __init__(self, seed: int, seconds: float, faults: tuple[str, ...], tunnels: int = 200,
                 stop_at_first: bool = False, log: Callable[[str], None] | None = None,
                 max_rounds: int = 10_000, first_round: int = 1) -> None:
        self.seed, self.seconds, self.faults = seed, seconds, faults
        self.tunnels = max(200, tunnels)
        self.stop_at_first = stop_at_first
        self.max_rounds = max_rounds
        self.say = log or (lambda line: None)
        self.rng = random.Random(seed)
        self.result = Result(seed, faults, self.tunnels)
        self.active: set[str] = set()
        self.startup = 1.0  # seconds from a rotator's start to its first request, as last measured
        self.round = first_round - 1  # rounds are numbered from first_round (to replay one round's schedule)
        self.events: list[Event] = []
        self.procs: list[Proc] = []
        self.finished: list[Proc] = []
        self._n = 0
        self._configs = 0
        self._described: dict[Path, str] = {}
        self.firewalls: list[Firewall] = []

    # -- the whole campaign ----------------------------------------------------------------------------
    def run(self) -> Result:
        self.wall0 = time.time()
        workdir = Path(tempfile.mkdtemp(prefix="rotator-campaign-"))
        self.workdir = workdir
        try:
            with GatedSimulators(accounts=2, tunnels=self.tunnels // 2,
                                 rate_limit=RateLimit(limit=10**9, window=300.0)) as sims:
                self.sims = sims
                self.accounts = list(sims.tunnels_by_account)
                self.env = {**os.environ, **sims.env(), "ROTATOR_ADMIN_TOKEN": ADMIN_TOKEN}
                self.env.pop("ROTATOR_CONFIG", None)
                self.http = httpx.Client(timeout=10)
                device_server = self._start_device()
                aws_server = self._start_aws()
                self._start_firewalls()
                azure_server = self._start_azure()
                try:
                    self._run_rounds()
                finally:
                    self._kill_all()
                    if device_server is not None:
                        device_server.stop()
                        self.result.device_calls = sum(self.device.request_counts().values())
                    for fw in self.firewalls:
                        fw.server.stop()
                        self.result.device_calls += sum(fw.sim.request_counts().values())
                    if aws_server is not None:
                        aws_server.stop()
                        self.result.device_calls += sum(self.aws.request_counts().values())
                    if azure_server is not None:
                        azure_server.stop()
                        self.result.device_calls += sum(self.azure.request_counts().values())
                    self.http.close()
                    self.result.rewritten = sims.cf_gate.rewritten + sims.vault_gate.rewritten
                    self._scan_outputs()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        self.result.seconds = time.time() - self.wall0
        return self.result

    def _start_device(self) -> ServerThread | None:
        """The simulated far-end device, when the class is on and this code base configures devices."""
        self.device: Any = None
        self.device_gate: Gate | None = None
        if "devices" not in self.faults:
            return None
        if not devices_wired():
            self.faults = self.result.faults = tuple(c for c in self.faults if c != "devices")
            self.result.notes.append("devices: skipped, [[devices]] is not part of the configuration yet")
            return None
        from rotator.sim.device import PATH, DeviceSim

        self.device = DeviceSim(name="sim-device", peer=self.sims.cloudflare.psk_of)
        self.device_gate = Gate(self.device)
        server = ServerThread(self.device_gate).start()
        self.device_url = server.url + PATH
        self.device_secret = self.workdir / "device.key"
        self.device_secret.write_text(self.device.secret)
        return server

    def _start_aws(self) -> ServerThread | None:
        """The EC2 fake for the vendors class: AWS_TUNNELS tunnels of the second account, two per VPN
        connection, each UP while its key equals Cloudflare's (docs/design.md section 10)."""
        self.aws: Any = None
        self.aws_gate: Gate | None = None
        if "vendors" not in self.faults:
            return None
        from rotator.sim.aws import AwsSim, attach

        self.aws = AwsSim(replacement=AWS_REPLACEMENT)
        account = self.accounts[1]
        self.aws_tunnels = self.sims.tunnels_by_account[account][MANUAL_PER_ACCOUNT:MANUAL_PER_ACCOUNT + AWS_TUNNELS]
        attach(self.aws, self.sims.cloudflare, account, self.aws_tunnels)
        self.aws_gate = Gate(self.aws)
        server = ServerThread(self.aws_gate, name="aws").start()
        self.env.update({"AWS_ENDPOINT_URL_EC2": server.url, "AWS_ACCESS_KEY_ID": self.aws.access_key,
                         "AWS_SECRET_ACCESS_KEY": self.aws.secret_key, "AWS_REGION": self.aws.region,
                         "AWS_EC2_METADATA_DISABLED": "true"})
        return server

    def _start_firewalls(self) -> None:
        """The simulated firewalls of the vendors class: FIREWALL_TUNNELS tunnels of the first account on
        each kind, served over HTTPS with a loopback CA, each holding the key Cloudflare holds."""
        self.firewalls: list[Firewall] = []
        if "vendors" not in self.faults:
            return
        import trustme

        from rotator.sim import fortigate, panos, vyos

        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        paths = {name: self.workdir / f"firewall-{name}.pem" for name in ("ca", "cert", "key")}
        ca.cert_pem.write_to_path(str(paths["ca"]))
        cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
        cert.private_key_pem.write_to_path(str(paths["key"]))
        account = self.accounts[0]
        cf = self.sims.cloudflare
        start = MANUAL_PER_ACCOUNT
        for kind in FIREWALL_KINDS:
            tunnels = self.sims.tunnels_by_account[account][start:start + FIREWALL_TUNNELS]
            start += FIREWALL_TUNNELS
            names = {tid: f"cf-{cf.accounts[account][tid].name}" for tid in tunnels}
            sim: Any = {"panos": panos.PanosSim, "vyos": vyos.VyosSim, "fortigate": fortigate.FortigateSim}[kind](
                peer=cf.psk_of)
            for tid, name in names.items():
                (sim.add_gateway if kind == "panos" else sim.add_tunnel)(name, account, tid, cf.psk_of(account, tid))
            gate = Gate(sim)
            server = ServerThread(gate, name=kind, tls=(str(paths["cert"]), str(paths["key"]))).start()
            credential = sim.token if kind == "fortigate" else sim.api_key
            cred_file = self.workdir / f"{kind}.credential"
            cred_file.write_text(credential)
            cred_key = "token_file" if kind == "fortigate" else "api_key_file"
            block = (f'[[devices]]\nname = "{kind}-fw"\nkind = "{kind}"\naccounts = ["{account}"]\n'
                     f'tunnels = [{", ".join(json.dumps(t) for t in tunnels)}]\ntimeout = {AWS_TIMEOUT}\n'
                     f'verify_timeout = "8s"\nhost = "127.0.0.1"\nport = {server.port}\n'
                     f'{cred_key} = "{cred_file}"\nca_file = "{paths["ca"]}"\npoll_interval = 0.2\n')
            self.firewalls.append(Firewall(kind, sim, gate, server, tunnels, names, credential, block))
    def _start_azure(self) -> ServerThread | None:
        """The ARM fake for the vendors class, over loopback TLS: AZURE_TUNNELS tunnels of the second
        account after the AWS ones, two per gateway, each Connected while its key equals Cloudflare's."""
        self.azure: Any = None
        self.azure_gate: Gate | None = None
        self.azure_tunnels: list[str] = []
        if "vendors" not in self.faults:
            return None
        from rotator.sim.azure import AzureSim, attach, loopback_tls

        self.azure = AzureSim(renegotiate=0.5, operation_seconds=0.5, retry_after="1")
        self.azure_client = self.azure.add_client()
        account = self.accounts[1]
        first = MANUAL_PER_ACCOUNT + AWS_TUNNELS  # after the manual device's and the AWS ones
        self.azure_tunnels = self.sims.tunnels_by_account[account][first:first + AZURE_TUNNELS]
        attach(self.azure, self.sims.cloudflare, account, self.azure_tunnels)
        self.azure_ca, server_file = loopback_tls(str(self.workdir))
        self.azure_gate = Gate(self.azure)
        server = ServerThread(self.azure_gate, tls=(server_file, server_file), name="azure").start()
        self.azure_url = server.url
        self.env.update({"AZURE_TENANT_ID": self.azure_client.tenant, "AZURE_CLIENT_ID": self.azure_client.client_id,
                         "AZURE_CLIENT_SECRET": self.azure_client.secret})
        return server

    def _ends(self) -> list[tuple[str, Any]]:
        """The far ends the monitor checks besides Cloudflare."""
        ends: list[tuple[str, Any]] = [("device sim-device", self.device)] if self.device is not None else []
        if self.manual:
            ends.append(("manual device desk", self.manual_end))
        if self.aws is not None:
            ends.append(("AWS tunnel", AwsEnd(self.aws, self.sims.cloudflare, self.accounts[1])))
        ends.extend((f"{fw.kind} firewall", fw.sim) for fw in self.firewalls)
        if self.azure is not None:
            ends.append(("Azure connection", self.azure))  # its lock, and held(account, tunnel)
        return ends

    def _run_rounds(self) -> None:
        self._setup()
        applies_before = self.sims.cloudflare.request_counts().get("cf.psk_apply", 0)
        self.monitor = Monitor(self.sims, self.wall0, lambda: self.round, ends=self._ends()).start()
        deadline = time.monotonic() + self.seconds
        try:
            while time.monotonic() < deadline - 6 and self.result.rounds < self.max_rounds:
                self.round += 1
                # Each round draws from its own generator, so its schedule does not depend on how the
                # rounds before it went (process timing varies): seed and round number replay it.
                self.rng = random.Random(self.seed * 1_000_003 + self.round)
                self.events = []
                first_before = len(self.monitor.violations)
                self._round(min(self.rng.uniform(5.0, 12.0), max(1.0, deadline - time.monotonic() - 5)))
                self._settle()
                self.result.rounds += 1
                self.say(f"round {self.round} ({', '.join(sorted(self.active))}): {len(self.events)} events; so far "
                         f"{self.monitor.figures.snapshots} checks, {self.monitor.figures.violations} violations, "
                         f"{self.result.strict_failures} strict failures")
                if len(self.monitor.violations) > first_before:
                    for c in self.active:
                        self.result.violating_rounds_by_class[c] = self.result.violating_rounds_by_class.get(c, 0) + 1
                    self.result.violating_rounds.append((self.round, ",".join(sorted(self.active))))
                    if not self.result.trace:
                        self.result.trace = list(self.events)
                if self.stop_at_first and self.monitor.violations:
                    break
        except KeyboardInterrupt:  # Ctrl-C on the long mode: stop, clean up, report what was seen
            self.result.interrupted = True
        finally:
            self.monitor.stop()
            self.result.applies = self.sims.cloudflare.request_counts().get("cf.psk_apply", 0) - applies_before
            self.result.figures = self.monitor.figures
            self.result.violations = self.monitor.violations

    def _setup(self) -> None:
        """A fault-free first rotation (every tunnel managed from now on), then tunnels with odd ids if enabled."""
        self.manual_end = ManualEnd()
        self.manual: list[tuple[str, str]] = []
        if "manual_ack" in self.faults:  # the same device in every config: a key handed to it stays its own
            self.manual = [(a, t) for a in self.accounts for t in self.sims.tunnels_by_account[a][:MANUAL_PER_ACCOUNT]]
        procs = [self._start("rotate", acc, ["rotate", "--account", acc, "--all"], self._config(fault_free=True),
                             fault_free=True) for acc in self.accounts]
        for p in procs:
            self._wait(p, 120)
        self._operator_settles(setup=True)
        self.monitor_setup = Monitor(self.sims, self.wall0, lambda: 0, ends=self._ends())
        bad = self.monitor_setup.check(strict=True, kind="strict")
        if bad:
            raise RuntimeError("the fault-free first rotation did not reach the strict form: " + bad[0].line()
                               + "\n" + self._tail(procs[0]))
        if "oddids" in self.faults:
            a, b = self.accounts
            victim = self.sims.tunnels_by_account[b][0]
            for odd in (f"../{b}/{victim}", f"../_leases/{a}", "sub/dir", ".."):
                self.sims.cloudflare.add_tunnel(a, tunnel_id=odd)
            self._event(f"listed odd tunnel ids in account {a[:8]}: ../<other>/<tunnel>, ../_leases/<self>, sub/dir, ..")

    # -- one round ---------------------------------------------------------------------------------------
    def _round(self, length: float) -> None:
        # Like Jepsen's nemeses: each round stresses a few of the enabled classes, so every class gets
        # rounds where it dominates, and a violation names the few classes that were active.
        per_round = [c for c in self.faults if c != "oddids"]
        self.active = set(self.rng.sample(per_round, self.rng.randint(1, min(4, len(per_round))))) if per_round else set()
        self.active |= {"oddids"} & set(self.faults)  # the odd tunnels, once listed, are in every round
        for c in self.active:
            self.result.rounds_by_class[c] = self.result.rounds_by_class.get(c, 0) + 1
        self.garbage_leases: set[str] = set()
        self._event(f"round of {length:.1f}s from the first rotator request; active: {', '.join(sorted(self.active))}")
        before, began = self._cf_requests(), time.monotonic()
        for _ in range(self.rng.choice((2, 2, 3))):
            self._start_random_rotator()
        # Start-up of a Python process takes from 0.3 s to several seconds on a loaded machine; the
        # round's clock starts when a rotator first reaches Cloudflare, so faults meet real work.
        waited = time.monotonic() + 30
        while self._cf_requests() == before and time.monotonic() < waited and any(p.alive() for p in self.procs):
            self._signal_due()
            time.sleep(0.01)
        start = time.monotonic()
        self.startup = start - began
        self._event(f"first rotator request, {self.startup:.1f}s after the start")
        # The schedule: a fault or a process action every 0.1-0.9 s.
        next_at = start + self.rng.uniform(0.05, 0.5)
        while True:
            now = time.monotonic()
            if now >= start + length:
                break
            self._signal_due()
            if now < next_at:
                time.sleep(min(next_at - now, start + length - now, 0.05))  # pacing the schedule, not synchronising
                continue
            self._reap()
            self._random_action()
            next_at = time.monotonic() + self.rng.uniform(0.1, 0.9)

    def _cf_requests(self) -> int:
        counts = self.sims.cloudflare.request_counts()
        return sum(n for route, n in counts.items() if route != "cf.psk_generate")

    def _random_action(self) -> None:
        actions: list[tuple[float, Callable[[], None]]] = [(1.0, self._maybe_start)]
        f = self.active
        if "latency" in f:
            actions.append((0.8, self._latency))
        if "drop" in f:
            actions.append((0.8, lambda: self._arm_sim("drop")))
        if "late" in f:
            actions.append((0.8, lambda: self._arm_sim("late")))
        if "status" in f:
            actions.append((1.0, lambda: self._arm_sim("status")))
        if "contradict" in f:
            actions.append((1.0, self._contradict))
        if "trickle" in f:
            actions.append((0.5, lambda: self._gate("cf", "cf.psk_apply", "trickle")))
        if "vault_refuse" in f:
            actions.append((0.6, self._vault_refuse))
        if "vault_garbage" in f:
            actions.append((0.7, self._vault_garbage))
        if "cf_garbage" in f:
            actions.append((0.5, lambda: self._gate("cf", self.rng.choice(("cf.psk_apply", "cf.psk_validate",
                                                                            "cf.list")), "html")))
        if "drift" in f:
            actions.append((0.6, self._drift))
        if "daemon" in f:
            actions.append((0.6, self._trigger_daemon))
        if "devices" in f and self.device is not None:
            actions.append((1.0, self._device_fault))
        if "twice" in f:
            actions.append((0.5, self._list_twice))
        if "manual_ack" in f and self.manual:
            actions.append((1.0, self._operator))
        if "vendors" in f and (self.aws is not None or self.firewalls):
            actions.append((1.0, self._vendor_fault))
        if "vendors" in f and self.azure is not None:
            actions.append((0.6, self._azure_fault))
        total = sum(w for w, _ in actions)
        pick = self.rng.uniform(0, total)
        for weight, action in actions:
            pick -= weight
            if pick <= 0:
                action()
                return

    # -- rotators ------------------------------------------------------------------------------------------
    def _config(self, fault_free: bool = False, daemon: bool = False) -> Path:
        short = "short_lease" in self.active and not fault_free
        lease = self.rng.choice((6, 8, 10)) if short else 60
        batch = 50 if fault_free else self.rng.choice((10, 25, 40, 100))
        timeout = 10.0 if fault_free else CF_TIMEOUT
        accounts = "".join(f'[[accounts]]\nid = "{a}"\n' for a in self.accounts)
        manual = ('[[devices]]\nname = "desk"\nkind = "manual"\nack_timeout = "3s"\ntimeout = "1s"\n'
                  f'tunnels = [{", ".join(json.dumps(t) for _, t in self.manual)}]\n' if self.manual else "")
        text = (f'[vault]\ntimeout = {timeout}\n'
                f'[cloudflare]\nbatch_size = {batch}\ntimeout = {timeout}\nretry_attempts = 3\nretry_timeout = 3\n'
                f'rate_limit_ceiling = 2\n'
                f'[rotation]\nlease_ttl = "{lease}s"\n'
                f'[admin]\nlisten = "127.0.0.1:0"\n' + manual
                + (f'[[devices]]\nname = "aws"\nkind = "aws_vpn"\nregion = "{self.aws.region}"\n'
                   f'accounts = ["{self.accounts[1]}"]\ntunnels = [{", ".join(repr(t) for t in self.aws_tunnels)}]\n'
                   f'timeout = {AWS_TIMEOUT}\nverify_timeout = "8s"\nconcurrency = 32\n' if self.aws is not None else "")
                + "".join(fw.block for fw in self.firewalls)
                + (f'[[devices]]\nname = "azure"\nkind = "azure_vpn"\naccounts = ["{self.accounts[1]}"]\n'
                   f'tunnels = [{", ".join(repr(t) for t in self.azure_tunnels)}]\n'
                   f'subscription_id = "{self.azure.subscription_id}"\nresource_group = "{self.azure.resource_group}"\n'
                   f'authority = "{self.azure_url}"\narm_endpoint = "{self.azure_url}"\nca_file = "{self.azure_ca}"\n'
                   f'poll_interval = 0.2\ntimeout = {AZURE_TIMEOUT}\nverify_timeout = "8s"\nconcurrency = 16\n'
                   if self.azure is not None else "")
                + (f'[[devices]]\nname = "sim-device"\nkind = "webhook"\ntunnels = ["*"]\ntimeout = {timeout}\n'
                   f'url = "{self.device_url}"\nsecret_file = "{self.device_secret}"\n' if self.device is not None else "")
                + '[policies.default]\nevery = "10s"\nretry_backoff = "10s"\nretry_backoff_max = "20s"\n'
                # keys both vendor kinds take: letters and digits (Azure), never '0' first (AWS)
                + ('psk_forbidden_first = "0"\n' if self.aws is not None else "") + accounts)
        self._configs += 1
        path = self.workdir / f"rotator-{self._configs}.toml"
        path.write_text(text)
        self._described[path] = f"batch {batch}, lease {lease}s, call timeout {timeout}s"
        return path

    def _start(self, kind: str, account: str | None, args: list[str], cfg: Path, shown: str = "",
               fault_free: bool = False) -> Proc:
        self._n += 1
        name = f"p{self._n}"
        out, err = self.workdir / f"{name}.out", self.workdir / f"{name}.err"
        with out.open("wb") as o, err.open("wb") as e:
            popen = subprocess.Popen([sys.executable, "-m", "rotator", "--config", str(cfg), *args], env=self.env,
                                     stdout=o, stderr=e, stdin=subprocess.DEVNULL)
        proc = Proc(name, kind, account, popen, out, err, time.monotonic(), fault_free=fault_free)
        self.procs.append(proc)
        self.result.processes += 1
        if not fault_free:
            self._doom(proc)
        shown = shown or " ".join(a if len(a) < 32 else a[:8] + "…" for a in args)
        self._event(f"start {name} (pid {popen.pid}): rotator {shown} [{self._described[cfg]}]")
        return proc

    def _start_random_rotator(self) -> None:
        acc = self.rng.choice(self.accounts)
        choices = ["rotate", "rotate", "rotate-some", "reconcile"]
        if "daemon" in self.active and not any(p.kind == "daemon" and p.alive() for p in self.procs):
            choices.append("daemon")
        kind = self.rng.choice(choices)
        if kind == "daemon":
            self._start("daemon", None, ["run"], self._config(daemon=True))
        elif kind == "rotate":
            self._start(kind, acc, ["rotate", "--account", acc, "--all"], self._config())
        elif kind == "rotate-some":
            picks = self.rng.sample(self.sims.tunnels_by_account[acc], self.rng.randint(1, 30))
            self._start(kind, acc, ["rotate", "--account", acc, *[x for t in picks for x in ("--tunnel", t)]],
                        self._config(), shown=f"rotate --account {acc[:8]}… --tunnel (x{len(picks)})")
        else:
            self._start(kind, acc, ["reconcile", "--account", acc], self._config())

    def _maybe_start(self) -> None:
        if sum(1 for p in self.procs if p.alive()) < 3:
            self._start_random_rotator()

    def _doom(self, proc: Proc) -> None:
        """Pick the random moment of its life at which this process will be signalled, if at all."""
        kinds = [k for k in ("kill", "term") if k in self.active]
        if kinds and self.rng.random() < 0.6:
            sig = signal.SIGKILL if self.rng.choice(kinds) == "kill" else signal.SIGTERM
            # Anywhere in its life: start-up (as long as the last round's took) and some seconds of work.
            proc.doom = (proc.started + self.rng.uniform(0.2, self.startup + 6.0), sig)

    def _signal_due(self) -> None:
        now = time.monotonic()
        for proc in self.procs:
            if proc.doom is None or proc.doom[0] > now or not proc.alive():
                continue
            sig = proc.doom[1]
            proc.doom = None
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(sig)
            proc.signalled = sig.name
            self.result.kills += 1
            self._event(f"{sig.name} {proc.name} ({proc.kind}) {now - proc.started:.2f}s after its start")

    def _reap(self) -> None:
        for proc in [p for p in self.procs if not p.alive()]:
            self.procs.remove(proc)
            self.finished.append(proc)
            why = f": {self._tail(proc, 1)[:240]}" if proc.fault_free and proc.popen.returncode else ""
            self._event(f"{proc.name} exited {proc.popen.returncode}{why}")
            self.result.acks_refused += proc.must_refuse is not None and proc.popen.returncode == 1
            if proc.must_refuse is not None and proc.popen.returncode == 0:
                acc, tid, what = proc.must_refuse
                self.monitor.violations.append(Violation(time.time() - self.wall0, self.round, acc, tid, "ack",
                                                         f"{what} was accepted ({proc.name})"))

    def _wait(self, proc: Proc, timeout: float) -> None:
        try:
            proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait(timeout=10)
            self._event(f"{proc.name} did not finish within {timeout:.0f}s: killed")
        self._reap()

    def _kill_all(self) -> None:
        for proc in list(self.procs):
            if proc.alive():
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=10)
        self._reap()

    # -- faults ----------------------------------------------------------------------------------------------
    def _arm_sim(self, kind: str) -> None:
        vault = self.rng.random() < 0.35
        sim = self.sims.vault if vault else self.sims.cloudflare
        route = self.rng.choice(("kv.write", "kv.read", "kv.write") if vault else
                                ("cf.psk_apply", "cf.psk_validate", "cf.list", "cf.psk_apply"))
        count = self.rng.randint(1, 3)
        if kind == "drop":
            sim.drop_next(route, count)
            text = f"drop the next {count} answers of {route}"
        elif kind == "late":
            delay = self.rng.uniform(*LATE_DELAY)
            sim.late_next(route, delay, count)
            text = f"answer the next {count} {route} {delay:.1f}s late"
        else:
            status = self.rng.choice((429, 500, 502, 503))
            retry_after = 1 if status == 429 else None
            sim.fail_next(route, count, status=status, retry_after=retry_after)
            text = f"fail the next {count} {route} with {status}"
        self.result.faults_armed += 1
        self._event(text)

    def _latency(self) -> None:
        if self.rng.random() < 0.3:
            self.sims.cloudflare.set_latency(0.0)
            self.sims.vault.set_latency(0.0)
            self._event("latency off")
            return
        if self.rng.random() < 0.6:
            route = self.rng.choice(("cf.psk_apply", "cf.psk_validate", "cf.list", "*"))
            seconds = self.rng.uniform(0.05, CF_TIMEOUT * 0.6)
            self.sims.cloudflare.set_latency(seconds, route=route)
        else:
            route = self.rng.choice(("kv.write", "kv.read", "*"))
            seconds = self.rng.uniform(0.01, 0.4)
            self.sims.vault.set_latency(seconds, route=route)
        self.result.faults_armed += 1
        self._event(f"latency {seconds:.2f}s on {route}")

    def _gate(self, which: str, route: str, kind: str) -> None:
        gate = self.sims.cf_gate if which == "cf" else self.sims.vault_gate
        seconds = self.rng.uniform(CF_TIMEOUT * 1.5, CF_TIMEOUT * 3) if kind == "trickle" else 0.0
        gate.arm(route, kind, 1, seconds=seconds)
        self.result.faults_armed += 1
        self._event(f"next {route} answer: {kind}" + (f" over {seconds:.1f}s" if seconds else ""))

    def _contradict(self) -> None:
        acc = self.rng.choice(self.accounts)
        picks = self.rng.sample(self.sims.tunnels_by_account[acc], self.rng.randint(1, 5))
        kind = self.rng.choice(("echo_other_key", "both_maps"))
        stage = self.rng.choice(("apply", "apply", "validate"))
        self.sims.cloudflare.contradict(picks, kind=kind, stage=stage)
        self.result.faults_armed += 1
        self._event(f"Cloudflare contradicts itself ({kind}) on {stage} for {len(picks)} tunnels of {acc[:8]}…")

    def _vault_refuse(self) -> None:
        roll = self.rng.random()
        if roll < 0.4:
            self.sims.vault.refuse_writes(403)
            self._event("Vault refuses every write (403)")
        elif roll < 0.6:
            self.sims.vault.seal()
            self._event("Vault sealed")
        else:
            self.sims.vault.refuse_writes(None)
            self.sims.vault.unseal()
            self._event("Vault accepts writes again, unsealed")
        self.result.faults_armed += 1

    def _vault_garbage(self) -> None:
        roll = self.rng.random()
        if roll < 0.3:
            self._gate("vault", "kv.write", "html")  # the write took effect; a login page answers
        elif roll < 0.8:
            variant, count = self.rng.choice(("html", "not_json", "deep", "types")), self.rng.randint(1, 3)
            self.sims.vault.garbage_next("kv.read", variant=variant, count=count)
            self.result.faults_armed += 1
            self._event(f"the next {count} kv.read answered with garbage ({variant})")
        else:
            acc = self.rng.choice(self.accounts)
            self.garbage_leases.add(acc)
            status = self._root_write(f"{PREFIX}/_leases/{acc}", {"holder": "garbage", "expires_at": "soon",
                                                                   "account_id": acc}, must=False)
            self.result.faults_armed += 1
            self._event(f"lease of {acc[:8]}… rewritten with expires_at='soon' ({status})")

    def _drift(self) -> None:
        acc = self.rng.choice(self.accounts)
        picks = self.rng.sample(self.sims.tunnels_by_account[acc], self.rng.randint(1, 3))
        for tid in picks:
            r = self.http.post(f"{self.sims.cloudflare_base_url}/accounts/{acc}/magic/ipsec_tunnels/{tid}/psk_generate",
                               headers={"Authorization": f"Bearer {self.sims.cloudflare_api_token}"})
            ok = r.status_code == 200
            self._event(f"out-of-band psk_generate on {tid[:8]}… ({'changed' if ok else r.status_code})")
        self.result.faults_armed += 1

    def _trigger_daemon(self) -> None:
        daemon = next((p for p in self.procs if p.kind == "daemon" and p.alive()), None)
        if daemon is None:
            self._maybe_start()
            return
        if daemon.admin_url is None:
            daemon.admin_url = _admin_url(daemon.out)
        if daemon.admin_url is None:
            return
        acc = self.rng.choice(self.accounts)
        try:
            r = self.http.post(daemon.admin_url + "/v1/rotations", json={"account": acc, "all": True},
                               headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=2)
            self._event(f"on-demand rotation of {acc[:8]}… through {daemon.name}'s admin API: {r.status_code}")
        except httpx.HTTPError as exc:
            self._event(f"on-demand rotation through {daemon.name}: {type(exc).__name__}")

    def _device_fault(self) -> None:
        acc = self.rng.choice(self.accounts)
        picks = self.rng.sample(self.sims.tunnels_by_account[acc], self.rng.randint(1, 5))
        roll, action = self.rng.random(), self.rng.choice(("deliver", "verify", "rollback"))
        if roll < 0.25:
            self.device.refuse(picks, actions=(action,))
            text = f"device refuses {action} for {len(picks)} tunnels of {acc[:8]}…"
        elif roll < 0.45:
            self.device.fail_verify(picks)
            text = f"device fails verification of {len(picks)} tunnels of {acc[:8]}…"
        elif roll < 0.6:
            seconds = self.rng.uniform(0.2, CF_TIMEOUT * 0.6)  # below the call deadline, as latency
            self.device.hang_next(seconds, action=action)
            text = f"device hangs {seconds:.1f}s on the next {action}, then acts"
        elif roll < 0.75:
            self.device.answer_garbage(action=action)
            text = f"device acts on the next {action} and answers garbage"
        elif roll < 0.9:
            delay = self.rng.uniform(*LATE_DELAY)
            self.device.late_next(f"device.{action}", delay)
            text = f"device acts on the next {action} and answers {delay:.1f}s late"
        else:
            self.device.drop_next(f"device.{action}")
            text = f"device acts on the next {action} and drops the connection"
        self.result.faults_armed += 1
        self._event(text)

    def _list_twice(self) -> None:
        acc = self.rng.choice(self.accounts)
        victim = self.rng.choice(self.sims.tunnels_by_account[acc])
        name = self.rng.choice(("dup-", "other-site-", "tun")) + victim[:6]
        self.sims.cloudflare.list_twice(acc, victim, name)
        self.result.faults_armed += 1
        self._event(f"Cloudflare lists {victim[:8]}… of {acc[:8]}… twice (second name {name!r})")

    # -- the operator of the manual device (manual_ack) -------------------------------------------------------
    def _read_and_type(self, acc: str, tid: str, typing: str | None) -> dict[str, Any]:
        """Read the record and, in the same instant (the monitor's locks), type ``psk`` or ``pending_psk``
        into the manual device: an operator types only what Vault holds now."""
        with self.manual_end.lock, self.sims.vault.lock:
            data = self.sims.vault.read_data(f"{PREFIX}/{acc}/{tid}") or {}
            if typing is not None and data.get(typing):
                self.manual_end.keys[(acc, tid)] = data[typing]
            return data

    def _ack(self, acc: str, tids: list[str], extra: list[str], must_refuse: str | None = None,
             fault_free: bool = False) -> Proc:
        args = ["ack", "--account", acc, *[x for t in tids for x in ("--tunnel", t)], *extra]
        proc = self._start("ack", acc, args, self._config(fault_free=fault_free), fault_free=fault_free,
                           shown=f"ack --account {acc[:8]}… --tunnel (x{len(tids)}) {' '.join(extra)}")
        self.result.acks += 1
        if must_refuse:
            proc.must_refuse = (acc, tids[0], must_refuse)
        return proc

    def _operator(self) -> None:
        """One move of the operator: right, late, forgetful, or wrong in ways the rotator must refuse."""
        acc, tid = self.rng.choice(self.manual)
        roll = self.rng.random()
        data = self._read_and_type(acc, tid, None)
        state, rotation = data.get("state"), str(data.get("rotation_id"))
        typed = self.manual_end.held(acc, tid)
        if state == "pending" and WAITING_NOTE in str(data.get("last_error")):
            if roll < 0.4:
                self._read_and_type(acc, tid, "pending_psk")
                self._ack(acc, [tid], ["--holds", "new", "--rotation", rotation])
            elif roll < 0.6:
                self._read_and_type(acc, tid, "pending_psk")
                self._event(f"the operator types the key of {tid[:8]}… into desk and forgets to acknowledge it")
            elif roll < 0.75 and typed is not None and typed == data.get("psk"):
                self._ack(acc, [tid], ["--holds", "previous", "--rotation", rotation])  # true, but not awaited
            elif roll < 0.9:
                self._ack(acc, [tid], ["--holds", "new", "--rotation", "20260101T000000Z-000000"],
                          must_refuse="an ack for a rotation the record never had")
            else:
                self._ack(acc, [tid], [], must_refuse="an ack without --holds")
        elif state == "rolling_back":
            if roll < 0.35 and typed is not None and typed == data.get("pending_psk"):
                self._ack(acc, [tid], ["--holds", "new", "--rotation", rotation],
                          must_refuse="--holds new while the key is withdrawn (the key would be lost)")
            elif roll < 0.85:
                self._read_and_type(acc, tid, "psk")
                self._ack(acc, [tid], ["--holds", "previous", "--rotation", rotation])
            else:
                self._ack(acc, [tid], [], must_refuse="an ack without --holds")
        self.result.faults_armed += 1

    def _operator_settles(self, setup: bool = False) -> None:
        """At the end of a round (and after the setup): the operator finishes every manual tunnel, right:
        the pending key typed in and acknowledged, or the previous key back and acknowledged."""
        for acc in self.accounts:
            groups: dict[str, list[str]] = {"new": [], "previous": []}
            for a, tid in self.manual:
                if a != acc:
                    continue
                data = self._read_and_type(acc, tid, None)
                if data.get("state") == "rolling_back":
                    self._read_and_type(acc, tid, "psk")
                    groups["previous"].append(tid)
                elif data.get("pending_psk"):
                    self._read_and_type(acc, tid, "pending_psk")
                    groups["new"].append(tid)
                elif setup and data.get("psk"):
                    self._read_and_type(acc, tid, "psk")  # the device was set up with what Vault holds
            for holds, tids in groups.items():
                if tids:
                    self._wait(self._ack(acc, tids, ["--holds", holds], fault_free=True), 90)
    def _vendor_fault(self) -> None:
        if self.firewalls and (self.aws is None or self.rng.random() < 0.5):
            self._firewall_fault()
            return
        picks = self.rng.sample(self.aws_tunnels, self.rng.randint(1, 4))
        roll, action = self.rng.random(), self.rng.choice(("ModifyVpnTunnelOptions", "DescribeVpnConnections"))
        if roll < 0.2:
            self.aws.refuse_next("ModifyVpnTunnelOptions", "InvalidParameterValue", "refused by the campaign",
                                 count=self.rng.randint(1, 3))
            text = "AWS refuses the next modifications (InvalidParameterValue)"
        elif roll < 0.35:
            self.aws.throttle_next(action, count=self.rng.randint(1, 3))
            text = f"AWS throttles the next {action} (RequestLimitExceeded)"
        elif roll < 0.5:
            self.aws.server_error_next(action)
            text = f"AWS answers the next {action} with 500 InternalError"
        elif roll < 0.75:
            text = self._lost_answer(self.aws, "ec2.ModifyVpnTunnelOptions", "AWS", "modification", roll < 0.65)
        elif roll < 0.9:
            with self.sims.cloudflare.lock:
                ips = [self.sims.cloudflare.accounts[self.accounts[1]][t].customer_endpoint for t in picks]
            self.aws.hold_down([ip for ip in ips if ip])
            text = f"{len(picks)} AWS tunnels never come UP this round"
        else:
            self.aws.deny("DescribeVpnConnections")
            text = "AWS denies DescribeVpnConnections (UnauthorizedOperation) this round"
        self.result.faults_armed += 1
        self._event(text)

    def _firewall_fault(self) -> None:
        fw = self.rng.choice(self.firewalls)
        picks = self.rng.sample(fw.tunnels, self.rng.randint(1, 3))
        routes = {"panos": ("panos.config.set", "panos.commit", "panos.op.jobs", "panos.op.clear", "panos.op.sa"),
                  "vyos": ("vyos.retrieve", "vyos.configure", "vyos.config-file", "vyos.reset", "vyos.show"),
                  "fortigate": ("fortigate.get", "fortigate.put", "fortigate.down", "fortigate.up",
                                "fortigate.monitor")}[fw.kind]
        route, roll = self.rng.choice(routes), self.rng.random()
        if roll < 0.2:
            for tid in picks:
                fw.sim.refuse_key(fw.names[tid], "{key} is refused by the campaign" if fw.kind == "fortigate"
                                  else "is refused by the campaign")
            text = f"{fw.kind} refuses the next key of {len(picks)} tunnels"
        elif roll < 0.35 and fw.kind != "fortigate":
            fw.sim.fail_commit("Validation Error: pre-shared-key {key} rejected by the campaign")
            text = f"{fw.kind}'s next commit fails, quoting a key"
        elif roll < 0.5:
            fw.sim.never_reauth([fw.names[tid] for tid in picks])
            text = f"{len(picks)} {fw.kind} tunnels never re-authenticate this round"
        elif roll < 0.65:
            fw.sim.fail_next(route, status=self.rng.choice((500, 502, 503)))
            text = f"{fw.kind} answers the next {route} with a 5xx"
        elif roll < 0.8:
            delay = self.rng.uniform(*LATE_DELAY)
            fw.sim.late_next(route, delay)
            text = f"{fw.kind} acts on the next {route} and answers {delay:.1f}s late"
        elif roll < 0.9:
            fw.sim.drop_next(route)
            text = f"{fw.kind} acts on the next {route} and drops the connection"
        else:
            fw.sim.garbage_next(route, variant="html")
            text = f"{fw.kind} answers the next {route} with a login page"
        self.result.faults_armed += 1
        self._event(text)

    def _azure_fault(self) -> None:
        picks = self.rng.sample(self.azure_tunnels, self.rng.randint(1, 3))
        names = [n for n in (self._azure_connection(t) for t in picks) if n]
        roll = self.rng.random()
        if roll < 0.15:
            self.azure.deny(self.azure_client.client_id, "Microsoft.Network/connections/sharedKey/write")
            text = "Azure denies sharedKey/write (AuthorizationFailed) this round"
        elif roll < 0.3:
            route = self.rng.choice(("azure.sharedkey_set", "azure.list", "azure.sharedkey_get", "azure.reset"))
            self.azure.fail_next(route, count=self.rng.randint(1, 4), status=self.rng.choice((429, 500, 503)))
            text = f"Azure answers the next {route} with an error status"
        elif roll < 0.6:
            text = self._lost_answer(self.azure, "azure.sharedkey_set", "Azure", "set-shared-key", roll < 0.45)
        elif roll < 0.72:
            self.azure.fail_operations(count=self.rng.randint(1, 3))
            text = "the next Azure updates end Failed"
        elif roll < 0.84:
            self.azure.hang_operations(count=self.rng.randint(1, 2))
            text = "the next Azure updates never finish this round"
        else:
            self.azure.fail_negotiation(names)
            text = f"{len(names)} Azure connections never come up this round"
        self.result.faults_armed += 1
        self._event(text)

    def _lost_answer(self, sim: Any, route: str, vendor: str, what: str, late: bool) -> str:
        """A vendor write that takes effect, its answer late (past the call deadline) or dropped."""
        if late:
            delay = self.rng.uniform(*LATE_DELAY)
            sim.late_next(route, delay)
            return f"{vendor} acts on the next {what} and answers {delay:.1f}s late"
        sim.drop_next(route)
        return f"{vendor} acts on the next {what} and drops the connection"

    def _azure_connection(self, tunnel: str) -> str | None:
        return next((c.name for c in list(self.azure.connections.values()) if c.tunnel == (self.accounts[1], tunnel)),
                    None)

    def _lift_faults(self) -> None:
        self.sims.cloudflare.clear_listed_twice()
        for sim in (self.sims.cloudflare, self.sims.vault):
            sim.clear_faults()
        self.sims.cloudflare.clear_refusals()
        self.sims.cloudflare.clear_contradictions()
        self.sims.vault.refuse_writes(None)
        self.sims.vault.unseal()
        self.sims.cf_gate.clear()
        self.sims.vault_gate.clear()
        if self.device is not None:
            self.device.clear()
        if self.aws is not None:
            self.aws.clear()
        for fw in self.firewalls:
            fw.sim.clear()
            fw.gate.clear()
        if self.azure is not None:
            self.azure.clear()
            self.azure.restore(self.azure_client.client_id)
            self.azure.finish_operations()  # a hung update ends (Azure caught up) before the reconcile

    # -- end of round: quiesce, fault-free reconcile, strict form -----------------------------------------
    def _settle(self) -> None:
        self._kill_all()
        self._lift_faults()
        self._event("every rotator killed, faults lifted")
        deadline = time.monotonic() + 30
        while self.sims.cf_gate.inflight or self.sims.vault_gate.inflight or (
                self.device_gate is not None and self.device_gate.inflight) or (
                self.aws_gate is not None and (self.aws_gate.inflight or self._aws_modifying())) or (
                self.azure_gate is not None and (self.azure_gate.inflight or self.azure.updating())) or any(
                fw.gate.inflight for fw in self.firewalls):
            if time.monotonic() > deadline:
                raise RuntimeError("requests still in flight at the simulators 30s after every rotator was killed")
            time.sleep(0.01)
        # Every holder is dead and nothing is in flight. With "takeover" the reconcile must take over
        # the dead holders' leases itself; otherwise (and always for a garbage lease) the records are
        # removed, as an operator would with `vault kv metadata delete`.
        for acc in self.accounts:
            if "takeover" in self.active and acc not in self.garbage_leases:
                continue
            r = self.http.delete(f"{self.sims.vault_addr}/v1/secret/metadata/{PREFIX}/_leases/{acc}",
                                 headers={"X-Vault-Token": self.sims.vault.root_token})
            if r.status_code not in (200, 204):
                raise RuntimeError(f"the campaign could not remove the lease of {acc}: {r.status_code}")
        procs = [self._start("reconcile", acc, ["reconcile", "--account", acc], self._config(fault_free=True),
                             fault_free=True) for acc in self.accounts]
        for p in procs:
            self._wait(p, 90)
        self._operator_settles()
        bad = self.monitor.check(strict=True, kind="strict")
        if bad:
            self.result.strict_failures += len(bad)
            self.monitor.violations.extend(bad)
            self._event(f"strict form NOT reached: {len(bad)} tunnels; first: {bad[0].detail}")
            self._repair(bad)
        else:
            self._event("fault-free reconcile reached the strict form")

    def _aws_modifying(self) -> bool:
        """A replacement AWS still runs: the fault-free reconcile starts once AWS accepts modifications."""
        return any(self.aws.state_of(c) == "modifying" for c in list(self.aws.connections))

    def _repair(self, bad: list[Violation]) -> None:
        """Make Vault agree with Cloudflare again so the next round starts from a sound state."""
        for v in bad:
            key = self.sims.cloudflare.psk_of(v.account, v.tunnel)
            path = f"{PREFIX}/{v.account}/{v.tunnel}"
            data = self.sims.vault.read_data(path) or {}
            data.pop("pending_psk", None)
            data.update({"psk": key, "state": "active", "last_error": "repaired by the campaign"})
            self._root_write(path, data)

    def _root_write(self, path: str, data: dict[str, Any], must: bool = True) -> int:
        """Write as an operator would (root token); in a round it may meet the faults armed there."""
        status = 0
        for _ in range(5 if must else 1):
            try:
                status = self.http.post(f"{self.sims.vault_addr}/v1/secret/data/{path}", json={"data": data},
                                        headers={"X-Vault-Token": self.sims.vault.root_token}).status_code
            except httpx.HTTPError:
                status = 0
            if status == 200:
                return status
        if must:
            raise RuntimeError(f"the campaign could not write {path} to the Vault simulator: {status}")
        return status

    # -- bookkeeping -------------------------------------------------------------------------------------------
    def _event(self, text: str) -> None:
        self.events.append(Event(time.time() - self.wall0, self.round, text))

    def _tail(self, proc: Proc, lines: int = 5) -> str:
        text = proc.err.read_text(errors="replace") if proc.err.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def _scan_outputs(self) -> None:
        """No key or token in any output (docs/design.md section 8); no traceback for a known failure."""
        from tests import helpers

        keys = {h.psk for h in self.sims.cloudflare.applied_history()}
        mount = self.sims.vault.namespaces.get("", {}).get("secret")
        for entry in (mount.keys.values() if mount else ()):
            for data in entry.data.values():
                keys.update(v for k, v in (data or {}).items() if k.endswith("psk") and isinstance(v, str))
        tokens = {self.sims.vault_token, self.sims.vault.root_token, self.sims.cloudflare_api_token, ADMIN_TOKEN}
        if self.aws is not None:
            tokens.add(self.aws.secret_key)
        tokens.update(fw.credential for fw in self.firewalls)
        if self.azure is not None:
            tokens.update(self.azure.scan_secrets())  # the client secret, every token, every key it held
        texts = []
        for proc in self.finished:
            for path in (proc.out, proc.err):
                text = path.read_text(errors="replace") if path.exists() else ""
                texts.append(text)
                if "Traceback" in text:
                    last = [ln for ln in text.splitlines() if ln.strip()][-1:]
                    self.result.tracebacks.append(f"{proc.name} ({proc.kind}): {last[0][:200] if last else ''}")
        self.result.leaks = len(find_secrets(texts, keys | tokens))
        # The suite's own end-of-session scan gets the outputs, the tokens and the keys in force now
        # (every key of the campaign would make its substring search slow; ours above sees them all).
        helpers.OUTPUTS.extend(texts)
        helpers.SECRETS.update(tokens)
        for account in self.accounts:
            helpers.SECRETS.update(k for k in self.sims.cloudflare.psks(account).values() if k)


@dataclass
class Firewall:
    """One simulated firewall of the vendors class; ``sim`` is a far end for the monitor (``lock``, ``held``)."""

    kind: str
    sim: Any
    gate: Gate
    server: ServerThread
    tunnels: list[str]
    names: dict[str, str]  # tunnel id -> the firewall's name for it
    credential: str
    block: str  # its [[devices]] table


@dataclass
class AwsEnd:
    """The EC2 fake as a far end for the monitor: ``lock`` and ``held(account, tunnel)``, the key of the
    AWS tunnel whose outside address is the Cloudflare tunnel's customer endpoint (None: not on AWS).
    The monitor holds this lock, then Cloudflare's (RLocks: held() takes them again in the same thread)."""

    aws: Any
    cloudflare: Any
    account: str

    @property
    def lock(self) -> Any:
        return self.aws.lock

    def held(self, account: str, tunnel: str) -> str | None:
        if account != self.account:
            return None
        with self.cloudflare.lock:
            t = self.cloudflare.accounts.get(account, {}).get(tunnel)
            ip = t.customer_endpoint if t is not None else None
        try:
            return str(self.aws.key_of(ip)) if ip else None
        except KeyError:
            return None


def find_secrets(texts: list[str], secrets: set[str]) -> set[str]:
    """The secrets that occur in any text, in time linear in the texts (not texts x secrets):
    every run of key-like characters is cut into windows of each secret length and looked up."""
    by_length: dict[int, set[str]] = {}
    for secret in secrets:
        if secret and len(secret) >= 16:
            by_length.setdefault(len(secret), set()).add(secret)
    found: set[str] = set()
    for text in texts:
        for run in TOKEN_RUN.findall(text):
            for length, group in by_length.items():
                found.update(run[i:i + length] for i in range(len(run) - length + 1) if run[i:i + length] in group)
    return found


def devices_wired() -> bool:
    """Whether this code base's configuration has ``[[devices]]`` (docs/design.md section 9)."""
    from rotator import config

    return any(f.name == "devices" for f in dataclasses.fields(config.Settings))


def _admin_url(out: Path) -> str | None:
    with contextlib.suppress(OSError):
        for line in out.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "daemon_started" and event.get("admin"):
                    return str(event["admin"])
    return None


def from_env(default_seconds: float, default_faults: tuple[str, ...] = DEFAULT_FAULTS) -> dict[str, Any]:
    """Campaign arguments from ROTATOR_CAMPAIGN_* (the seed is drawn and printed when not given)."""
    seed_text = os.environ.get("ROTATOR_CAMPAIGN_SEED")
    return {
        "seed": int(seed_text) if seed_text else random.SystemRandom().randrange(1, 1 << 31),
        "seconds": float(os.environ.get("ROTATOR_CAMPAIGN_SECONDS", default_seconds)),
        "faults": parse_faults(os.environ.get("ROTATOR_CAMPAIGN_FAULTS"), default_faults),
        "tunnels": int(os.environ.get("ROTATOR_CAMPAIGN_TUNNELS", 200)),
        "first_round": int(os.environ.get("ROTATOR_CAMPAIGN_ROUND", 1)),
    }

