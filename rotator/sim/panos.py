"""A simulated Palo Alto Networks firewall: the PAN-OS XML API for IKE gateways, commits and IKE SAs.

The facts it follows, from the vendor's documentation ("PAN-OS and Panorama API", XML API section):
- every request is ``/api/`` with ``type=`` (GET query or POST form; the API key as ``key=`` or the
  ``X-PAN-KEY`` header); ``type=keygen`` turns ``user`` and ``password`` into an API key
  (https://docs.paloaltonetworks.com/pan-os/10-1/pan-os-panorama-api/get-started-with-the-pan-os-xml-api/get-your-api-key);
- answers are ``<response status="success|error" code="...">`` (application/xml); a bad key is
  HTTP 403 with code 403 "Invalid Credential"; code 7 "Object not present", 12 "Invalid object",
  17 "Invalid command", 19/20 success (".../pan-os-xml-api-error-codes");
- ``type=config``: ``action=set|edit`` change the *candidate* configuration only, ``action=get``
  reads the candidate, ``action=show`` the *running* one (".../pan-os-xml-api-request-types/
  configuration-api"); IKE gateways live at
  ``/config/devices/entry[@name='localhost.localdomain']/network/ike/gateway/entry[@name='NAME']``;
  a pre-shared key is stored encrypted and read back as ``-AQ==...``, never in clear;
- ``type=commit&cmd=<commit></commit>`` is asynchronous: it answers a job id ("Commit job enqueued
  with jobid N"), or "There are no changes to commit."; ``type=op&cmd=<show><jobs><id>N</id></jobs></show>``
  reports ``status`` ACT/FIN, ``result`` PEND/OK/FAIL and ``details/line`` (".../asynchronous-and-
  synchronous-requests-to-the-pan-os-xml-api"); a failed commit leaves the running configuration as it was;
- ``type=op`` runs CLI commands as XML: ``<clear><vpn><ike-sa><gateway>NAME</gateway></ike-sa></vpn></clear>``,
  ``<show><vpn><ike-sa><gateway>NAME</gateway></ike-sa></vpn></show>`` (entries with ``sn``, the
  SA's serial number, and ``state``), ``<check><pending-changes></pending-changes></check>`` (yes/no)
  (".../pan-os-xml-api-request-types/run-operational-mode-commands-api").

What it adds for tests: each gateway is bound to a Cloudflare tunnel; after a clear, a fresh IKE SA
(a new ``sn``) comes up only while the gateway's *running* key equals the key ``peer(account, tunnel)``
says Cloudflare holds. The simulated master key makes the encrypted form deterministic: the same key
gives the same ``-AQ==`` value (so a set of the key the device already runs changes nothing).
Faults: the shared ones by route (``panos.keygen``, ``panos.config.get``, ``panos.config.show``,
``panos.config.set``, ``panos.commit``, ``panos.op.jobs``, ``panos.op.clear``, ``panos.op.sa``,
``panos.op.pending``, ``panos.other``), and ``fail_commit`` (a job that ends FAIL with a text, e.g.
one quoting a key), ``refuse_key`` (a set answered with an error), ``never_reauth`` (no fresh SA).
``scan_secrets()`` lists every key and credential it holds, for the secret scan.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import re
import secrets
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl
from xml.sax.saxutils import escape, quoteattr

from rotator.sim.base import Fault, Request, Response, SimApp
from rotator.sim.base import serve as serve  # the shared loopback server, HTTPS in the tests

XML_CT = (b"content-type", b"application/xml; charset=UTF-8")
GATEWAYS = "/config/devices/entry[@name='localhost.localdomain']/network/ike/gateway"
ENTRY_RE = re.compile(r"^" + re.escape(GATEWAYS) + r"/entry\[@name='([^']{1,63})'\](/.*)?$")
PSK_PATHS = ("/authentication/pre-shared-key", "/authentication/pre-shared-key/key")


@dataclass
class Gateway:
    name: str
    account_id: str
    tunnel_id: str
    local_ip: str
    peer_ip: str
    candidate: str | None = None
    running: str | None = None
    complete: bool = True  # False: created by a set on a name that did not exist (fails validation)
    sas: list[int] = field(default_factory=list)
    sa_pending_at: float | None = None  # a clear happened: a new SA may come up from this time on


@dataclass
class Job:
    id: int
    user: str
    enqueued: float
    done_at: float
    snapshot: dict[str, str | None]
    failure: str | None
    status: str = "ACT"
    result: str = "PEND"


class PanosSim(SimApp):
    def __init__(self, *, peer: Callable[[str, str], str | None] | None = None, user: str = "rotator",
                 password: str | None = None, api_key: str | None = None, commit_seconds: float = 0.05) -> None:
        super().__init__()
        self.peer = peer
        self.users = {user: password or secrets.token_urlsafe(18)}
        self.api_keys = {api_key or "LUFRPT" + secrets.token_urlsafe(30): user}
        self.master = secrets.token_bytes(32)
        self.gateways: dict[str, Gateway] = {}
        self.jobs: dict[int, Job] = {}
        self.commit_seconds = commit_seconds
        self.reauth_seconds = 0.0
        self._job_ids = itertools.count(1)
        self._sns = itertools.count(4000)
        self._commit_failures: list[str] = []
        self._refused: dict[str, str] = {}
        self._never: set[str] = set()
        self.commits = 0  # commit requests that enqueued a job

    @property
    def api_key(self) -> str:
        return next(iter(self.api_keys))

    # -- set-up and inspection ----------------------------------------------------------------
    def add_gateway(self, name: str, account_id: str, tunnel_id: str, key: str | None, *,
                    local_ip: str = "203.0.113.1", peer_ip: str = "162.159.66.164") -> Gateway:
        """A committed IKE gateway holding ``key`` (candidate and running), with one IKE SA up."""
        with self.lock:
            gw = Gateway(name, account_id, tunnel_id, local_ip, peer_ip, key, key, sas=[next(self._sns)])
            self.gateways[name] = gw
            return gw

    def running_key(self, name: str) -> str | None:
        with self.lock:
            self._advance()
            gw = self.gateways.get(name)
            return gw.running if gw else None

    def candidate_key(self, name: str) -> str | None:
        with self.lock:
            gw = self.gateways.get(name)
            return gw.candidate if gw else None

    def held(self, account_id: str, tunnel_id: str) -> str | None:
        """The key the firewall runs for a Cloudflare tunnel (for the invariant)."""
        with self.lock:
            self._advance()
            return next((g.running for g in self.gateways.values()
                         if (g.account_id, g.tunnel_id) == (account_id, tunnel_id)), None)

    def scan_secrets(self) -> set[str]:
        with self.lock:
            keys = {k for g in self.gateways.values() for k in (g.candidate, g.running) if k}
            keys |= {k for j in self.jobs.values() for k in j.snapshot.values() if k}
            return keys | set(self.api_keys) | set(self.users.values())

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"request_counts": dict(self.counts), "commits": self.commits,
                    "gateways": {n: {"running": _fingerprint(g.running), "candidate": _fingerprint(g.candidate),
                                     "sas": list(g.sas)} for n, g in self.gateways.items()}}

    # -- faults -------------------------------------------------------------------------------
    def fail_commit(self, text: str, count: int = 1) -> None:
        """The next ``count`` commit jobs end FIN/FAIL with ``text`` as their details; ``{key}`` in it
        becomes the key of the first gateway the commit changes (a firewall quoting a key back)."""
        with self.lock:
            self._commit_failures.extend([text] * count)

    def refuse_key(self, gateway: str, message: str) -> None:
        """The next set of this gateway's key is answered ``status="error" code="12"`` with ``message``
        (a key the firewall refuses; the old key, sent back by a rollback, is taken again)."""
        with self.lock:
            self._refused[gateway] = message

    def never_reauth(self, gateways: list[str]) -> None:
        """No fresh IKE SA comes up for these gateways after a clear, whatever the keys."""
        with self.lock:
            self._never.update(gateways)

    def set_commit_seconds(self, seconds: float) -> None:
        with self.lock:
            self.commit_seconds = float(seconds)

    def clear(self) -> None:
        with self.lock:
            self._commit_failures.clear()
            self._refused.clear()
            self._never.clear()
            self.faults.clear()

    def control(self, op: str, args: dict[str, Any]) -> Any:
        own: dict[str, Callable[..., Any]] = {"fail_commit": self.fail_commit, "refuse_key": self.refuse_key,
                                              "never_reauth": self.never_reauth, "clear": self.clear,
                                              "set_commit_seconds": self.set_commit_seconds}
        if op in own:
            return own[op](**args)
        return self._shared_control(op, args)

    # -- HTTP ---------------------------------------------------------------------------------
    @staticmethod
    def params(req: Request) -> dict[str, str]:
        form = dict(parse_qsl(req.body.decode("utf-8", "replace"), keep_blank_values=True)) if req.body else {}
        return {**req.query, **form}

    def route_of(self, req: Request) -> str:
        if req.path.rstrip("/") != "/api":
            return "panos.other"
        p = self.params(req)
        kind = p.get("type", "")
        if kind == "keygen":
            return "panos.keygen"
        if kind == "config" and p.get("action") in ("get", "show"):
            return f"panos.config.{p['action']}"
        if kind == "config" and p.get("action") in ("set", "edit"):
            return "panos.config.set"
        if kind == "commit":
            return "panos.commit"
        if kind == "op":
            cmd = p.get("cmd", "")
            for marker, route in (("<jobs>", "panos.op.jobs"), ("<clear>", "panos.op.clear"),
                                  ("<ike-sa>", "panos.op.sa"), ("<pending-changes", "panos.op.pending")):
                if marker in cmd:
                    return route
        return "panos.other"

    def fault_response(self, fault: Fault) -> Response:
        text = fault.message or f"simulated failure (HTTP {fault.status})"
        return Response(fault.status, f"<html><body><h1>{escape(text)}</h1></body></html>".encode(),
                        [(b"content-type", b"text/html")])

    def handle(self, req: Request, route: str) -> Response:
        self._advance()
        p = self.params(req)
        if route == "panos.keygen":
            user, password = p.get("user", ""), p.get("password", "")
            known = self.users.get(user)
            if known is None or not hmac.compare_digest(known.encode(), password.encode()):
                return _error(403, "Invalid Credential")
            key = next(k for k, u in self.api_keys.items() if u == user)
            return _ok(f"<result><key>{escape(key)}</key></result>")
        key = p.get("key") or req.headers.get("x-pan-key", "")
        admin = next((u for k, u in self.api_keys.items() if hmac.compare_digest(k.encode(), key.encode())), None)
        if admin is None:
            return _error(403, "Invalid Credential")
        if route.startswith("panos.config."):
            return self._config(p)
        if route == "panos.commit":
            return self._commit(p.get("cmd", "<commit></commit>"), admin)
        if route.startswith("panos.op."):
            return self._op(p.get("cmd", ""))
        return _error(400, "Unknown request type", code=17)

    # -- type=config --------------------------------------------------------------------------
    def _config(self, p: dict[str, str]) -> Response:
        action, xpath = p.get("action", ""), p.get("xpath", "")
        if xpath == GATEWAYS and action in ("get", "show"):  # every gateway at once
            listed = [g for g in self.gateways.values() if action == "get" or g.running is not None]
            entries = "".join(self._entry(g, g.candidate if action == "get" else g.running) for g in listed)
            counts = ' total-count="1" count="1"' if action == "get" else ""
            return _ok(f"<result{counts}><gateway>{entries}</gateway></result>", code=19)
        if xpath == GATEWAYS and action == "set":  # many gateways in one set, all or nothing
            return self._set_many(p.get("element", ""))
        m = ENTRY_RE.match(xpath)
        if not m or (m.group(2) or "") not in ("", *PSK_PATHS):
            return _error(200, f"the simulator does not model {xpath[:120]!r}", code=6)
        name, sub = m.group(1), m.group(2) or ""
        gw = self.gateways.get(name)
        if action in ("get", "show"):
            if gw is None:
                return _error(200, "No such node", code=7) if action == "show" else \
                    _ok('<result total-count="0" count="0"/>', code=7)
            key = gw.candidate if action == "get" else gw.running
            node = self._entry(gw, key) if not sub else \
                f"<pre-shared-key><key>{self._encrypt(key)}</key></pre-shared-key>" if sub == PSK_PATHS[0] else \
                f"<key>{self._encrypt(key)}</key>"
            counts = ' total-count="1" count="1"' if action == "get" else ""
            return _ok(f"<result{counts}>{node}</result>", code=19)
        element = p.get("element", "")
        try:
            root = ET.fromstring(f"<root>{element}</root>")  # noqa: S314 - the rotator's own request
        except ET.ParseError:
            return _error(200, "Malformed element", code=18)
        key_node = root.find("key") if sub in PSK_PATHS else None
        if key_node is None or (action == "set" and sub != PSK_PATHS[0]) or (action == "edit" and sub != PSK_PATHS[1]):
            return _error(200, "the simulator models only a set of <key> at .../pre-shared-key "
                               "or an edit of .../pre-shared-key/key", code=12)
        if name in self._refused:
            return _error(200, f"{name} -> authentication -> pre-shared-key -> key {self._refused.pop(name)}", code=12)
        value = key_node.text or ""
        if gw is None:  # as PAN-OS does, a set creates the node: an incomplete gateway
            gw = self.gateways[name] = Gateway(name, "", "", "", "", complete=False)
        gw.candidate = value
        return _ok("<msg>command succeeded</msg>", code=20)

    def _set_many(self, element: str) -> Response:
        try:
            root = ET.fromstring(f"<root>{element}</root>")  # noqa: S314 - the rotator's own request
        except ET.ParseError:
            return _error(200, "Malformed element", code=18)
        changes: dict[str, str] = {}
        for entry in root.findall("entry"):
            name, key = entry.get("name") or "", entry.find("authentication/pre-shared-key/key")
            if key is None or len(entry) != 1 or not re.fullmatch(r"[^']{1,63}", name):
                return _error(200, "the simulator models only <entry name=...> holding authentication/"
                                   "pre-shared-key/key in a set on the gateway list", code=12)
            if name in self._refused:
                return _error(200, f"{name} -> authentication -> pre-shared-key -> key {self._refused.pop(name)}",
                              code=12)
            changes[name] = key.text or ""
        for name, value in changes.items():  # a set merges into the list (a new name: an incomplete gateway)
            gw = self.gateways.get(name) or self.gateways.setdefault(name, Gateway(name, "", "", "", "", complete=False))
            gw.candidate = value
        return _ok("<msg>command succeeded</msg>", code=20)

    def _entry(self, gw: Gateway, key: str | None) -> str:
        return (f"<entry name={quoteattr(gw.name)}><authentication><pre-shared-key><key>{self._encrypt(key)}</key>"
                "</pre-shared-key></authentication><protocol><version>ikev2</version><ikev2><dpd><enable>yes"
                f"</enable></dpd></ikev2></protocol><local-address><interface>ethernet1/1</interface>"
                f"<ip>{escape(gw.local_ip)}</ip></local-address><peer-address><ip>{escape(gw.peer_ip)}</ip>"
                "</peer-address></entry>")

    def _encrypt(self, key: str | None) -> str:
        """``-AQ==`` and an opaque, deterministic value: never the key."""
        if key is None:
            return ""
        mac = hmac.new(self.master, key.encode(), hashlib.sha256).digest()
        return "-AQ==" + base64.b64encode(mac[:20]).decode() + base64.b64encode(mac[20:]).decode()

    # -- type=commit and jobs -----------------------------------------------------------------
    def _commit(self, cmd: str, user: str) -> Response:
        if not cmd.strip().startswith("<commit"):
            return _error(200, "Invalid commit command", code=17)
        if not any(g.candidate != g.running or not g.complete for g in self.gateways.values()):
            return _ok("<msg>There are no changes to commit.</msg>", code=19)
        job_id = next(self._job_ids)
        now = time.monotonic()
        failure = self._commit_failures.pop(0) if self._commit_failures else None
        changed = [g for g in self.gateways.values() if g.candidate != g.running]
        if failure is not None and changed:
            failure = failure.replace("{key}", changed[0].candidate or "")
        incomplete = sorted(g.name for g in self.gateways.values() if not g.complete)
        if failure is None and incomplete:
            failure = f"Validation Error: network -> ike -> gateway -> {incomplete[0]} is missing 'peer-address'"
        self.jobs[job_id] = Job(job_id, user, now, now + self.commit_seconds,
                                {n: g.candidate for n, g in self.gateways.items()}, failure)
        self.commits += 1
        return _ok(f"<result><msg><line>Commit job enqueued with jobid {job_id}</line></msg>"
                   f"<job>{job_id}</job></result>", code=19)

    def _advance(self) -> None:
        """Finish the commit jobs whose time has come (a firewall commits whether or not anyone polls)."""
        now = time.monotonic()
        for job in self.jobs.values():
            if job.status == "ACT" and now >= job.done_at:
                job.status = "FIN"
                job.result = "FAIL" if job.failure else "OK"
                if job.failure is None:
                    for name, key in job.snapshot.items():
                        if name in self.gateways:
                            self.gateways[name].running = key
        for gw in self.gateways.values():
            if gw.sa_pending_at is not None and now >= gw.sa_pending_at:
                peer = self.peer(gw.account_id, gw.tunnel_id) if self.peer else gw.running
                if gw.name not in self._never and gw.running is not None and peer == gw.running:
                    gw.sas = [next(self._sns)]
                    gw.sa_pending_at = None

    def _op(self, cmd: str) -> Response:
        try:
            root = ET.fromstring(cmd)  # noqa: S314 - the rotator's own request
        except ET.ParseError:
            return _error(200, "Malformed command", code=18)
        job_id = root.findtext("jobs/id")
        if root.tag == "show" and job_id is not None:
            job = self.jobs.get(int(job_id)) if job_id.strip().isdigit() else None
            if job is None:
                return _error(200, f"job {job_id} not found", code=7)
            progress = 100 if job.status == "FIN" else 50
            details = escape(job.failure) if job.failure and job.status == "FIN" else \
                "Configuration committed successfully" if job.status == "FIN" else ""
            return _ok(f"<result><job><tenq>{_stamp(job.enqueued)}</tenq><id>{job.id}</id><user>{escape(job.user)}"
                       f"</user><type>Commit</type><status>{job.status}</status><queued>NO</queued><stoppable>no"
                       f"</stoppable><result>{job.result}</result><progress>{progress}</progress><details><line>"
                       f"{details}</line></details><warnings/></job></result>")
        gateway = root.findtext("vpn/ike-sa/gateway")
        if root.tag in ("clear", "show") and gateway is not None:
            gw = self.gateways.get(gateway.strip())
            if gw is None:
                return _error(200, f"gateway {gateway.strip()} does not exist", code=12)
            if root.tag == "clear":
                gw.sas = []
                gw.sa_pending_at = time.monotonic() + self.reauth_seconds
                self._advance()
                return _ok("<result><member>cleared</member></result>")
            entries = "".join(f"<entry><name>{escape(gw.name)}</name><gwid>1</gwid><peer>{escape(gw.peer_ip)}</peer>"
                              f"<role>Init</role><sn>{sn}</sn><algo>PSK/DH20/A256/SHA384</algo><mode>IKEv2</mode>"
                              "<state>Established</state></entry>" for sn in gw.sas)
            return _ok(f"<result>{entries}</result>")
        if root.tag == "check" and root.find("pending-changes") is not None:
            pending = any(g.candidate != g.running or not g.complete for g in self.gateways.values())
            return _ok(f"<result>{'yes' if pending else 'no'}</result>")
        return _error(200, f"{root.tag} is unexpected", code=17)


def _fingerprint(key: str | None) -> str | None:
    return hashlib.sha256(key.encode()).hexdigest()[:12] if key else None


def _stamp(monotonic: float) -> str:
    return time.strftime("%Y/%m/%d %H:%M:%S", time.gmtime(time.time() - (time.monotonic() - monotonic)))


def _ok(body: str, code: int | None = None) -> Response:
    attr = f' code="{code}"' if code is not None else ""
    return Response(200, f'<response status="success"{attr}>{body}</response>'.encode(), [XML_CT])


def _error(http: int, message: str, code: int = 403) -> Response:
    if http == 403:
        body = f'<response status="error" code="403"><result><msg>{escape(message)}</msg></result></response>'
    else:
        body = f'<response status="error" code="{code}"><msg><line>{escape(message)}</line></msg></response>'
    return Response(http, body.encode(), [XML_CT])
