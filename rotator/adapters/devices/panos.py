"""The ``panos`` device kind: a Palo Alto Networks firewall through the PAN-OS XML API (pan-python's
``pan.xapi``), docs/design.md section 10.

deliver / rollback (one call per batch): read the IKE gateways (each tunnel's named by the
``gateway`` template, default ``cf-{tunnel_name}``) from the candidate configuration; set the
pre-shared keys of the batch in one request (``type=config&action=set`` on the gateway list with an
``<entry>`` per gateway holding ``authentication/pre-shared-key/key``, in the POST body, never a URL;
the firewall takes all of them or none); then **one commit for the batch**, waited for (``type=commit``, then
``<show><jobs><id>N</id></jobs></show>`` until FIN; a FAIL's details are reported, redacted).

What the API can and cannot tell: PAN-OS never returns a key; it stores it encrypted with its master
key and answers ``-AQ==...``. The same key under the same master key gives the same value, so after
the set the kind compares the candidate's encrypted key with the running one (``action=get`` vs
``action=show``): equal means the firewall already runs this key, and the commit is skipped (a
repeated deliver or a reconcile after a crash never commits again). The kind cannot tell whether a
key it did not just set is a given key, and a commit is device-wide, so a deliver refuses to start
while the candidate holds uncommitted changes (``<check><pending-changes>``): it never commits
anyone else's half-finished work.

verify (tunnels concurrently): note the gateway's IKE SAs (``<show><vpn><ike-sa><gateway>``), clear
them (``<clear><vpn><ike-sa><gateway>``) and poll until an Established SA with a new serial number
(``sn``) is up, at most ``verify_timeout``: a fresh IKE_AUTH with the running key, which Cloudflare
accepts only if it holds the same key. Cloudflare never initiates, so the firewall must (traffic or
tunnel monitoring): the README says so.

Keys: 1-255 printable ASCII characters, no space (the IKE gateway's pre-shared key in the PAN-OS
configuration schema, ``maxlen 255``; PAN-OS web interface help, Network > Network Profiles > IKE
Gateways > General, "Pre-shared Key"). Every call has a total deadline: each request runs on its own
thread and the caller stops waiting at the deadline, whatever the socket does.
"""

from __future__ import annotations

import logging
import math
import re
import string
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from xml.sax.saxutils import escape

import pan.xapi
import structlog

from rotator.adapters.devices._common import DeviceSpec, Fields, fill, one_line
from rotator.adapters.devices._vendor import (
    FirewallDevice,
    Unclear,
    parse_host,
    parse_tls,
    read_credential,
    tls_failure,
    wait_fresh,
)
from rotator.rotation.ports import DeviceResult, DeviceStatus, DeviceTunnel, KeyRules
from rotator.secret import Secret

log = structlog.get_logger("rotator.devices.panos")
T = TypeVar("T")

KIND = "panos"
INTERRUPTS = False  # a commit changes the key; established SAs live on until re-authenticated
PROOF = "ike_reauth"
EXTRA_COMMON_KEYS = ("verify_timeout",)
PRINTABLE = "".join(c for c in string.printable if "!" <= c <= "~")
KEY_RULES = KeyRules(min_length=1, max_length=255, alphabet=PRINTABLE,
                     rule="PAN-OS: 1-255 printable ASCII characters, no space")

GATEWAYS = "/config/devices/entry[@name='localhost.localdomain']/network/ike/gateway"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")  # PAN-OS object names (and safe in an xpath)
DEFAULT_GATEWAY = "cf-{tunnel_name}"


@dataclass(frozen=True)
class PanosSettings:
    host: str
    port: int
    api_key: Secret
    api_key_file: str
    ca_file: str = ""
    verify_tls: bool = True
    gateway: str = DEFAULT_GATEWAY
    poll_interval: float = 2.0

    def masked(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "api_key_file": self.api_key_file,
                "ca_file": self.ca_file or "<system>", "verify_tls": self.verify_tls, "gateway": self.gateway,
                "poll_interval": self.poll_interval}


def parse_settings(f: Fields) -> PanosSettings:
    host = parse_host(f)
    port = f.integer("port", 443, 1, 65535)
    api_key, api_key_file = read_credential(
        f, "api_key_file", "API key",
        "write the key of an API admin into it (type=keygen; see the README, PAN-OS)")
    ca_file, verify_tls = parse_tls(f)
    gateway = f.template("gateway", DEFAULT_GATEWAY)
    poll_interval = f.duration("poll_interval", "2s")
    return PanosSettings(host, port, api_key, api_key_file, ca_file, verify_tls, gateway, poll_interval)


def secrets(settings: PanosSettings) -> list[Secret]:
    return [settings.api_key]


def build(spec: DeviceSpec) -> PanosDevice:
    assert isinstance(spec.settings, PanosSettings)
    return PanosDevice.from_spec(spec)


# -- talking to the firewall -------------------------------------------------------------------------

class CallError(Exception):
    """One XML API call that did not succeed. ``sent``: the request may have reached the firewall
    (False: it certainly did not, e.g. no connection or a refused certificate); ``refused``: the
    firewall answered ``status="error"`` (its message in ``str()``)."""

    def __init__(self, message: str, *, sent: bool, refused: bool = False) -> None:
        super().__init__(message)
        self.sent, self.refused = sent, refused


def translate(detail: str, where: str) -> CallError:
    """pan.xapi's error text as one line naming the cause and the fix (one table)."""
    low = detail.lower()
    tls = tls_failure(detail, where, "firewall's management")
    if tls:
        return CallError(tls, sent=False)
    if "code: 403" in low or "invalid credential" in low:
        return CallError(f"the firewall at {where} refused the API key (HTTP 403 Invalid Credential): write a "
                         "valid key of an admin with XML API access to api_key_file", sent=False, refused=True)
    if "code: 401" in low:
        return CallError(f"the firewall at {where} refused the API key (HTTP 401): write a valid key to "
                         "api_key_file", sent=False, refused=True)
    if "connection refused" in low or "name or service not known" in low or "no route to host" in low \
            or "nodename nor servname" in low or "network is unreachable" in low:
        reason = detail.split("reason:", 1)[-1].strip()
        return CallError(f"cannot connect to the firewall at {where} ({reason}): check host and port", sent=False)
    if "timed out" in low:
        return CallError(f"no answer from the firewall at {where} in time", sent=True)
    if "code: 5" in low:
        return CallError(f"the firewall at {where} failed ({detail.split('URLError:', 1)[-1].strip()})", sent=True)
    return CallError(f"unreadable answer from the firewall at {where} ({detail})", sent=True)


class PanosDevice(FirewallDevice):
    """A PAN-OS firewall as a far end (rotation/ports.py, Device)."""

    kind = KIND
    interrupts = INTERRUPTS
    key_rules = KEY_RULES
    proof = PROOF
    settings: PanosSettings

    def __init__(self, name: str, settings: PanosSettings, **kw: Any) -> None:
        super().__init__(name, settings, **kw)
        # pan.xapi logs each request's fields at DEBUG, the key's <key> element among them.
        logging.getLogger("pan.xapi").setLevel(logging.INFO)

    # -- one request with a total deadline --------------------------------------------------------
    def _call(self, end: float, work: Callable[[pan.xapi.PanXapi], T]) -> T:
        """Run ``work`` with a fresh client (pan.xapi keeps each answer on the client: one per call)
        on its own thread; stop waiting at ``end`` (the thread's socket timeout ends it later)."""
        budget = end - time.monotonic()
        if budget <= 0.05:
            raise CallError("no time left before the deadline", sent=False)
        box: dict[str, Any] = {}
        done = threading.Event()

        def run() -> None:
            try:
                xapi = pan.xapi.PanXapi(hostname=self.settings.host, port=self.settings.port,
                                        api_key=self.settings.api_key.reveal(), timeout=max(1, math.ceil(budget)),
                                        ssl_context=self.tls)
                box["value"] = work(xapi)
            except BaseException as exc:  # handed to the caller's thread
                box["error"] = exc
            finally:
                done.set()

        threading.Thread(target=run, name=f"panos-{self.name}", daemon=True).start()
        if not done.wait(budget):
            raise CallError(f"no answer from the firewall at {self.where} within the deadline", sent=True)
        error = box.get("error")
        if isinstance(error, pan.xapi.PanXapiError):
            text = str(error)
            if text.startswith("URLError") or "ParseError" in text or "content-type" in text:
                raise translate(text, self.where) from None
            raise CallError(text or "the firewall answered status=\"error\"", sent=True, refused=True) from None
        if isinstance(error, OSError):
            raise translate(f"{type(error).__name__}: {error}", self.where) from None
        if error is not None:
            raise CallError(f"unreadable answer from the firewall at {self.where} ({type(error).__name__})",
                            sent=True) from None
        return box["value"]  # type: ignore[no-any-return]

    @staticmethod
    def _xpath(gateway: str, sub: str = "") -> str:
        return f"{GATEWAYS}/entry[@name='{gateway}']{sub}"

    def _gateways(self, end: float, running: bool) -> dict[str, ET.Element]:
        """Every IKE gateway of the candidate (or running) configuration, in one request."""
        def work(x: pan.xapi.PanXapi) -> dict[str, ET.Element]:
            (x.show if running else x.get)(xpath=GATEWAYS)
            return {e.get("name", ""): e for e in x.element_root.findall("./result/gateway/entry")}
        return self._call(end, work)

    @staticmethod
    def _stored(entries: dict[str, ET.Element], gateway: str) -> str | None:
        entry = entries.get(gateway)
        return entry.findtext("authentication/pre-shared-key/key") if entry is not None else None

    def _op(self, end: float, cmd: str) -> ET.Element:
        def work(x: pan.xapi.PanXapi) -> ET.Element:
            x.op(cmd=cmd)
            root: ET.Element = x.element_root
            return root
        return self._call(end, work)

    # -- deliver and rollback: set, then one commit ---------------------------------------------
    def _gateway_of(self, tunnel: DeviceTunnel) -> str | DeviceResult:
        name = fill(self.settings.gateway, tunnel)
        if not NAME_RE.match(name):
            return DeviceResult(DeviceStatus.FAILED, f"{name[:80]!r} (gateway template {self.settings.gateway!r}) "
                                "is not a PAN-OS gateway name; set the device's gateway template")
        return name

    def set_keys(self, action: str, tunnels: Sequence[DeviceTunnel], end: float, keys: list[str]
                 ) -> dict[str, DeviceResult]:
        out: dict[str, DeviceResult] = {}
        todo: dict[str, tuple[DeviceTunnel, str]] = {}
        for t in tunnels:
            gateway = self._gateway_of(t)
            broken = self.key_rules.refuses(t.psk.reveal())
            if isinstance(gateway, DeviceResult):
                out[t.tunnel_id] = gateway
            elif broken:
                out[t.tunnel_id] = DeviceResult(DeviceStatus.FAILED, f"not sent: the key breaks the rule {broken}")
            elif gateway in {g for _, g in todo.values()}:
                out[t.tunnel_id] = DeviceResult(DeviceStatus.FAILED, f"gateway {gateway} is named for two tunnels "
                                                "of the batch; make the gateway template unique per tunnel")
            else:
                todo[t.tunnel_id] = (t, gateway)

        def all_left(status: DeviceStatus, reason: str) -> dict[str, DeviceResult]:
            out.update({tid: DeviceResult(status, one_line(reason, keys)) for tid in todo if tid not in out})
            return out

        if not todo:
            return out
        try:  # nothing is changed before the sets: any failure up to there leaves the firewall as it was
            if action == "deliver":
                pending = self._op(end, "<check><pending-changes></pending-changes></check>").findtext("result")
                if (pending or "").strip() != "no":
                    return all_left(DeviceStatus.FAILED, "the candidate configuration holds uncommitted changes; "
                                    "a commit is device-wide, so the key is not sent: commit or revert them")
            candidate = self._gateways(end, running=False)
            for tid, (_t, gateway) in list(todo.items()):
                entry = candidate.get(gateway)
                if entry is None or entry.find("authentication/pre-shared-key") is None:
                    problem = "no IKE gateway" if entry is None else "no pre-shared-key IKE gateway"
                    out[tid] = DeviceResult(DeviceStatus.FAILED, f"{problem} named {gateway} on the firewall (gateway "
                                            f"template {self.settings.gateway!r}); nothing was sent")
                    del todo[tid]
        except CallError as exc:
            return all_left(DeviceStatus.FAILED, f"{exc}; nothing was changed")

        sent = {tid: gateway for tid, (_t, gateway) in todo.items()}  # whose candidate may now hold the key
        if not sent:
            return out
        element = "".join(f"<entry name='{gateway}'><authentication><pre-shared-key><key>{escape(t.psk.reveal())}"
                          "</key></pre-shared-key></authentication></entry>" for t, gateway in todo.values())
        try:  # one set for the batch: the firewall takes every key of it or none
            self._call(end, lambda x: x.set(xpath=GATEWAYS, element=element))
        except CallError as exc:
            if exc.sent and not exc.refused:
                return all_left(DeviceStatus.UNKNOWN, f"setting the keys: {exc}; the candidate may hold them")
            return all_left(DeviceStatus.FAILED, f"the firewall refused the keys of this batch: {exc}")
        need: dict[str, str] = dict(sent)
        if sent:
            try:  # the same key encrypts the same: equal stored values mean the firewall runs this key
                after, running = self._gateways(end, running=False), self._gateways(end, running=True)
            except CallError:
                after, running = {}, {}
            for tid, gateway in sent.items():
                stored = self._stored(after, gateway)
                if stored and stored == self._stored(running, gateway):
                    out[tid] = DeviceResult(DeviceStatus.OK, "the firewall already runs this key: nothing to commit")
                    del need[tid]
        if need:
            out.update(self._commit(end, list(need), keys))
        return out

    def _commit(self, end: float, tids: list[str], keys: list[str]) -> dict[str, DeviceResult]:
        def each(status: DeviceStatus, reason: str | None) -> dict[str, DeviceResult]:
            return {tid: DeviceResult(status, one_line(reason, keys) if reason else None) for tid in tids}

        try:
            root = self._call(end, lambda x: (x.commit(cmd="<commit></commit>"), x.element_root)[1])
        except CallError as exc:
            status = DeviceStatus.UNKNOWN if exc.sent and not exc.refused else DeviceStatus.FAILED
            return each(status, f"commit: {exc}; the candidate holds the key, uncommitted")
        job = (root.findtext("./result/job") or "").strip()
        if not job:
            if "no changes" in " ".join(root.itertext()).lower():
                return each(DeviceStatus.OK, "the firewall already runs this key: nothing to commit")
            return each(DeviceStatus.UNKNOWN, "the commit answered neither a job id nor 'no changes'")
        if not job.isdigit():
            return each(DeviceStatus.UNKNOWN, f"the commit answered an odd job id {job[:20]!r}")
        log.info("device_panos_commit", device=self.name, job=job, gateways=len(tids))
        last = "no answer yet"
        for _ in range(10_000):  # bounded: one poll per interval until the deadline
            state: ET.Element | None = None
            try:
                state = self._op(end, f"<show><jobs><id>{job}</id></jobs></show>").find("./result/job")
            except CallError as exc:
                if not exc.sent:
                    return each(DeviceStatus.UNKNOWN, f"commit job {job}: {exc}; it may still finish")
                last = str(exc)
            if state is not None and (state.findtext("status") or "").strip() == "FIN":
                result = (state.findtext("result") or "").strip()
                details = "; ".join((ln.text or "").strip() for ln in state.iter("line") if (ln.text or "").strip())
                if result == "OK":
                    return each(DeviceStatus.OK, None)
                if result == "FAIL":
                    return each(DeviceStatus.FAILED, f"commit job {job} failed: {details or 'no details'}; the "
                                "running configuration is unchanged")
                return each(DeviceStatus.UNKNOWN, f"commit job {job} finished with result {result[:20]!r}")
            left = end - time.monotonic()
            if left <= 0.05:
                break
            time.sleep(min(self.settings.poll_interval, left - 0.05))
        return each(DeviceStatus.UNKNOWN, f"commit job {job} not finished before the deadline ({last}); it may "
                    "still finish, the key stays pending")

    # -- verify: a fresh IKE SA per gateway --------------------------------------------------------
    def _serials(self, end: float, gateway: str) -> set[str]:
        root = self._op(end, f"<show><vpn><ike-sa><gateway>{gateway}</gateway></ike-sa></vpn></show>")
        return {(e.findtext("sn") or "").strip() for e in root.findall("./result/entry")
                if (e.findtext("state") or "").strip().lower() == "established"}

    def verify_one(self, tunnel: DeviceTunnel, end: float, keys: list[str]) -> DeviceResult:
        gateway = self._gateway_of(tunnel)
        if isinstance(gateway, DeviceResult):
            return gateway
        started = time.monotonic()
        try:
            before = self._serials(end, gateway)
            self._op(end, f"<clear><vpn><ike-sa><gateway>{gateway}</gateway></ike-sa></vpn></clear>")
        except CallError as exc:
            status = DeviceStatus.FAILED if exc.refused else DeviceStatus.UNKNOWN
            return DeviceResult(status, one_line(f"clearing the IKE SA of {gateway}: {exc}", keys))

        def fresh() -> bool:
            try:
                return bool(self._serials(end, gateway) - before - {""})
            except CallError as exc:
                raise Unclear(str(exc)) from None
        return wait_fresh(fresh, end, self.settings.poll_interval, keys, what=f"clearing the IKE SA of {gateway}",
                          since=started, failure="no fresh IKE SA")
