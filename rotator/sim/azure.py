"""A fake of the Azure Resource Manager endpoints the ``azure_vpn`` kind uses, and of the Microsoft
Entra token endpoint its credential asks for a token, served over HTTPS on loopback.

Wire format and error codes follow the Azure REST reference (the azure-rest-api-specs examples for
``VirtualNetworkGatewayConnections`` Get/List/SetSharedKey/GetSharedKey/ResetConnection, api-version
2024-05-01 and later) and what azure-mgmt-network's generated operations accept (status codes per
operation, ``Azure-AsyncOperation``/``Location`` polling); the conformance tests in
``tests/devices/test_azure_sim.py`` drive it with the Azure SDK itself (azure-mgmt-network with
azure-identity's ``ClientSecretCredential``). Where the reference is silent, the choice is marked
UNCONFIRMED.

Endpoints (one server; ARM paths are matched case-insensitively, as ARM does):

- ``GET /{tenant}/v2.0/.well-known/openid-configuration`` and ``POST /{tenant}/oauth2/v2.0/token``
  (client-credentials grant): what MSAL needs when the credential's ``authority`` is this server
  and instance discovery is off.
- ``GET .../resourceGroups/{rg}/providers/Microsoft.Network/connections`` (``nextLink`` paging),
  ``GET .../connections/{name}``, ``GET`` and ``PUT .../connections/{name}/sharedkey`` (the PUT is a
  long-running operation: 201 with ``Azure-AsyncOperation``), ``POST .../connections/{name}/resetconnection``
  (202 with ``Azure-AsyncOperation`` and ``Location``), the operation status and result URLs, and
  ``GET`` of the ``virtualNetworkGateways``, ``publicIPAddresses`` and ``localNetworkGateways`` a
  connection refers to (a connection names its gateways by id only, so matching a Cloudflare tunnel
  needs them).

Which address is which (Cloudflare's Azure integration guide and Azure's site-to-site tutorial): the
Azure VPN gateway is the *customer* end of a Cloudflare tunnel, so Cloudflare's ``customer_endpoint`` is
the gateway's public IP (``virtualNetworkGateway1`` -> ``ipConfigurations[].publicIPAddress`` ->
``ipAddress``); Azure's *local network gateway* stands for the other end, so its ``gatewayIpAddress``
is Cloudflare's anycast ``cloudflare_endpoint``. Both Cloudflare tunnels of a redundant pair share the
Azure gateway's address and differ in the Cloudflare endpoint: one local network gateway and one
connection per Cloudflare tunnel.

Coupling to the Cloudflare simulator: ``peer(account_id, tunnel_id)`` is the key Cloudflare holds for
the connection's tunnel. A connection is ``Connected`` only while an IKE SA authenticated with its key
is up; changing its key or resetting it drops the SA and starts a negotiation that succeeds, after
``renegotiate`` seconds of the injected clock, only if the peer holds the same key (else
``NotConnected``, and the gateway retries, as an initiator does). An established SA survives a key
change at the peer (docs/design.md section 1). Long-running operations finish ``operation_seconds``
after they start.

Bearer tokens are checked against the tokens this fake issued, and each client has the set of ARM
actions its role grants (``deny`` takes one away: 403 ``AuthorizationFailed`` naming the action).
Fault injection: the shared faults of ``sim/base.py`` on route names ``azure.token``,
``azure.discovery``, ``azure.list``, ``azure.connection``, ``azure.gateway``, ``azure.public_ip``,
``azure.local_gateway``, ``azure.sharedkey_get``, ``azure.sharedkey_set``, ``azure.reset``,
``azure.operation``, ``azure.other``; and ``fail_operations`` (the next operation ends ``Failed``),
``hang_operations`` (it never finishes), ``busy`` (another operation holds the connection: 409
``AnotherOperationInProgress``), ``fail_negotiation`` (the connection never comes up). ``scan_secrets``
returns every key, client secret and token it holds, for the secret scan.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote

from rotator.sim.base import Fault, Request, Response, SimApp
from rotator.sim.cloudflare import CloudflareSim

JSON_CT = (b"content-type", b"application/json; charset=utf-8")
API_VERSION_RE = re.compile(r"^\d{4}-\d{2}-\d{2}(-preview)?$")
NET = r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.Network/"
RESOURCE_RE = re.compile(
    NET + r"(?P<type>connections|virtualNetworkGateways|publicIPAddresses|localNetworkGateways)"
    r"(?:/(?P<name>[^/]+)(?:/(?P<action>sharedkey|resetconnection))?)?$", re.IGNORECASE)
OPERATION_RE = re.compile(r"^/subscriptions/(?P<sub>[^/]+)/providers/Microsoft\.Network/locations/(?P<loc>[^/]+)/"
                          r"(?P<kind>operations|operationResults)/(?P<id>[^/]+)$", re.IGNORECASE)
DISCOVERY_RE = re.compile(r"^/(?P<tenant>[^/]+)/v2\.0/\.well-known/openid-configuration$")
TOKEN_RE = re.compile(r"^/(?P<tenant>[^/]+)/oauth2/v2\.0/token$")
KEY_MAX = 128  # the longest shared key Azure documents

# The ARM action each route needs (Azure's resource provider operations list, Microsoft.Network).
ACTIONS = {
    "azure.list": "Microsoft.Network/connections/read",
    "azure.connection": "Microsoft.Network/connections/read",
    "azure.sharedkey_get": "Microsoft.Network/connections/sharedKey/read",
    "azure.sharedkey_set": "Microsoft.Network/connections/sharedKey/write",
    "azure.reset": "Microsoft.Network/connections/resetconnection/action",
    "azure.gateway": "Microsoft.Network/virtualNetworkGateways/read",
    "azure.public_ip": "Microsoft.Network/publicIPAddresses/read",
    "azure.local_gateway": "Microsoft.Network/localNetworkGateways/read",
}
ROLE_ACTIONS = frozenset(ACTIONS.values())


@dataclass(slots=True)
class Client:
    tenant: str
    client_id: str
    secret: str
    actions: set[str] = field(default_factory=lambda: set(ROLE_ACTIONS))


@dataclass(slots=True)
class Operation:
    id: str
    kind: str  # "sharedkey" or "reset"
    connection: str
    done_at: float  # math.inf: never finishes
    value: str | None = None  # the key a sharedkey operation sets
    fail: tuple[str, str] | None = None  # (code, message) it ends with
    status: str = "InProgress"
    ours: bool = True  # False: an operation started elsewhere (``busy``)


@dataclass(slots=True)
class Connection:
    name: str
    gateway: str
    local_gateway: str
    key: str
    tunnel: tuple[str, str] | None  # (account id, tunnel id) of the Cloudflare tunnel it is
    location: str
    sa_key: str | None = None  # the key the current IKE SA was authenticated with (None: no SA)
    attempt_at: float = 0.0  # when the current negotiation attempt started
    failed: bool = False  # the last negotiation attempt failed
    op: Operation | None = None
    keys_set: list[str] = field(default_factory=list)  # every key a completed operation set, in order
    resets: int = 0
    never_up: bool = False


class AzureSim(SimApp):
    def __init__(self, subscription_id: str | None = None, resource_group: str = "rg-vpn", *,
                 peer: Callable[[str, str], str | None] | None = None, clock: Callable[[], float] = time.monotonic,
                 renegotiate: float = 0.0, operation_seconds: float = 0.0, retry_after: str = "10",
                 location: str = "westeurope", page_size: int = 50) -> None:
        super().__init__()
        self.subscription_id = subscription_id or str(uuid.uuid4())
        self.resource_groups = {resource_group.lower(): resource_group}
        self.resource_group = resource_group
        self.peer = peer
        self.clock = clock
        self.renegotiate = renegotiate
        self.operation_seconds = operation_seconds
        self.retry_after = retry_after  # ARM answers whole seconds; tests may ask for less
        self.location = location
        self.page_size = page_size
        self.clients: dict[str, Client] = {}
        self.tokens: dict[str, str] = {}  # access token -> client id
        self.revoked: set[str] = set()
        self.connections: dict[str, Connection] = {}  # lower-case name -> connection
        self.gateways: dict[str, list[str]] = {}  # gateway name -> its public IP resource names
        self.public_ips: dict[str, str] = {}  # public IP resource name -> address
        self.local_gateways: dict[str, str] = {}  # local network gateway name -> gatewayIpAddress
        self.operations: dict[str, Operation] = {}
        self.writes: list[tuple[str, str]] = []  # (connection, route) of every accepted change
        self._op_faults: list[list[Any]] = []  # [connection or None, "fail"|"hang", code, message, remaining]

    # -- setting up ------------------------------------------------------------------------------
    def add_client(self, tenant: str | None = None, client_id: str | None = None) -> Client:
        with self.lock:
            client = Client(tenant or str(uuid.uuid4()), client_id or str(uuid.uuid4()), secrets.token_urlsafe(30))
            self.clients[client.client_id] = client
            return client

    def add_gateway(self, name: str, *addresses: str) -> None:
        """A VPN gateway with a public IP resource per address (two for an active-active gateway)."""
        with self.lock:
            self.gateways[name] = []
            for i, address in enumerate(addresses):
                pip = f"{name}-pip{i + 1}"
                self.public_ips[pip] = address
                self.gateways[name].append(pip)

    def add_connection(self, name: str, gateway: str, cloudflare_endpoint: str, *, key: str | None = None,
                       tunnel: tuple[str, str] | None = None, local_gateway: str | None = None) -> Connection:
        """A site-to-site connection of ``gateway`` to a local network gateway whose address is
        ``cloudflare_endpoint``, up on ``key`` (default: a fresh one, as Azure generates)."""
        with self.lock:
            if gateway not in self.gateways:
                raise ValueError(f"unknown gateway {gateway!r}")
            lgw = local_gateway or f"lgw-{name}"
            self.local_gateways[lgw] = cloudflare_endpoint
            key = key if key is not None else secrets.token_urlsafe(24)
            conn = Connection(name, gateway, lgw, key, tunnel, self.location, sa_key=key, attempt_at=self.clock())
            self.connections[name.lower()] = conn
            return conn

    def add_resource_group(self, name: str) -> None:
        with self.lock:
            self.resource_groups[name.lower()] = name

    # -- inspection -------------------------------------------------------------------------------
    def key_of(self, name: str) -> str:
        with self.lock:
            conn = self.connections[name.lower()]
            self._settle(conn, self.clock())
            return conn.key

    def held(self, account_id: str, tunnel_id: str) -> str | None:
        """The key the connection of this Cloudflare tunnel holds (for invariant checks)."""
        with self.lock:
            for conn in self.connections.values():
                if conn.tunnel == (account_id, tunnel_id):
                    self._settle(conn, self.clock())
                    return conn.key
            return None

    def status_of(self, name: str) -> str:
        with self.lock:
            return self._status(self.connections[name.lower()], self.clock())

    def keys_set(self, name: str) -> list[str]:
        with self.lock:
            conn = self.connections[name.lower()]
            self._settle(conn, self.clock())
            return list(conn.keys_set)

    def scan_secrets(self) -> list[str]:
        """Every key, client secret and access token this fake holds or was sent."""
        with self.lock:
            out = [c.secret for c in self.clients.values()] + list(self.tokens)
            for conn in self.connections.values():
                out += [conn.key, *conn.keys_set] + ([conn.sa_key] if conn.sa_key else [])
            out += [op.value for op in self.operations.values() if op.value]
            return out

    def snapshot(self) -> dict[str, Any]:
        import hashlib

        now = self.clock()
        with self.lock:
            return {
                "subscription_id": self.subscription_id, "resource_groups": sorted(self.resource_groups.values()),
                "request_counts": dict(self.counts),
                "connections": {c.name: {"status": self._status(c, now),
                                         "key": hashlib.sha256(c.key.encode()).hexdigest()[:12],
                                         "keys_set": len(c.keys_set), "resets": c.resets,
                                         "operation": c.op.status if c.op else None}
                                for c in self.connections.values()},
            }

    # -- faults -------------------------------------------------------------------------------------
    def deny(self, client_id: str, action: str) -> None:
        """Take ``action`` (e.g. ``Microsoft.Network/connections/sharedKey/write``) out of the client's role."""
        with self.lock:
            self.clients[client_id].actions.discard(action)

    def restore(self, client_id: str) -> None:
        """Give the client every action of its role again (undo ``deny``)."""
        with self.lock:
            self.clients[client_id].actions = set(ROLE_ACTIONS)

    def updating(self) -> list[str]:
        """The connections an operation still runs on."""
        with self.lock:
            now = self.clock()
            for conn in self.connections.values():
                self._settle(conn, now)
            return [c.name for c in self.connections.values() if c.op is not None]

    def revoke_tokens(self) -> None:
        with self.lock:
            self.revoked.update(self.tokens)

    def fail_operations(self, connection: str | None = None, count: int = 1, code: str = "InternalServerError",
                        message: str = "An error occurred.") -> None:
        """The next ``count`` operations (on ``connection``, or any) end ``Failed``; nothing changes."""
        with self.lock:
            self._op_faults.append([connection, "fail", code, message, count])

    def hang_operations(self, connection: str | None = None, count: int = 1) -> None:
        """The next ``count`` operations stay ``InProgress`` for ever; nothing changes."""
        with self.lock:
            self._op_faults.append([connection, "hang", "", "", count])

    def busy(self, connection: str, seconds: float = math.inf) -> None:
        """Another client's operation holds the connection for ``seconds``: writes answer 409."""
        with self.lock:
            conn = self.connections[connection.lower()]
            self._settle(conn, self.clock())
            if conn.op is not None:
                raise ValueError(f"an operation is already running on {connection}")
            op = Operation(str(uuid.uuid4()), "other", conn.name, self.clock() + seconds, ours=False)
            self.operations[op.id] = op
            conn.op = op

    def fail_negotiation(self, connections: Iterable[str]) -> None:
        """These connections never come up again (e.g. an IKE proposal mismatch)."""
        with self.lock:
            for name in connections:
                conn = self.connections[name.lower()]
                conn.never_up = True

    def finish_operations(self) -> None:
        """Let every hung operation finish now (as if Azure caught up)."""
        with self.lock:
            now = self.clock()
            for op in self.operations.values():
                if op.status == "InProgress" and op.done_at == math.inf:
                    op.done_at = now

    def clear(self) -> None:
        with self.lock:
            self._op_faults.clear()
            self.faults.clear()
            for conn in self.connections.values():
                conn.never_up = False

    def control(self, op: str, args: dict[str, Any]) -> Any:
        own: dict[str, Callable[..., Any]] = {
            "deny": self.deny, "revoke_tokens": self.revoke_tokens, "fail_operations": self.fail_operations,
            "hang_operations": self.hang_operations, "busy": self.busy, "fail_negotiation": self.fail_negotiation,
            "finish_operations": self.finish_operations, "clear": self.clear,
        }
        if op in own:
            return own[op](**args)
        return self._shared_control(op, args)

    def _take_op_fault(self, connection: str) -> list[Any] | None:
        for entry in self._op_faults:
            if entry[0] is None or entry[0].lower() == connection.lower():
                entry[-1] -= 1
                if entry[-1] <= 0:
                    self._op_faults.remove(entry)
                return entry
        return None

    # -- the connection's life ------------------------------------------------------------------------
    def _settle(self, conn: Connection, now: float) -> None:
        """Bring a connection up to ``now``: finish its operation, run its negotiation."""
        op = conn.op
        if op is not None and now >= op.done_at:
            conn.op = None
            if op.fail is not None:
                op.status = "Failed"
            else:
                op.status = "Succeeded"
                if op.kind == "sharedkey" and op.value is not None:
                    conn.key = op.value
                    conn.keys_set.append(op.value)
                if op.kind in ("sharedkey", "reset"):
                    conn.sa_key, conn.attempt_at, conn.failed = None, op.done_at, False
                    conn.resets += op.kind == "reset"
        if conn.sa_key is None and now >= conn.attempt_at + self.renegotiate:
            peer = self.peer(*conn.tunnel) if self.peer is not None and conn.tunnel is not None else conn.key
            if peer == conn.key and not conn.never_up:
                conn.sa_key, conn.failed = conn.key, False
            else:
                conn.failed, conn.attempt_at = True, now  # the gateway tries again

    def _status(self, conn: Connection, now: float) -> str:
        self._settle(conn, now)
        if conn.sa_key is not None:
            return "Connected"
        return "NotConnected" if conn.failed else "Connecting"

    # -- HTTP -----------------------------------------------------------------------------------------------
    def route_of(self, req: Request) -> str:
        if DISCOVERY_RE.match(req.path) and req.method == "GET":
            return "azure.discovery"
        if TOKEN_RE.match(req.path) and req.method == "POST":
            return "azure.token"
        if OPERATION_RE.match(req.path) and req.method == "GET":
            return "azure.operation"
        m = RESOURCE_RE.match(req.path)
        if m is None:
            return "azure.other"
        kind, name, action = m["type"].lower(), m["name"], (m["action"] or "").lower()
        table = {
            ("connections", False, "", "GET"): "azure.list",
            ("connections", True, "", "GET"): "azure.connection",
            ("connections", True, "sharedkey", "GET"): "azure.sharedkey_get",
            ("connections", True, "sharedkey", "PUT"): "azure.sharedkey_set",
            ("connections", True, "resetconnection", "POST"): "azure.reset",
            ("virtualnetworkgateways", True, "", "GET"): "azure.gateway",
            ("publicipaddresses", True, "", "GET"): "azure.public_ip",
            ("localnetworkgateways", True, "", "GET"): "azure.local_gateway",
        }
        return table.get((kind, name is not None, action, req.method), "azure.other")

    def fault_response(self, fault: Fault) -> Response:
        codes = {429: "TooManyRequests", 500: "InternalServerError", 502: "BadGateway", 503: "ServiceUnavailable",
                 504: "GatewayTimeout"}
        code = codes.get(fault.status, "InternalServerError" if fault.status >= 500 else "BadRequest")
        message = fault.message or ("The request is being throttled." if fault.status == 429
                                    else "The service is temporarily unavailable. Please try again later.")
        resp = _arm_error(fault.status, code, message)
        if fault.retry_after is not None or fault.status == 429:
            resp.headers.append((b"retry-after", str(fault.retry_after if fault.retry_after is not None else 1)
                                 .encode()))
        return resp

    def handle(self, req: Request, route: str) -> Response:
        base = f"https://{req.headers.get('host', 'localhost')}"
        if route == "azure.discovery":
            return self._discovery(req, base)
        if route == "azure.token":
            return self._token(req)
        denied = self._authenticate(req, route)
        if denied is not None:
            return denied
        if route == "azure.other":
            return _arm_error(404, "InvalidResourceType" if req.path.startswith("/subscriptions/") else "NotFound",
                              f"The resource type could not be found for {req.method} {req.path[:200]!r}.")
        version = req.query.get("api-version")
        if not version:
            return _arm_error(400, "MissingApiVersionParameter",
                              "The api-version query parameter (?api-version=) is required for all requests.")
        if not API_VERSION_RE.match(version):
            return _arm_error(400, "InvalidApiVersionParameter",
                              f"The api-version '{version[:40]}' is invalid. The supported versions are "
                              "'2024-05-01,2025-05-01,2026-03-01'.")
        if route == "azure.operation":
            return self._operation(req, base)
        m = RESOURCE_RE.match(req.path)
        assert m is not None
        if m["sub"].lower() != self.subscription_id.lower():
            return _arm_error(404, "SubscriptionNotFound", f"The subscription '{m['sub']}' could not be found.")
        if m["rg"].lower() not in self.resource_groups:
            return _arm_error(404, "ResourceGroupNotFound", f"Resource group '{m['rg']}' could not be found.")
        rg = self.resource_groups[m["rg"].lower()]
        now = self.clock()
        if route == "azure.list":
            return self._list(req, base, rg, now)
        name = m["name"]
        if route == "azure.gateway":
            return self._gateway(rg, name) if name in self.gateways else _not_found("virtualNetworkGateways", name, rg)
        if route == "azure.public_ip":
            return self._public_ip(rg, name) if name in self.public_ips else _not_found("publicIPAddresses", name, rg)
        if route == "azure.local_gateway":
            return (self._local_gateway(rg, name) if name in self.local_gateways
                    else _not_found("localNetworkGateways", name, rg))
        conn = self.connections.get(name.lower())
        if conn is None or rg != self.resource_group:
            return _not_found("connections", name, rg)
        if route == "azure.connection":
            return _json(200, self._connection_view(conn, rg, now))
        if route == "azure.sharedkey_get":
            self._settle(conn, now)
            return _json(200, {"id": "", "value": conn.key})
        if route == "azure.sharedkey_set":
            return self._set_key(req, base, conn, now)
        return self._reset(base, conn, now)

    # -- Microsoft Entra ---------------------------------------------------------------------------------
    def _tenant_known(self, tenant: str) -> bool:
        return any(c.tenant == tenant for c in self.clients.values())

    def _discovery(self, req: Request, base: str) -> Response:
        tenant = DISCOVERY_RE.match(req.path)["tenant"]  # type: ignore[index]
        if not self._tenant_known(tenant):
            return _aad_error(400, "invalid_tenant", f"AADSTS90002: Tenant '{tenant[:64]}' not found.", 90002)
        root = f"{base}/{tenant}"
        return _json(200, {
            "token_endpoint": f"{root}/oauth2/v2.0/token", "authorization_endpoint": f"{root}/oauth2/v2.0/authorize",
            "issuer": f"{root}/v2.0", "jwks_uri": f"{base}/{tenant}/discovery/v2.0/keys",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "subject_types_supported": ["pairwise"], "id_token_signing_alg_values_supported": ["RS256"],
            "tenant_region_scope": None, "cloud_instance_name": "microsoftonline.com",
        })

    def _token(self, req: Request) -> Response:
        tenant = TOKEN_RE.match(req.path)["tenant"]  # type: ignore[index]
        form = {k: v[0] for k, v in parse_qs(req.body.decode("utf-8", "replace")).items()}
        if not self._tenant_known(tenant):
            return _aad_error(400, "invalid_request", f"AADSTS90002: Tenant '{tenant[:64]}' not found.", 90002)
        if form.get("grant_type") != "client_credentials":
            return _aad_error(400, "unsupported_grant_type", "AADSTS70003: The app requested an unsupported grant "
                              "type.", 70003)
        client = self.clients.get(form.get("client_id", ""))
        if client is None or client.tenant != tenant:
            return _aad_error(400, "unauthorized_client", f"AADSTS700016: Application with identifier "
                              f"'{form.get('client_id', '')[:64]}' was not found in the directory '{tenant[:64]}'.",
                              700016)
        if not secrets.compare_digest(form.get("client_secret", ""), client.secret):
            return _aad_error(401, "invalid_client", "AADSTS7000215: Invalid client secret provided. Ensure the "
                              "secret being sent in the request is the client secret value, not the client secret "
                              f"ID, for a secret added to app '{client.client_id}'.", 7000215)
        if not form.get("scope", "").endswith("/.default"):
            return _aad_error(400, "invalid_scope", "AADSTS1002012: The provided value for scope is not valid. "
                              "Client credential flows must have a scope value with /.default suffixed to the "
                              "resource identifier (application ID URI).", 1002012)
        token = secrets.token_urlsafe(48)
        self.tokens[token] = client.client_id
        return _json(200, {"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": token})

    def _authenticate(self, req: Request, route: str) -> Response | None:
        header = req.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            return _unauthorized("AuthenticationFailed", "Authentication failed. The 'Authorization' header is "
                                 "missing.")
        if scheme.lower() != "bearer" or token not in self.tokens:
            return _unauthorized("InvalidAuthenticationToken", "The access token is invalid.")
        if token in self.revoked:
            return _unauthorized("ExpiredAuthenticationToken", "The access token expiry UTC time is earlier than "
                                 "current UTC time.")
        action = ACTIONS.get(route)
        client = self.clients[self.tokens[token]]
        if action is not None and action not in client.actions:
            scope = req.path[:300]
            return _arm_error(403, "AuthorizationFailed", f"The client '{client.client_id}' with object id "
                              f"'{client.client_id}' does not have authorization to perform action '{action}' over "
                              f"scope '{scope}' or the scope is invalid. If access was recently granted, please "
                              "refresh your credentials.")
        return None

    # -- ARM resources ------------------------------------------------------------------------------------
    def _id(self, rg: str, kind: str, name: str) -> str:
        return f"/subscriptions/{self.subscription_id}/resourceGroups/{rg}/providers/Microsoft.Network/{kind}/{name}"

    def _connection_view(self, conn: Connection, rg: str, now: float) -> dict[str, Any]:
        status = self._status(conn, now)
        return {
            "name": conn.name, "id": self._id(rg, "connections", conn.name),
            "etag": f'W/"{uuid.uuid5(uuid.NAMESPACE_URL, conn.name + conn.key)}"',
            "type": "Microsoft.Network/connections", "location": conn.location,
            "properties": {
                "provisioningState": "Updating" if conn.op is not None else "Succeeded",
                "resourceGuid": str(uuid.uuid5(uuid.NAMESPACE_URL, conn.name)),
                "virtualNetworkGateway1": {"id": self._id(rg, "virtualNetworkGateways", conn.gateway), "properties": {}},
                "localNetworkGateway2": {"id": self._id(rg, "localNetworkGateways", conn.local_gateway),
                                         "properties": {}},
                "connectionType": "IPsec", "connectionProtocol": "IKEv2", "routingWeight": 0, "dpdTimeoutSeconds": 45,
                # The reference's Get example carries the key too (connections/read shows it).
                "sharedKey": conn.key, "enableBgp": False, "useLocalAzureIpAddress": False,
                "usePolicyBasedTrafficSelectors": False, "ipsecPolicies": [], "trafficSelectorPolicies": [],
                "connectionStatus": status, "ingressBytesTransferred": 0, "egressBytesTransferred": 0,
                "connectionMode": "Default",
            },
        }

    def _list(self, req: Request, base: str, rg: str, now: float) -> Response:
        skip = req.query.get("$skiptoken", "0")
        start = int(skip) if skip.isdigit() else 0
        mine = [c for c in self.connections.values()] if rg == self.resource_group else []
        page = mine[start:start + self.page_size]
        body: dict[str, Any] = {"value": [self._connection_view(c, rg, now) for c in page]}
        if start + self.page_size < len(mine):
            body["nextLink"] = (f"{base}{req.path}?api-version={quote(req.query['api-version'])}"
                                f"&$skiptoken={start + self.page_size}")
        return _json(200, body)

    def _gateway(self, rg: str, name: str) -> Response:
        names = ["default", "activeActive"]
        configs = [{"name": names[min(i, 1)],
                    "id": self._id(rg, "virtualNetworkGateways", name) + f"/ipConfigurations/{names[min(i, 1)]}",
                    "properties": {"privateIPAllocationMethod": "Dynamic",
                                   "subnet": {"id": self._id(rg, "virtualNetworks", "vnet") + "/subnets/GatewaySubnet"},
                                   "publicIPAddress": {"id": self._id(rg, "publicIPAddresses", pip)},
                                   "provisioningState": "Succeeded"}}
                   for i, pip in enumerate(self.gateways[name])]
        return _json(200, {"name": name, "id": self._id(rg, "virtualNetworkGateways", name),
                           "type": "Microsoft.Network/virtualNetworkGateways", "location": self.location,
                           "properties": {"provisioningState": "Succeeded", "ipConfigurations": configs,
                                          "gatewayType": "Vpn", "vpnType": "RouteBased", "enableBgp": False,
                                          "activeActive": len(configs) > 1,
                                          "sku": {"name": "VpnGw2AZ", "tier": "VpnGw2AZ"}}})

    def _public_ip(self, rg: str, name: str) -> Response:
        return _json(200, {"name": name, "id": self._id(rg, "publicIPAddresses", name),
                           "type": "Microsoft.Network/publicIPAddresses", "location": self.location,
                           "sku": {"name": "Standard", "tier": "Regional"},
                           "properties": {"provisioningState": "Succeeded", "ipAddress": self.public_ips[name],
                                          "publicIPAddressVersion": "IPv4", "publicIPAllocationMethod": "Static"}})

    def _local_gateway(self, rg: str, name: str) -> Response:
        return _json(200, {"name": name, "id": self._id(rg, "localNetworkGateways", name),
                           "type": "Microsoft.Network/localNetworkGateways", "location": self.location,
                           "properties": {"provisioningState": "Succeeded",
                                          "gatewayIpAddress": self.local_gateways[name],
                                          "localNetworkAddressSpace": {"addressPrefixes": ["10.200.0.0/16"]}}})

    def _conflict(self, conn: Connection) -> Response | None:
        if conn.op is None:
            return None
        return _arm_error(409, "AnotherOperationInProgress",
                          f"Another operation on this or dependent resource is in progress. To retrieve status of "
                          f"the operation use uri: https://management.azure.com/subscriptions/{self.subscription_id}"
                          f"/providers/Microsoft.Network/locations/{conn.location}/operations/{conn.op.id}"
                          f"?api-version=2024-05-01.")

    def _start(self, kind: str, conn: Connection, now: float, value: str | None) -> Operation:
        op = Operation(str(uuid.uuid4()), kind, conn.name, now + self.operation_seconds, value)
        fault = self._take_op_fault(conn.name)
        if fault is not None and fault[1] == "fail":
            op.fail = (fault[2], fault[3])
        elif fault is not None:
            op.done_at = math.inf
        self.operations[op.id] = op
        conn.op = op
        self.writes.append((conn.name, f"azure.{kind}"))
        return op

    def _op_headers(self, base: str, op: Operation, version: str, location: bool) -> list[tuple[bytes, bytes]]:
        root = f"{base}/subscriptions/{self.subscription_id}/providers/Microsoft.Network/locations/{self.location}"
        headers = [(b"azure-asyncoperation", f"{root}/operations/{op.id}?api-version={version}".encode()),
                   (b"retry-after", self.retry_after.encode())]
        if location:
            headers.append((b"location", f"{root}/operationResults/{op.id}?api-version={version}".encode()))
        return headers

    def _set_key(self, req: Request, base: str, conn: Connection, now: float) -> Response:
        self._settle(conn, now)
        conflict = self._conflict(conn)
        if conflict is not None:
            return conflict
        try:
            doc = req.json()
        except ValueError:
            return _arm_error(400, "InvalidRequestFormat", "Cannot parse the request.")
        value = doc.get("value") if isinstance(doc, dict) else None
        if not isinstance(value, str) or not value:
            return _arm_error(400, "InvalidRequestFormat", "Cannot parse the request: 'value' must be a non-empty "
                              "string.")
        if len(value) > KEY_MAX or not all("!" <= c <= "~" for c in value):
            # UNCONFIRMED: the code and text Azure answers a key it refuses with.
            return _arm_error(400, "InvalidSharedKey", f"The shared key must be 1 to {KEY_MAX} printable ASCII "
                              "characters.")
        op = self._start("sharedkey", conn, now, value)
        self._settle(conn, now)  # an operation of no duration is done at once
        return Response(201, json.dumps({"id": "", "value": value}).encode(),
                        [JSON_CT, *self._op_headers(base, op, req.query["api-version"], location=False)])

    def _reset(self, base: str, conn: Connection, now: float) -> Response:
        self._settle(conn, now)
        conflict = self._conflict(conn)
        if conflict is not None:
            return conflict
        op = self._start("reset", conn, now, None)
        return Response(202, b"", self._op_headers(base, op, "2024-05-01", location=True))

    def _operation(self, req: Request, base: str) -> Response:
        m = OPERATION_RE.match(req.path)
        assert m is not None
        op = self.operations.get(m["id"])
        if op is None or m["sub"].lower() != self.subscription_id.lower():
            return _arm_error(404, "NotFound", f"Operation {m['id'][:64]} was not found.")
        conn = self.connections.get(op.connection.lower())
        if conn is not None:
            self._settle(conn, self.clock())
        if m["kind"].lower() == "operationresults":
            if op.status == "InProgress":
                return Response(202, b"", self._op_headers(base, op, req.query["api-version"], location=True))
            if op.status == "Failed" and op.fail is not None:
                return _arm_error(500, op.fail[0], op.fail[1])
            return Response(204)
        body: dict[str, Any] = {"name": op.id, "status": op.status}
        if op.status == "Failed" and op.fail is not None:
            body["error"] = {"code": op.fail[0], "message": op.fail[1]}
        headers = [JSON_CT]
        if op.status == "InProgress":
            headers.append((b"retry-after", self.retry_after.encode()))
        return Response(200, json.dumps(body).encode(), headers)


CF_ANYCAST = ("162.159.66.164", "172.64.242.10")  # the two Cloudflare endpoints of a redundant pair


def gateway_address(n: int) -> str:
    """The public IP of the n-th gateway ``attach`` makes: 198.18.0.0/15 (RFC 2544, for tests), apart
    from the documentation ranges the other simulators use."""
    return f"198.18.{n // 250}.{n % 250 + 1}"


def attach(azure: AzureSim, cloudflare: CloudflareSim, account_id: str, tunnel_ids: list[str]) -> list[str]:
    """Terminate these Cloudflare tunnels on Azure, two per VPN gateway (in order): each tunnel's
    customer_endpoint becomes its gateway's public IP, its cloudflare_endpoint its connection's local
    network gateway address, and the connection starts on the key Cloudflare holds, coupled to it
    (``peer``), so it is Connected. Returns the connection names."""
    azure.peer = cloudflare.psk_of
    names = []
    for i, tid in enumerate(tunnel_ids):
        gateway, address = f"vpngw-{i // 2}", gateway_address(i // 2)
        if i % 2 == 0:
            azure.add_gateway(gateway, address)
        cloudflare.set_endpoints(account_id, tid, customer_endpoint=address, cloudflare_endpoint=CF_ANYCAST[i % 2])
        key = cloudflare.psk_of(account_id, tid) or secrets.token_urlsafe(24)
        names.append(azure.add_connection(f"cf-{i}", gateway, CF_ANYCAST[i % 2], key=key,
                                          tunnel=(account_id, tid)).name)
    return names


def loopback_tls(workdir: str) -> tuple[str, str]:
    """A certificate authority and a certificate for 127.0.0.1 and localhost signed by it, made with
    trustme (azure-identity talks only to an https authority, and azure-core sends bearer tokens only
    over https): (the CA file a client trusts, the server's key and certificate chain file)."""
    import os

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_file, server_file = os.path.join(workdir, "azure-ca.pem"), os.path.join(workdir, "azure-server.pem")
    ca.cert_pem.write_to_path(ca_file)
    cert.private_key_and_cert_chain_pem.write_to_path(server_file)
    os.chmod(server_file, 0o600)
    return ca_file, server_file


def _json(status: int, obj: Any) -> Response:
    return Response(status, json.dumps(obj).encode(),
                    [JSON_CT, (b"x-ms-request-id", str(uuid.uuid4()).encode())])


def _arm_error(status: int, code: str, message: str) -> Response:
    return _json(status, {"error": {"code": code, "message": message}})


def _not_found(kind: str, name: str, rg: str) -> Response:
    return _arm_error(404, "ResourceNotFound", f"The Resource 'Microsoft.Network/{kind}/{name[:80]}' under resource "
                      f"group '{rg}' was not found. For more details please go to "
                      "https://aka.ms/ARMResourceNotFoundFix")


def _unauthorized(code: str, message: str) -> Response:
    resp = _arm_error(401, code, message)
    resp.headers.append((b"www-authenticate", b'Bearer authorization_uri="https://login.microsoftonline.com/common", '
                         b'error="invalid_token", error_description="The access token is invalid."'))
    return resp


def _aad_error(status: int, error: str, description: str, code: int) -> Response:
    return _json(status, {"error": error, "error_description": description, "error_codes": [code],
                          "timestamp": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
                          "trace_id": str(uuid.uuid4()), "correlation_id": str(uuid.uuid4())})
