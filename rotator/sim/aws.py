"""A faithful fake of the two EC2 Query API actions the ``aws_vpn`` kind uses, coupled to the
Cloudflare simulator: DescribeVpnConnections and ModifyVpnTunnelOptions.

Wire format, as EC2 speaks it and botocore's service model (``botocore/data/ec2/2016-11-15/
service-2.json``, protocol ``ec2``) describes it: a form-encoded POST (``Action``, ``Version``,
``VpnConnectionId.N``, ``TunnelOptions.PreSharedKey``...), an XML answer in the namespace
``http://ec2.amazonaws.com/doc/2016-11-15/`` whose elements carry the model's ``locationName``
(``vpnConnectionSet``/``item``, ``options``/``tunnelOptionSet``, ``vgwTelemetry``...), and errors as
``<Response><Errors><Error><Code>…</Code><Message>…</Message></Error></Errors><RequestID>…``
with HTTP 400 (IncorrectState, InvalidVpnConnectionID.NotFound, InvalidParameterValue), 401
(AuthFailure), 403 (UnauthorizedOperation, SignatureDoesNotMatch), 500 (InternalError) and 503
(RequestLimitExceeded, Unavailable). Every request must carry a SigV4 ``Authorization`` header made
with the configured access key; the signature is checked with botocore's own SigV4 code.

AWS documentation followed:
- https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_ModifyVpnTunnelOptions.html
- https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_ModifyVpnTunnelOptionsSpecification.html
  (the key: 8-64 of A-Z a-z 0-9 . _, not starting with 0; anything else is InvalidParameterValue)
- https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_DescribeVpnConnections.html
- https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_VgwTelemetry.html
- https://docs.aws.amazon.com/AWSEC2/latest/APIReference/errors-overview.html
- https://docs.aws.amazon.com/vpn/latest/s2svpn/initiate-vpn-tunnels.html (startup action)

Behaviour: a modification puts the connection in ``modifying`` for ``replacement`` seconds (by the
injected clock), during which the modified tunnel is DOWN and another modification is refused with
IncorrectState; then the connection is ``available``. A tunnel's telemetry is UP only while its key
equals the key the Cloudflare simulator holds for the tunnel whose ``customer_endpoint`` is its
outside address (the ``peer`` callback), its startup action is ``start`` and no fault holds it down;
``LastStatusChange`` moves on every transition (whole seconds, as EC2 reports it).

Faults: ``refuse_next`` (any EC2 error code), ``throttle_next`` (503 RequestLimitExceeded),
``server_error_next`` (500 InternalError), the shared ``late_next`` (act, answer late: a hang),
``drop_next``, ``garbage_next``; ``hold_down`` keeps tunnels DOWN; ``deny`` refuses an action as
UnauthorizedOperation. Routes: ``ec2.DescribeVpnConnections``, ``ec2.ModifyVpnTunnelOptions``,
``ec2.other``. ``scan_secrets()`` lists every key and credential it holds.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import re
import secrets
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest, HTTPHeaders
from botocore.credentials import Credentials

from rotator.sim.base import Fault, Request, Response, SimApp
from rotator.sim.cloudflare import CloudflareSim

NAMESPACE = "http://ec2.amazonaws.com/doc/2016-11-15/"
VERSION = "2016-11-15"
XML_CT = (b"content-type", b"text/xml;charset=UTF-8")
PSK_RE = re.compile(r"^[A-Za-z1-9._][A-Za-z0-9._]{7,63}$")
AUTH_RE = re.compile(r"^AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
                     r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})$")
ROUTES = ("DescribeVpnConnections", "ModifyVpnTunnelOptions")
STATUS_OF = {"AuthFailure": 401, "UnauthorizedOperation": 403, "SignatureDoesNotMatch": 403, "InternalError": 500,
             "RequestLimitExceeded": 503, "Unavailable": 503}


@dataclass
class SimTunnel:
    outside_ip: str
    psk: str
    startup_action: str = "start"
    status: str = "DOWN"
    last_change: float = 0.0
    replacing_until: float = 0.0  # while AWS replaces this tunnel's endpoint


@dataclass
class SimConnection:
    id: str
    tunnels: list[SimTunnel]
    state: str = "available"
    modifying_until: float = 0.0


@dataclass
class Modification:
    at: float
    connection_id: str
    outside_ip: str
    key_fingerprint: str


@dataclass(eq=False)
class AwsSim(SimApp):
    """EC2 for one account and region. ``peer(outside_ip)``: the key the other end (Cloudflare's
    tunnel with that customer endpoint) holds, or None. ``clock``: UNIX time, injectable."""

    access_key: str = field(default_factory=lambda: "AKIA" + secrets.token_hex(8).upper())
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(30))
    region: str = "eu-west-1"
    replacement: float = 2.0
    clock: Callable[[], float] = time.time
    peer: Callable[[str], str | None] | None = None

    def __post_init__(self) -> None:
        super().__init__()
        self.connections: dict[str, SimConnection] = {}
        self.modifications: list[Modification] = []
        self.held_down: set[str] = set()
        self.denied: set[str] = set()
        self.history: list[str] = []  # every key it held, for the secret scan
        self._ids = itertools.count(1)
        self._ips = itertools.count(1)

    # -- setup ------------------------------------------------------------------------------------
    def add_connection(self, outside_ips: tuple[str, str] | None = None, keys: tuple[str, str] | None = None,
                       startup_action: str = "start") -> str:
        """A VPN connection with two tunnels; returns its id."""
        with self.lock:
            conn_id = f"vpn-{next(self._ids):017x}"
            ips = outside_ips or tuple(str(ipaddress.ip_address("198.51.100.0") + next(self._ips)) for _ in range(2))
            psks = keys or tuple("A" + secrets.token_urlsafe(24).replace("-", ".") for _ in range(2))
            tunnels = [SimTunnel(ip, key, startup_action) for ip, key in zip(ips, psks, strict=True)]
            self.history.extend(psks)
            self.connections[conn_id] = SimConnection(conn_id, tunnels)
            self._advance()
            return conn_id

    def tunnel(self, outside_ip: str) -> tuple[SimConnection, SimTunnel]:
        for conn in self.connections.values():
            for t in conn.tunnels:
                if t.outside_ip == outside_ip:
                    return conn, t
        raise KeyError(outside_ip)

    def key_of(self, outside_ip: str) -> str:
        with self.lock:
            return self.tunnel(outside_ip)[1].psk

    def state_of(self, conn_id: str) -> str:
        with self.lock:
            self._advance()
            return self.connections[conn_id].state

    def status_of(self, outside_ip: str) -> str:
        with self.lock:
            self._advance()
            return self.tunnel(outside_ip)[1].status

    def modifications_of(self, outside_ip: str | None = None) -> list[Modification]:
        with self.lock:
            return [m for m in self.modifications if outside_ip is None or m.outside_ip == outside_ip]

    def scan_secrets(self) -> list[str]:
        with self.lock:
            return [self.secret_key, *self.history, *(t.psk for c in self.connections.values() for t in c.tunnels)]

    # -- faults -------------------------------------------------------------------------------------
    def refuse_next(self, action: str, code: str = "InvalidParameterValue", message: str = "refused",
                    count: int = 1, status: int | None = None) -> None:
        self.fail_next(f"ec2.{action}", count, status=status or STATUS_OF.get(code, 400), message=f"{code}|{message}")

    def throttle_next(self, action: str, count: int = 1) -> None:
        self.refuse_next(action, "RequestLimitExceeded", "Request limit exceeded.", count)

    def server_error_next(self, action: str, count: int = 1) -> None:
        self.refuse_next(action, "InternalError", "An internal error has occurred.", count)

    def hold_down(self, outside_ips: list[str]) -> None:
        """These tunnels never come UP (a far end that never negotiates), until ``clear``."""
        with self.lock:
            self.held_down.update(outside_ips)
            self._advance()

    def deny(self, action: str) -> None:
        with self.lock:
            self.denied.add(action)

    def clear(self) -> None:
        with self.lock:
            self.held_down.clear()
            self.denied.clear()
            self.faults.clear()
            self._advance()

    # -- the state machine ---------------------------------------------------------------------------
    def _advance(self) -> None:
        """Bring every state and telemetry entry up to ``clock()`` (called under the lock)."""
        now = self.clock()
        for conn in self.connections.values():
            if conn.state == "modifying" and now >= conn.modifying_until:
                conn.state = "available"
            for t in conn.tunnels:
                key = self.peer(t.outside_ip) if self.peer is not None else None
                up = (now >= t.replacing_until and t.startup_action == "start" and t.outside_ip not in self.held_down
                      and key is not None and secrets.compare_digest(key.encode(), t.psk.encode()))
                status = "UP" if up else "DOWN"
                if status != t.status:
                    t.status, t.last_change = status, now

    # -- HTTP -----------------------------------------------------------------------------------------
    def route_of(self, req: Request) -> str:
        action = dict(parse_qsl(req.body.decode("utf-8", "replace"))).get("Action", "")
        return f"ec2.{action}" if action in ROUTES else "ec2.other"

    def handle(self, req: Request, route: str) -> Response:
        params = dict(parse_qsl(req.body.decode("utf-8", "replace"), keep_blank_values=True))
        denied = self._authenticate(req)
        if denied is not None:
            return denied
        action = params.get("Action", "")
        if req.method != "POST" or route == "ec2.other":
            return error(400, "InvalidAction", f"The action {action or '(none)'} is not valid for this web service.")
        if params.get("Version") != VERSION:
            return error(400, "InvalidParameterValue", f"Unsupported API version {params.get('Version')!r}")
        if action in self.denied:
            return error(403, "UnauthorizedOperation", f"You are not authorized to perform: ec2:{action}.")
        self._advance()
        if action == "DescribeVpnConnections":
            return self._describe(params)
        return self._modify(params)

    def fault_response(self, fault: Fault) -> Response:
        code, _, message = (fault.message or "Unavailable|The service is unavailable.").partition("|")
        return error(fault.status, code, message)

    def _authenticate(self, req: Request) -> Response | None:
        """SigV4, checked with botocore's own signer against the configured credentials."""
        header = req.headers.get("authorization", "")
        m = AUTH_RE.match(header)
        if m is None:
            return error(401, "AuthFailure", "AWS was not able to validate the provided access credentials "
                                             "(no SigV4 Authorization header)")
        key_id, date, region, service, signed, signature = m.groups()
        if not secrets.compare_digest(key_id.encode(), self.access_key.encode()):
            return error(401, "AuthFailure", "AWS was not able to validate the provided access credentials")
        stamp = req.headers.get("x-amz-date", "")
        if service != "ec2" or region != self.region or not stamp.startswith(date):
            return error(401, "AuthFailure", f"Credential should be scoped to a valid region ({self.region}) and "
                                             "service ec2")
        host = req.headers.get("host", "localhost")
        aws_req = AWSRequest(method=req.method, url=f"http://{host}{req.path}", data=req.body,
                             headers={k: v for k, v in req.headers.items()})
        aws_req.context["timestamp"] = stamp
        verifier = _Verifier(Credentials(self.access_key, self.secret_key), "ec2", self.region, signed.split(";"))
        expected = verifier.signature(verifier.string_to_sign(aws_req, verifier.canonical_request(aws_req)), aws_req)
        if not secrets.compare_digest(expected.encode(), signature.encode()):
            return error(403, "SignatureDoesNotMatch", "The request signature we calculated does not match the "
                                                       "signature you provided.")
        return None

    def _describe(self, params: dict[str, str]) -> Response:
        wanted = [v for k, v in sorted(params.items(), key=lambda kv: _index(kv[0]))
                  if re.fullmatch(r"VpnConnectionId\.\d+", k)]
        missing = [w for w in wanted if w not in self.connections]
        if missing:
            return error(400, "InvalidVpnConnectionID.NotFound", f"The vpnConnection ID '{missing[0]}' does not exist")
        conns = [self.connections[w] for w in wanted] if wanted else list(self.connections.values())
        root = _root("DescribeVpnConnectionsResponse")
        items = ET.SubElement(root, "vpnConnectionSet")
        for conn in conns:
            _connection(ET.SubElement(items, "item"), conn)
        return _xml(root)

    def _modify(self, params: dict[str, str]) -> Response:
        conn_id = params.get("VpnConnectionId", "")
        ip = params.get("VpnTunnelOutsideIpAddress", "")
        psk = params.get("TunnelOptions.PreSharedKey")
        if not conn_id or not ip:
            return error(400, "MissingParameter", "The request must contain the parameter VpnConnectionId and "
                                                  "VpnTunnelOutsideIpAddress")
        conn = self.connections.get(conn_id)
        if conn is None:
            return error(400, "InvalidVpnConnectionID.NotFound", f"The vpnConnection ID '{conn_id}' does not exist")
        tunnel = next((t for t in conn.tunnels if t.outside_ip == ip), None)
        if tunnel is None:
            return error(400, "InvalidParameterValue", f"The VPN tunnel outside IP address {ip} is not valid for "
                                                       f"{conn_id}")
        if psk is not None and not PSK_RE.match(psk):
            return error(400, "InvalidParameterValue", "Invalid value for PreSharedKey. Allowed characters are "
                                                       "alphanumeric characters, periods (.), and underscores (_). "
                                                       "Must be between 8 and 64 characters in length and cannot "
                                                       "start with zero (0).")
        if conn.state != "available":
            return error(400, "IncorrectState", f"The VPN connection {conn_id} is in the {conn.state} state; it "
                                                "must be available to modify its tunnel options")
        now = self.clock()
        if psk is not None:
            tunnel.psk = psk
            self.history.append(psk)
        conn.state, conn.modifying_until = "modifying", now + self.replacement
        tunnel.replacing_until = now + self.replacement
        self.modifications.append(Modification(now, conn_id, ip, hashlib.sha256((psk or "").encode()).hexdigest()[:12]))
        self._advance()
        root = _root("ModifyVpnTunnelOptionsResponse")
        _connection(ET.SubElement(root, "vpnConnection"), conn)
        return _xml(root)

    # -- control ----------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            self._advance()
            return {"region": self.region, "replacement": self.replacement, "request_counts": dict(self.counts),
                    "connections": {c.id: {"state": c.state, "tunnels": {
                        t.outside_ip: {"status": t.status, "key": hashlib.sha256(t.psk.encode()).hexdigest()[:12]}
                        for t in c.tunnels}} for c in self.connections.values()}}

    def control(self, op: str, args: dict[str, Any]) -> Any:
        own: dict[str, Callable[..., Any]] = {
            "refuse_next": self.refuse_next, "throttle_next": self.throttle_next,
            "server_error_next": self.server_error_next, "hold_down": self.hold_down, "deny": self.deny,
            "clear": self.clear,
        }
        if op in own:
            return own[op](**args)
        return self._shared_control(op, args)


class _Verifier(SigV4Auth):  # type: ignore[misc]
    """botocore's SigV4 signer, made to sign exactly the headers the client said it signed."""

    def __init__(self, credentials: Credentials, service: str, region: str, signed: list[str]) -> None:
        super().__init__(credentials, service, region)
        self._signed = signed

    def headers_to_sign(self, request: AWSRequest) -> HTTPHeaders:
        out = HTTPHeaders()
        for name in self._signed:
            if name in request.headers:
                out[name] = request.headers[name]
        return out


def _index(key: str) -> int:
    tail = key.rsplit(".", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _root(name: str) -> ET.Element:
    root = ET.Element(name, {"xmlns": NAMESPACE})
    ET.SubElement(root, "requestId").text = str(uuid.uuid4())
    return root


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(ts))


def _connection(el: ET.Element, conn: SimConnection) -> None:
    """One VpnConnection, elements named by the service model's locationName."""
    ET.SubElement(el, "vpnConnectionId").text = conn.id
    ET.SubElement(el, "state").text = conn.state
    ET.SubElement(el, "type").text = "ipsec.1"
    ET.SubElement(el, "customerGatewayId").text = "cgw-" + conn.id[4:]
    ET.SubElement(el, "vpnGatewayId").text = "vgw-" + conn.id[4:]
    ET.SubElement(el, "category").text = "VPN"
    options = ET.SubElement(el, "options")
    ET.SubElement(options, "staticRoutesOnly").text = "false"
    tunnel_set = ET.SubElement(options, "tunnelOptionSet")
    for t in conn.tunnels:
        item = ET.SubElement(tunnel_set, "item")
        ET.SubElement(item, "outsideIpAddress").text = t.outside_ip
        ET.SubElement(item, "preSharedKey").text = t.psk
        ET.SubElement(item, "startupAction").text = t.startup_action
        ET.SubElement(item, "dpdTimeoutAction").text = "clear"
        ikes = ET.SubElement(item, "ikeVersionSet")
        ET.SubElement(ET.SubElement(ikes, "item"), "value").text = "ikev2"
    telemetry = ET.SubElement(el, "vgwTelemetry")
    for t in conn.tunnels:
        item = ET.SubElement(telemetry, "item")
        ET.SubElement(item, "outsideIpAddress").text = t.outside_ip
        ET.SubElement(item, "status").text = t.status
        ET.SubElement(item, "lastStatusChange").text = _iso(t.last_change)
        ET.SubElement(item, "statusMessage").text = "" if t.status == "UP" else "IPSEC IS DOWN"
        ET.SubElement(item, "acceptedRouteCount").text = "0"


def _xml(root: ET.Element, status: int = 200) -> Response:
    return Response(status, b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="utf-8"),
                    [XML_CT])


def error(status: int, code: str, message: str) -> Response:
    """EC2's error document."""
    root = ET.Element("Response")
    err = ET.SubElement(ET.SubElement(root, "Errors"), "Error")
    ET.SubElement(err, "Code").text = code
    ET.SubElement(err, "Message").text = message
    ET.SubElement(root, "RequestID").text = str(uuid.uuid4())
    return _xml(root, status)


def couple(aws: AwsSim, cloudflare: CloudflareSim, account_id: str) -> None:
    """Make ``aws`` judge a tunnel UP by the key the Cloudflare simulator holds for the tunnel whose
    customer_endpoint is the AWS tunnel's outside address (a fresh IKE authentication succeeds only
    when both ends hold the same key)."""
    def peer(outside_ip: str) -> str | None:
        with cloudflare.lock:
            for t in cloudflare.accounts.get(account_id, {}).values():
                if t.customer_endpoint == outside_ip:
                    return t.psk
        return None

    aws.peer = peer


def attach(aws: AwsSim, cloudflare: CloudflareSim, account_id: str, tunnel_ids: list[str],
           startup_action: str = "start") -> list[str]:
    """Terminate these Cloudflare tunnels on AWS, two per VPN connection (in order): each Cloudflare
    tunnel's customer_endpoint becomes its AWS tunnel's outside address, and the AWS tunnel starts on
    the key Cloudflare holds, so it is UP. Returns the connection ids."""
    couple(aws, cloudflare, account_id)
    ids = []
    for i in range(0, len(tunnel_ids), 2):
        pair = tunnel_ids[i:i + 2]
        keys = [cloudflare.psk_of(account_id, t) or "Aunset" + secrets.token_hex(8) for t in pair]
        with aws.lock:
            ips = [str(ipaddress.ip_address("198.51.100.0") + next(aws._ips)) for _ in range(2)]
        for tid, ip in zip(pair, ips, strict=False):
            cloudflare.set_endpoints(account_id, tid, customer_endpoint=ip)
        while len(keys) < 2:
            keys.append("A" + secrets.token_urlsafe(24).replace("-", "."))
        ids.append(aws.add_connection((ips[0], ips[1]), (keys[0], keys[1]), startup_action))
    return ids
