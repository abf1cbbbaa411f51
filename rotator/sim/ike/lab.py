"""The IKE lab: two strongSwan charons in two network namespaces joined by a veth pair.

``edge`` plays Cloudflare (the responder, one connection and one PSK per tunnel), ``site`` plays the
customer's router (the initiator). Each tunnel has its own IKE identities, its own PSK on each side
and a pair of inner addresses on ``lo`` (the traffic selectors; libipsec needs them to differ from
the IKE addresses). Addresses such as 10.99.0.0/30 exist only inside the namespaces.

The site's names follow the ``strongswan`` device's defaults, so the device drives it as it is:
IKE and CHILD SA named after the tunnel name, secret id ``psk-rotator-{tunnel_id}``, owner the
site's identity ``{tunnel_id}.site.lab``.

Torn down on every exit path: ``with Lab(...)``, ``atexit``, and a sweep at the next start of any
lab whose owning process died (charons killed by pid, namespaces deleted).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import vici.exception

from rotator.sim.ike import netns
from rotator.sim.ike.charon import CHARON, PLUGIN_DIR, Charon, Event, kill_pid
from rotator.sim.ike.netns import LabError
from rotator.sim.ike.probe import TrafficProbe

EDGE_ADDR = "10.99.0.1"
SITE_ADDR = "10.99.0.2"
STATE_DIR = "/run/psk-rotator-ike"
MAX_TUNNELS = 250 * 200
SECRET_ID = "psk-rotator-{tunnel_id}"
SITE_ID = "{tunnel_id}.site.lab"
EDGE_ID = "edge.lab"
INITIATE_WINDOW = 32
REAUTH_FAILURES = ("AUTHENTICATION_FAILED", "MAC mismatched", "no shared key found")


def unavailable() -> str | None:
    """Why the lab cannot run here (one line), or None when it can."""
    if os.geteuid() != 0:
        return "the IKE lab needs root (network namespaces, /dev/net/tun)"
    missing = [p for p in (CHARON, f"{PLUGIN_DIR}/libstrongswan-kernel-libipsec.so",
                           f"{PLUGIN_DIR}/libstrongswan-vici.so", "/dev/net/tun") if not os.path.exists(p)]
    if missing:
        return (f"strongSwan is missing ({', '.join(missing)}): apt-get install strongswan-charon "
                "strongswan-swanctl libstrongswan-standard-plugins libcharon-extra-plugins")
    if shutil.which("ip") is None:
        return "iproute2's ip is missing: apt-get install iproute2"
    return None


@dataclass(frozen=True, slots=True)
class LabTunnel:
    tunnel_id: str
    name: str
    index: int

    @property
    def site_id(self) -> str:
        return SITE_ID.format(tunnel_id=self.tunnel_id)

    @property
    def secret_id(self) -> str:
        return SECRET_ID.format(tunnel_id=self.tunnel_id)

    @property
    def site_inner(self) -> str:
        return f"10.200.{self.index // 250}.{self.index % 250 + 1}"

    @property
    def edge_inner(self) -> str:
        return f"10.201.{self.index // 250}.{self.index % 250 + 1}"


@dataclass(frozen=True, slots=True)
class Reauth:
    """The outcome of one forced re-authentication from the site."""

    ok: bool
    seconds: float
    detail: str


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _conn(t: LabTunnel, *, edge: bool) -> dict[str, Any]:
    me, peer = (EDGE_ADDR, SITE_ADDR) if edge else (SITE_ADDR, EDGE_ADDR)
    my_id, peer_id = (EDGE_ID, t.site_id) if edge else (t.site_id, EDGE_ID)
    my_ts, peer_ts = (t.edge_inner, t.site_inner) if edge else (t.site_inner, t.edge_inner)
    return {t.name: {
        "version": "2", "local_addrs": [me], "remote_addrs": [peer], "encap": "yes",
        "rekey_time": "0", "reauth_time": "0", "dpd_delay": "0", "keyingtries": "1",
        "unique": "no", "mobike": "no",
        "local-1": {"auth": "psk", "id": my_id}, "remote-1": {"auth": "psk", "id": peer_id},
        "children": {t.name: {"local_ts": [f"{my_ts}/32"], "remote_ts": [f"{peer_ts}/32"], "mode": "tunnel",
                              "rekey_time": "0", "start_action": "none", "close_action": "none",
                              "dpd_action": "clear"}},
    }}


@dataclass
class Lab:
    """Two charons in two namespaces. ``with Lab() as lab: lab.add_tunnels(...); lab.up()``."""

    threads: int = 16
    make_before_break: bool = True  # the site's reauthentication keeps the old SA until the new one is up
    nonce: str = field(default_factory=lambda: secrets.token_hex(3))
    tunnels: dict[str, LabTunnel] = field(default_factory=dict, init=False)
    events: list[Event] = field(default_factory=list, init=False, repr=False)
    workdir: str = field(default="", init=False)
    edge: Charon = field(init=False)
    site: Charon = field(init=False)
    _cond: threading.Condition = field(default_factory=threading.Condition, init=False)
    _started: bool = field(default=False, init=False)
    _by_name: dict[str, LabTunnel] = field(default_factory=dict, init=False)
    # The keys the lab itself loaded, per side (the strongswan device loads the site's without us).
    _keys: dict[tuple[str, str], str] = field(default_factory=dict, init=False, repr=False)
    _edge_children: dict[str, int] = field(default_factory=dict, init=False)  # name -> CHILD_SAs installed
    _edge_timeline: dict[str, list[tuple[float, float]]] = field(default_factory=dict, init=False)

    @property
    def edge_ns(self) -> str:
        return f"psk-lab-{self.nonce}-edge"

    @property
    def site_ns(self) -> str:
        return f"psk-lab-{self.nonce}-site"

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> Lab:
        reason = unavailable()
        if reason:
            raise LabError(reason)
        sweep_stale()
        self.workdir = tempfile.mkdtemp(prefix=f"psk-lab-{self.nonce}-")
        os.chmod(self.workdir, 0o700)
        self._started = True
        atexit.register(self.stop)
        try:
            self._write_state()
            self._network()
            self.edge = Charon("edge", self.edge_ns, self.workdir, self.threads, self._on_event).start()
            self.site = Charon("site", self.site_ns, self.workdir, self.threads, self._on_event,
                               make_before_break=self.make_before_break).start()
            self._write_state()
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _network(self) -> None:
        veth = f"pk{self.nonce}"
        for ns in (self.edge_ns, self.site_ns):
            netns.create(ns)
        netns.run("ip", "link", "add", f"{veth}e", "netns", self.edge_ns, "type", "veth", "peer", "name",
                  f"{veth}s", "netns", self.site_ns)
        for ns, dev, addr in ((self.edge_ns, f"{veth}e", EDGE_ADDR), (self.site_ns, f"{veth}s", SITE_ADDR)):
            netns.run("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            netns.run("ip", "-n", ns, "link", "set", dev, "up")

    def stop(self) -> None:
        """Kill both charons by pid, delete the namespaces and the work directory. Idempotent."""
        if not self._started:
            return
        self._started = False
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        for side in ("site", "edge"):
            charon = getattr(self, side, None)
            if charon is not None:
                charon.stop()
        for ns in (self.edge_ns, self.site_ns):
            for pid in netns.pids_in(ns):  # anything else left in our namespaces (none expected)
                kill_pid(pid)
            netns.delete(ns)
        with contextlib.suppress(OSError):
            os.remove(self._state_path())
        if self.workdir and not os.environ.get("PSK_LAB_KEEP"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _state_path(self) -> str:
        return os.path.join(STATE_DIR, f"{self.nonce}.json")

    def _write_state(self) -> None:
        os.makedirs(STATE_DIR, mode=0o700, exist_ok=True)
        pids = [c.pid for c in (getattr(self, "edge", None), getattr(self, "site", None)) if c and c.pid]
        state = {"owner": os.getpid(), "namespaces": [self.edge_ns, self.site_ns], "pids": pids,
                 "workdir": self.workdir}
        tmp = self._state_path() + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(state, fh)
        os.replace(tmp, self._state_path())

    # -- tunnels ---------------------------------------------------------------------------------

    def add_tunnels(self, tunnels: Iterable[tuple[str, str]], psks: Mapping[str, str] | None = None, *,
                    edge_psks: Mapping[str, str] | None = None,
                    site_psks: Mapping[str, str] | None = None) -> list[LabTunnel]:
        """Load (tunnel_id, name) pairs on both sides with their inner addresses and keys (``psks``
        for both sides, or per side). Names must be unique; the result is in the order given."""
        added = []
        for tunnel_id, name in tunnels:
            if tunnel_id in self.tunnels or name in self._by_name:
                raise LabError(f"tunnel {name} ({tunnel_id}) is already in the lab")
            if len(self.tunnels) >= MAX_TUNNELS:
                raise LabError(f"the lab holds at most {MAX_TUNNELS} tunnels")
            t = LabTunnel(tunnel_id, name, len(self.tunnels))
            self.tunnels[tunnel_id] = t
            self._by_name[name] = t
            added.append(t)
        self._addresses(added)
        edge_psks = {**(psks or {}), **(edge_psks or {})}
        site_psks = {**(psks or {}), **(site_psks or {})}
        for t in added:
            self.edge.session().load_conn(_conn(t, edge=True))
            self.site.session().load_conn(_conn(t, edge=False))
            if t.tunnel_id in edge_psks:
                self.load_edge_psk(t.tunnel_id, edge_psks[t.tunnel_id])
            if t.tunnel_id in site_psks:
                self.load_site_psk(t.tunnel_id, site_psks[t.tunnel_id])
        return added

    def _addresses(self, tunnels: Sequence[LabTunnel]) -> None:
        for ns, attr in ((self.edge_ns, "edge_inner"), (self.site_ns, "site_inner")):
            path = os.path.join(self.workdir, f"addr-{ns}")
            with open(path, "w", encoding="utf-8") as fh:
                fh.writelines(f"addr add {getattr(t, attr)}/32 dev lo\n" for t in tunnels)
            netns.run("ip", "-n", ns, "-batch", path, timeout=60)

    def tunnel(self, key: str) -> LabTunnel:
        """A tunnel by id or name."""
        t = self.tunnels.get(key) or self._by_name.get(key)
        if t is None:
            raise LabError(f"no tunnel {key!r} in the lab")
        return t

    def _load_psk(self, charon: Charon, t: LabTunnel, psk: str) -> None:
        charon.session().load_shared({"id": t.secret_id, "type": "IKE", "data": psk, "owners": [t.site_id]})
        self._keys[(charon.side, t.tunnel_id)] = psk

    def key_loaded(self, side: str, tunnel: str) -> str | None:
        """The last key the lab loaded on ``side`` for the tunnel (the edge's is Cloudflare's)."""
        return self._keys.get((side, self.tunnel(tunnel).tunnel_id))

    def load_edge_psk(self, tunnel: str, psk: str) -> None:
        """What Cloudflare's apply does for real: the edge holds ``psk`` for the tunnel from now on."""
        self._load_psk(self.edge, self.tunnel(tunnel), psk)

    def load_site_psk(self, tunnel: str, psk: str) -> None:
        self._load_psk(self.site, self.tunnel(tunnel), psk)

    def edge_hook(self, account_id: str, tunnel_id: str, psk: str) -> None:
        """The Cloudflare simulator's apply hook: tunnels not in the lab are ignored."""
        if tunnel_id in self.tunnels:
            self.load_edge_psk(tunnel_id, psk)

    # -- SAs -------------------------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        with self._cond:
            self.events.append(event)
            if event.side == "edge" and event.kind == "child-updown":
                count = self._edge_children.get(event.name, 0) + (1 if event.up else -1)
                self._edge_children[event.name] = max(0, count)
                self._edge_timeline.setdefault(event.name, []).append((event.wall, 1.0 if count > 0 else 0.0))
            self._cond.notify_all()

    def health_source(self, account_id: str, tunnel_name: str, since: float, until: float) -> list[float]:
        """The Cloudflare simulator's GraphQL health samples for a tunnel over [since, until) (UNIX
        times), from the edge's real CHILD_SA events: 1 while a CHILD_SA is installed, else 0. The
        state at ``since`` counts as a sample, then every change inside the window."""
        if tunnel_name not in self._by_name:
            return []
        with self._cond:
            timeline = list(self._edge_timeline.get(tunnel_name, []))
        at_start = next((v for t, v in reversed(timeline) if t < since), 0.0)
        return [at_start, *(v for t, v in timeline if since <= t < until)]

    def up(self, tunnels: Iterable[str] | None = None, timeout: float = 20.0) -> dict[str, float]:
        """Initiate every tunnel from the site (asynchronously, ``INITIATE_WINDOW`` at a time: a larger
        burst overflows the peer's UDP receive buffer and costs retransmissions) and wait until each
        has its CHILD_SA up on both sides. Returns seconds to establish per tunnel id; LabError past
        ``timeout``."""
        todo = [self.tunnel(k) for k in (tunnels if tunnels is not None else list(self.tunnels))]
        deadline = time.monotonic() + timeout
        out: dict[str, float] = {}
        sess = self.site.session()
        for i in range(0, len(todo), INITIATE_WINDOW):
            chunk = todo[i:i + INITIATE_WINDOW]
            mark = self.event_mark()
            started: dict[str, float] = {}
            for t in chunk:
                started[t.name] = time.monotonic()
                for _ in sess.initiate({"child": t.name, "ike": t.name, "timeout": "-1", "init-limits": "no"}):
                    pass
            done = self._wait_children_up({t.name for t in chunk}, mark, deadline, timeout)
            out.update({self._by_name[name].tunnel_id: at - started[name] for name, at in done.items()})
        return out

    def _wait_children_up(self, names: set[str], mark: int, deadline: float, timeout: float) -> dict[str, float]:
        """Names -> time both sides reported the CHILD_SA up (events after index ``mark``)."""
        seen: dict[tuple[str, str], float] = {}
        with self._cond:
            while True:
                for e in self.events[mark:]:
                    if e.kind == "child-updown" and e.up and e.name in names:
                        seen.setdefault((e.side, e.name), e.at)
                mark = len(self.events)
                done = {n: max(seen[("edge", n)], seen[("site", n)]) for n in names
                        if ("edge", n) in seen and ("site", n) in seen}
                if len(done) == len(names):
                    return done
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(names - set(done))
                    raise LabError(f"{len(missing)} of {len(names)} tunnels not up within {timeout:.0f} s "
                                   f"(e.g. {missing[:3]}); see {self.workdir}")
                self._cond.wait(min(left, 0.2))

    def sa_states(self, side: str = "edge") -> dict[str, str]:
        """Tunnel id -> IKE SA state on one side (ESTABLISHED only when a CHILD_SA is INSTALLED too);
        tunnels without an SA are absent."""
        charon = self.edge if side == "edge" else self.site
        out: dict[str, str] = {}
        for name, sa in charon.list_sas():
            t = self._by_name.get(name)
            if t is None:
                continue
            state = _text(sa.get("state", ""))
            children = sa.get("child-sas", {}) or {}
            installed = any(_text(c.get("state", "")) == "INSTALLED" for c in children.values())
            if state == "ESTABLISHED" and not installed:
                state = "ESTABLISHED_NO_CHILD"
            if out.get(t.tunnel_id) != "ESTABLISHED":
                out[t.tunnel_id] = state
        return out

    def tunnel_states(self) -> dict[str, float]:
        """Tunnel name -> Cloudflare-style health (1 healthy, 0 down) from the edge's real SA state."""
        states = self.sa_states("edge")
        return {t.name: 1.0 if states.get(tid) == "ESTABLISHED" else 0.0 for tid, t in self.tunnels.items()}

    def ike_ids(self, tunnel: str, side: str = "site") -> set[str]:
        charon = self.edge if side == "edge" else self.site
        t = self.tunnel(tunnel)
        return {_text(sa.get("uniqueid", "")) for name, sa in charon.list_sas(t.name) if name == t.name}

    def reauth(self, tunnel: str, timeout: float = 5.0) -> Reauth:
        """Force a fresh authentication from the site (``rekey`` with ``reauth``) and wait for its
        outcome: a new IKE SA ESTABLISHED with a CHILD_SA (ok), or the peer's refusal seen in the
        site's log (AUTHENTICATION_FAILED, MAC mismatched), or nothing by ``timeout`` (not ok)."""
        t = self.tunnel(tunnel)
        before = self.ike_ids(t.name)
        log_mark = _size(self.site.log_path)
        start = time.monotonic()
        try:
            self.site.session().rekey({"ike": t.name, "reauth": "yes"})
        except vici.exception.CommandException as exc:
            return Reauth(False, time.monotonic() - start, f"rekey refused: {exc}")
        deadline = start + timeout
        while time.monotonic() < deadline:
            for name, sa in self.site.list_sas(t.name):
                uid = _text(sa.get("uniqueid", ""))
                if name == t.name and uid not in before and _text(sa.get("state", "")) == "ESTABLISHED" and \
                        any(_text(c.get("state", "")) == "INSTALLED" for c in (sa.get("child-sas") or {}).values()):
                    return Reauth(True, time.monotonic() - start, f"IKE SA #{uid} established")
            failure = _failure_in_log(self.site.log_path, log_mark, t.name)
            if failure:
                return Reauth(False, time.monotonic() - start, failure)
            time.sleep(0.01)
        return Reauth(False, time.monotonic() - start, f"no fresh authentication within {timeout:.1f} s")

    def probe_all(self, interval: float = 0.05) -> TrafficProbe:
        """A traffic probe through every tunnel (not started; use it as a context manager)."""
        return probe(self, None, interval)

    def events_since(self, mark: int) -> list[Event]:
        with self._cond:
            return list(self.events[mark:])

    def event_mark(self) -> int:
        with self._cond:
            return len(self.events)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _failure_in_log(path: str, offset: int, name: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            fh.seek(offset)
            text = fh.read()
    except OSError:
        return None
    for line in text.splitlines():
        if f"<{name}|" in line and any(word in line for word in REAUTH_FAILURES):
            return line.split("> ", 1)[-1].strip()
    return None


def sweep_stale() -> list[str]:
    """Tear down labs whose owning process is gone (a SIGKILLed test run): kill their charons by pid,
    delete their namespaces. Returns the namespaces removed."""
    removed: list[str] = []
    try:
        names = os.listdir(STATE_DIR)
    except OSError:
        return removed
    for entry in names:
        path = os.path.join(STATE_DIR, entry)
        try:
            with open(path, encoding="utf-8") as fh:
                state = json.load(fh)
            owner = int(state["owner"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if os.path.exists(f"/proc/{owner}"):
            continue
        for pid in state.get("pids", []):
            if _is_charon(int(pid)):
                kill_pid(int(pid))
        for ns in state.get("namespaces", []):
            if isinstance(ns, str) and ns.startswith("psk-lab-"):
                for pid in netns.pids_in(ns):
                    kill_pid(pid)
                netns.delete(ns)
                removed.append(ns)
        workdir = state.get("workdir")
        if isinstance(workdir, str) and os.path.basename(workdir).startswith("psk-lab-"):
            shutil.rmtree(workdir, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.remove(path)
    return removed


def _is_charon(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"charon" in fh.read()
    except OSError:
        return False


def probe(lab: Lab, tunnels: Iterable[str] | None = None, interval: float = 0.05) -> TrafficProbe:
    """A traffic probe (not started) through the given tunnels (ids or names; default: all)."""
    chosen = [lab.tunnel(k) for k in (tunnels if tunnels is not None else list(lab.tunnels))]
    return TrafficProbe(lab.edge_ns, lab.site_ns, [(t.name, t.site_inner, t.edge_inner) for t in chosen], interval)


def attach(lab: Lab, cloudflare: Any, account_id: str, tunnels: Iterable[tuple[str, str]]) -> list[LabTunnel]:
    """Put a Cloudflare simulator's tunnels, given as (id, name), into the lab with the key the
    simulator holds on both sides, and make the simulator's edge real: every apply loads the key into
    the edge charon (its edge hook), and its GraphQL tunnel health comes from the edge's SA events.
    For ``rotator demo`` and the end-to-end tests."""
    pairs = list(tunnels)
    keys = {tid: cloudflare.psk_of(account_id, tid) or "" for tid, _ in pairs}
    added = lab.add_tunnels(pairs, keys)
    cloudflare.set_edge_hook(lab.edge_hook)
    cloudflare.health_source = lab.health_source
    return added
