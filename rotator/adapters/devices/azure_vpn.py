"""The ``azure_vpn`` device kind: Azure VPN Gateway site-to-site connections (docs/design.md section 10),
through azure-mgmt-network and azure-identity.

Which Azure connection a Cloudflare tunnel is. The Azure VPN gateway is the customer end of the
tunnel, so Cloudflare's ``customer_endpoint`` is the gateway's public IP (the connection's
``virtualNetworkGateway1`` -> its ``ipConfigurations[].publicIPAddress`` -> ``ipAddress``); Azure's
local network gateway stands for Cloudflare, so its ``gatewayIpAddress`` is the tunnel's
``cloudflare_endpoint`` (Cloudflare's Magic WAN guide for Azure; Azure's "Create a site-to-site VPN
connection" tutorial). Both tunnels of a redundant pair end on the same gateway address, so a
connection matches when both addresses do; a tunnel that matches none, or more than one, is
refused at deliver, and nothing is sent anywhere.

Actions (each safe to repeat):

- deliver / rollback: read the connection's key (``get_shared_key``); if it already holds the key,
  nothing is sent (a reconcile after a crash must not start a second update). Else wait for an
  update that is still running to end, then ``begin_set_shared_key`` and return once ARM accepted it
  (the long-running operation is followed by verify, not awaited under the lease).
- verify: wait until the connection is no longer updating and holds the key, ``begin_reset_connection``
  to force a fresh IKE negotiation (an established SA would survive a key change), follow the reset
  operation, then poll ``connectionStatus`` to ``verify_timeout``: ``Connected`` after the reset proves
  both ends hold the key (proof ``vendor_status``); ``NotConnected`` at the deadline fails it (both
  ends are rolled back); anything unclear is unknown (the key stays pending).

Does a key change interrupt the tunnel? Azure does not document whether an established SA outlives
a shared-key update; if the gateway renegotiates at once, it does so against Cloudflare's old key
(Cloudflare holds the new one only after the apply step) and the tunnel is down until the apply and
the next negotiation, and verify's reset takes it down briefly in any case. INTERRUPTS is therefore
true: the kit starts a tunnel only while its partner is up. (The fake renegotiates at once.)

Keys: Azure documents a connection's shared key as 1 to 128 letters and digits (the ``SharedKey``
parameter of Azure PowerShell's ``Set-AzureVNetGatewayKey``; the REST reference's Reset Shared Key
takes a ``keyLength`` of 1 to 128; ``ConnectionSharedKey`` itself sets no rule); the kind accepts
exactly that, so a PSK policy outside it is a config error.

Errors are mapped in one table (``classify``): what Azure refused for sure (401, 403 with the action
the role lacks, 404, 400, 429, a request never sent) is FAILED; what may have happened (5xx,
a lost or late answer, 409 ``AnotherOperationInProgress``: the running update may be ours) is
UNKNOWN, and a write that ended that way is read back once: the key there decides.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from rotator.adapters.devices._common import (
    DeviceBase,
    DeviceSpec,
    Fields,
    batch_keys,
    every,
    holds,
    one_line,
    poll,
)
from rotator.errors import ConfigError
from rotator.model import TunnelInfo
from rotator.psk import ALNUM
from rotator.rotation.ports import DeviceResult, DeviceStatus, DeviceTunnel, KeyRules
from rotator.secret import Secret

KIND = "azure_vpn"
INTERRUPTS = True
PROOF = "vendor_status"
EXTRA_COMMON_KEYS = ("verify_timeout",)
KEY_RULES = KeyRules(1, 128, ALNUM, "", "1-128 letters and digits (Azure's shared-key format)")

GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
RG_NAME = re.compile(r"^[-\w._()]{1,90}$")
CONNECTION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")
CLOUDS = {"public": "AZURE_PUBLIC_CLOUD", "usgov": "AZURE_US_GOVERNMENT", "china": "AZURE_CHINA_CLOUD"}
ROLE_HINT = "grant the identity the custom role of the README (azure_vpn)"
UPDATING = "Updating"
ADDRESS_TTL = 60.0


@dataclass(frozen=True)
class AzureVpnSettings:
    subscription_id: str
    resource_group: str
    connections: tuple[str, ...] = ()  # empty: every connection of the resource group
    cloud: str = "public"
    authority: str | None = None  # Microsoft Entra authority host or https URL (sovereign clouds, tests)
    arm_endpoint: str | None = None  # Azure Resource Manager URL (default: the cloud's)
    ca_file: str | None = None  # CA bundle for TLS to both (private endpoints, tests)
    poll_interval: float = 10.0

    def masked(self) -> dict[str, Any]:
        return {"subscription_id": self.subscription_id, "resource_group": self.resource_group,
                "connections": list(self.connections) or "all", "cloud": self.cloud,
                "authority": self.authority, "arm_endpoint": self.arm_endpoint, "ca_file": self.ca_file,
                "poll_interval": self.poll_interval}


def parse_settings(f: Fields) -> AzureVpnSettings:
    subscription = f.text("subscription_id", required=True)
    if not GUID.match(subscription):
        raise f.fail("subscription_id", f"{subscription!r} is not a subscription id",
                     "use the subscription's GUID (az account show --query id)")
    rg = f.text("resource_group", required=True)
    if not RG_NAME.match(rg) or rg.endswith("."):
        raise f.fail("resource_group", f"{rg!r} is not a resource group name",
                     "use the name of the resource group that holds the VPN connections")
    connections = f.texts("connections")
    for i, name in enumerate(connections):
        if not CONNECTION_NAME.match(name):
            raise ConfigError(f"{f.key('connections')}[{i}]: {name!r} is not a connection name",
                              "list the names of the Azure VPN connections (1-80 letters, digits, '_', '.', '-')")
    cloud = f.text("cloud", "public")
    if cloud not in CLOUDS:
        raise f.fail("cloud", f"unknown cloud {cloud!r}", f"use one of {', '.join(CLOUDS)}")
    authority = f.text("authority", "") or None
    if authority is not None and authority.startswith("http") and not authority.startswith("https://"):
        raise f.fail("authority", "must be an https URL or a host name", "e.g. login.microsoftonline.us")
    arm = f.text("arm_endpoint", "") or None
    if arm is not None and not arm.startswith("https://"):
        raise f.fail("arm_endpoint", "must be an https URL", "e.g. https://management.usgovcloudapi.net")
    ca_file = f.text("ca_file", "") or None
    if ca_file is not None and not os.path.isfile(ca_file):
        raise f.fail("ca_file", f"{ca_file} is not a readable file", "point it at a PEM CA bundle, or remove it")
    poll_interval = f.duration("poll_interval", "10s")
    return AzureVpnSettings(subscription, rg, tuple(connections), cloud, authority, arm.rstrip("/") if arm else None,
                            ca_file, poll_interval)


def secrets(settings: AzureVpnSettings) -> list[Secret]:
    """The settings hold no credential (azure-identity reads its own); the client secret of the
    standard environment variable is still one the redactor must know."""
    value = os.environ.get("AZURE_CLIENT_SECRET")
    return [Secret(value)] if value else []


def build(spec: DeviceSpec) -> AzureVpnDevice:
    settings = spec.settings
    assert isinstance(settings, AzureVpnSettings)
    return AzureVpnDevice(spec, settings)


# -- the one table of Azure errors ---------------------------------------------------------------------

class _Late(Exception):
    """No answer before the call's deadline."""


def classify(exc: BaseException, what: str) -> tuple[DeviceStatus, str]:
    """What an exception from the Azure SDK means for the action ``what`` ("set the shared key of
    connection X", ...): FAILED when Azure surely did nothing, UNKNOWN when it may have."""
    from azure.core.exceptions import (
        ClientAuthenticationError,
        DecodeError,
        HttpResponseError,
        ServiceRequestError,
        ServiceResponseError,
    )
    from azure.identity import CredentialUnavailableError

    if isinstance(exc, _Late):
        return DeviceStatus.UNKNOWN, f"no answer from Azure before the deadline to {what}; the call may still land"
    if isinstance(exc, CredentialUnavailableError):
        return DeviceStatus.FAILED, (f"no Azure credential to {what}: set AZURE_TENANT_ID, AZURE_CLIENT_ID and "
                                     "AZURE_CLIENT_SECRET, or use workload or managed identity")
    if isinstance(exc, ClientAuthenticationError) and exc.response is None:
        return DeviceStatus.FAILED, (f"could not get an Azure token to {what} ({_first_line(exc)}): check the "
                                     "AZURE_* identity settings and its secret")
    if isinstance(exc, DecodeError):
        return DeviceStatus.UNKNOWN, f"Azure answered something unreadable to {what}"
    if isinstance(exc, HttpResponseError):
        status = exc.status_code or 0
        code = getattr(getattr(exc, "error", None), "code", None) or ""
        message = getattr(getattr(exc, "error", None), "message", None) or exc.reason or ""
        detail = f"HTTP {status} {code}".strip()
        if status == 401:
            return DeviceStatus.FAILED, f"Azure refused the token to {what} ({detail}): check the identity"
        if status == 403:
            action = re.search(r"perform action '([^']+)'", message)
            needs = f"the action {action.group(1)}" if action else "the actions of the README's role"
            return DeviceStatus.FAILED, f"not authorized to {what} ({detail}): the identity needs {needs}; {ROLE_HINT}"
        if status == 404:
            return DeviceStatus.FAILED, (f"not found when trying to {what} ({detail}: {message[:160]}); check "
                                         "subscription_id, resource_group and connections")
        if status == 409:
            return DeviceStatus.UNKNOWN, (f"another operation is running on the connection, so Azure did not {what} "
                                          f"now ({detail}); it may be an earlier update of this key: it stays pending")
        if status == 429:
            return DeviceStatus.FAILED, f"Azure throttled the request to {what} ({detail}); it is tried again later"
        if status >= 500:
            return DeviceStatus.UNKNOWN, f"Azure failed to answer whether it did {what} ({detail})"
        return DeviceStatus.FAILED, f"Azure refused to {what} ({detail}: {message[:160]})"
    if isinstance(exc, ServiceRequestError):
        return DeviceStatus.FAILED, (f"could not reach Azure to {what} ({_first_line(exc)}); nothing was sent: "
                                     "check the network, arm_endpoint and ca_file")
    if isinstance(exc, ServiceResponseError):
        return DeviceStatus.UNKNOWN, f"the answer from Azure was lost while trying to {what} ({_first_line(exc)})"
    return DeviceStatus.UNKNOWN, f"unexpected error while trying to {what}: {type(exc).__name__}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


# -- the device ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Conn:
    name: str
    gateway: str  # the virtual network gateway's resource id (the pair key)
    customer_ips: tuple[str, ...]  # the gateway's public IPs
    cloudflare_ip: str | None  # the local network gateway's address
    status: str = "Unknown"  # connectionStatus when listed


@dataclass
class _Call:
    """One device call: its deadline and what it learnt of the connections."""

    deadline: float
    conns: list[_Conn] | None = None
    notes: dict[str, str] = field(default_factory=dict)


class AzureVpnDevice(DeviceBase):
    kind = KIND
    interrupts = INTERRUPTS
    proof = PROOF
    key_rules = KEY_RULES

    def __init__(self, spec: DeviceSpec, settings: AzureVpnSettings, *, client: Any = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        self.name = spec.name
        self.timeout = spec.timeout
        self.verify_timeout = spec.verify_timeout
        self.verifies = spec.verify
        self.settings = settings
        self.clock, self.sleep = clock, sleep
        # Built now, not under a call's deadline: importing the SDK takes a while; no request is sent yet.
        self._client = client if client is not None else _network_client(settings)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=spec.concurrency, thread_name_prefix=f"azure-{spec.name}")
        # Addresses of gateways, public IPs and local network gateways by resource id, for ADDRESS_TTL
        # seconds: a run asks for the same ones call after call, and they change only when the
        # customer re-plumbs a connection. The connections themselves are listed on every call.
        self._addresses: dict[str, tuple[float, Any]] = {}

    # -- the SDK, built once ---------------------------------------------------------------------------
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = _network_client(self.settings)
            return self._client

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            if self._client is not None and hasattr(self._client, "close"):
                self._client.close()
                self._client = None

    def _ops(self) -> Any:
        return self.client().virtual_network_gateway_connections

    def _kw(self, deadline: float) -> dict[str, Any]:
        """Per-request bounds: no read waits past the deadline, retries stop at it."""
        left = max(0.05, deadline - self.clock())
        return {"connection_timeout": min(left, 10.0), "read_timeout": left, "timeout": left}

    def _run(self, fn: Callable[[], Any], deadline: float) -> Any:
        """Run one SDK call in the pool; raise ``_Late`` when it has not answered by the deadline."""
        future = self._pool.submit(fn)
        try:
            return future.result(timeout=max(0.0, deadline - self.clock()))
        except FutureTimeout:
            raise _Late() from None

    # -- matching a Cloudflare tunnel to a connection ------------------------------------------------------
    def _connections(self, deadline: float) -> list[_Conn]:
        s = self.settings
        ops, client = self._ops(), self.client()
        kw = self._kw(deadline)
        if s.connections:
            raw = [ops.get(s.resource_group, name, **kw) for name in s.connections]
        else:
            raw = list(ops.list(s.resource_group, **kw))
        out = []
        for c in raw:
            gw_id = (c.virtual_network_gateway1.id if c.virtual_network_gateway1 else "") or ""
            lgw_id = (c.local_network_gateway2.id if c.local_network_gateway2 else "") or ""
            if not gw_id or not lgw_id or _text(c.connection_type).lower() != "ipsec":
                continue  # VNet-to-VNet or ExpressRoute: never a Cloudflare tunnel
            ips = self._address(gw_id, lambda g=gw_id: self._gateway_ips(g, deadline))  # type: ignore[misc]
            lgw = self._address(lgw_id, lambda i=lgw_id: client.local_network_gateways.get(  # type: ignore[misc]
                *_rg_name(i), **self._kw(deadline)).gateway_ip_address)
            out.append(_Conn(c.name, gw_id.lower(), ips, lgw, _text(c.connection_status) or "Unknown"))
        return out

    def _address(self, resource_id: str, read: Callable[[], Any]) -> Any:
        now = self.clock()
        with self._lock:
            hit = self._addresses.get(resource_id.lower())
        if hit is not None and hit[0] > now:
            return hit[1]
        value = read()
        with self._lock:
            self._addresses[resource_id.lower()] = (now + ADDRESS_TTL, value)
        return value

    def _gateway_ips(self, gateway_id: str, deadline: float) -> tuple[str, ...]:
        client = self.client()
        gw = client.virtual_network_gateways.get(*_rg_name(gateway_id), **self._kw(deadline))
        addresses = []
        for conf in gw.ip_configurations or []:
            pip_id = conf.public_ip_address.id if conf.public_ip_address else None
            if pip_id:
                address = client.public_ip_addresses.get(*_rg_name(pip_id), **self._kw(deadline)).ip_address
                if address:
                    addresses.append(address)
        return tuple(addresses)

    def _match(self, tunnel: DeviceTunnel | TunnelInfo, conns: Sequence[_Conn]) -> _Conn | str:
        """The connection of ``tunnel``, or why there is none."""
        name = getattr(tunnel, "tunnel_name", None) or getattr(tunnel, "name", "?")
        where = (f"the connections {', '.join(self.settings.connections)}" if self.settings.connections
                 else f"resource group {self.settings.resource_group}")
        endpoint = tunnel.customer_endpoint
        if not endpoint:
            return (f"tunnel {name} has no customer_endpoint at Cloudflare, so no Azure connection in {where} can "
                    "be matched to it; set it to the Azure VPN gateway's public IP")
        on_gateway = [c for c in conns if endpoint in c.customer_ips]
        if not on_gateway:
            return (f"no Azure VPN connection in {where} is on a gateway with public IP {endpoint} (the "
                    f"customer_endpoint of {name}); check the device's resource_group and connections")
        found = [c for c in on_gateway if c.cloudflare_ip == tunnel.cloudflare_endpoint]
        if len(found) == 1:
            return found[0]
        if not found and len(on_gateway) == 1 and not tunnel.cloudflare_endpoint:
            return on_gateway[0]
        names = ", ".join(c.name for c in (found or on_gateway)[:4])
        if found:
            return (f"{len(found)} Azure connections ({names}) match tunnel {name} (gateway {endpoint}, local network "
                    f"gateway {tunnel.cloudflare_endpoint}); list the right one in connections")
        return (f"no connection on gateway {endpoint} ({names}) has a local network gateway at "
                f"{tunnel.cloudflare_endpoint} (the cloudflare_endpoint of {name}); set the local network "
                "gateway's IP address to the tunnel's Cloudflare endpoint")

    def _matched(self, tunnels: Sequence[DeviceTunnel], call: _Call, keys: list[str]
                 ) -> tuple[dict[str, _Conn], dict[str, DeviceResult]]:
        try:
            conns = self._run(lambda: self._connections(call.deadline), call.deadline)
        except Exception as exc:
            status, reason = classify(exc, "list the VPN connections")
            status = DeviceStatus.FAILED  # nothing was sent to any connection yet
            return {}, every(tunnels, status, one_line(reason, keys))
        found: dict[str, _Conn] = {}
        refused: dict[str, DeviceResult] = {}
        for t in tunnels:
            match = self._match(t, conns)
            if isinstance(match, str):
                refused[t.tunnel_id] = DeviceResult(DeviceStatus.FAILED, one_line(match, keys))
            else:
                found[t.tunnel_id] = match
        return found, refused

    # -- the port ----------------------------------------------------------------------------------------
    def deliver(self, account_id: str, rotation_id: str, tunnels: Sequence[DeviceTunnel], *,
                deadline: float) -> dict[str, DeviceResult]:
        return self._set_keys(tunnels, deadline, settle=False)

    def rollback(self, account_id: str, rotation_id: str, tunnels: Sequence[DeviceTunnel], *,
                 deadline: float) -> dict[str, DeviceResult]:
        # A rollback is done only once the connection holds the old key: after it the record forgets
        # the abandoned key, which the connection holds until the update ends (and for good if it fails).
        return self._set_keys(tunnels, deadline, settle=True)

    def verify(self, account_id: str, rotation_id: str, tunnels: Sequence[DeviceTunnel], *,
               deadline: float) -> dict[str, DeviceResult]:
        keys = batch_keys(tunnels)
        call = _Call(deadline)
        found, out = self._matched(tunnels, call, keys)
        out.update(self._each(tunnels, found, lambda t, c: self._verify_one(t, c, deadline, keys), deadline, keys))
        return out

    def tunnels_up(self, account_id: str, tunnels: Sequence[TunnelInfo], *, deadline: float) -> dict[str, bool]:
        """Azure's own view for partner gating: the matched connection is Connected (as listed)."""
        try:
            conns = self._run(lambda: self._connections(deadline), deadline)
        except Exception:
            return {}  # not known here: the kit asks Cloudflare's tunnel health
        out = {}
        for t in tunnels:
            match = self._match(t, conns)
            if not isinstance(match, str):
                out[t.id] = match.status == "Connected"
        return out

    def pair_of(self, account_id: str, tunnels: Sequence[TunnelInfo], *, deadline: float) -> dict[str, str]:
        """Partners end on the same Azure VPN gateway (an active-active one has two public IPs)."""
        try:
            conns = self._run(lambda: self._connections(deadline), deadline)
        except Exception:
            return super().pair_of(account_id, tunnels, deadline=deadline)
        out = super().pair_of(account_id, tunnels, deadline=deadline)
        for t in tunnels:
            match = self._match(t, conns)
            if not isinstance(match, str):
                out[t.id] = match.gateway
        return out

    # -- per tunnel ---------------------------------------------------------------------------------------
    def _each(self, tunnels: Sequence[DeviceTunnel], found: Mapping[str, _Conn],
              work: Callable[[DeviceTunnel, _Conn], DeviceResult], deadline: float,
              keys: list[str]) -> dict[str, DeviceResult]:
        futures = {t.tunnel_id: self._pool.submit(work, t, found[t.tunnel_id])
                   for t in tunnels if t.tunnel_id in found}
        out: dict[str, DeviceResult] = {}
        for tid, future in futures.items():
            try:
                out[tid] = future.result(timeout=max(0.0, deadline - self.clock()))
            except FutureTimeout:
                out[tid] = DeviceResult(DeviceStatus.UNKNOWN, "no answer from Azure before the call's deadline")
            except Exception as exc:  # a bug, not an Azure answer: the key may or may not be there
                out[tid] = DeviceResult(DeviceStatus.UNKNOWN, one_line(f"{type(exc).__name__}: {exc}", keys))
        return out

    def _set_keys(self, tunnels: Sequence[DeviceTunnel], deadline: float, *, settle: bool) -> dict[str, DeviceResult]:
        keys = batch_keys(tunnels)
        call = _Call(deadline)
        found, out = self._matched(tunnels, call, keys)
        out.update(self._each(tunnels, found, lambda t, c: self._set_one(t, c, deadline, keys, settle), deadline,
                              keys))
        return out

    def _status(self, name: str, deadline: float) -> tuple[str, str]:
        conn = self._ops().get(self.settings.resource_group, name, **self._kw(deadline))
        return _text(conn.connection_status) or "Unknown", _text(conn.provisioning_state)

    def _held(self, name: str, deadline: float) -> str | None:
        return self._ops().get_shared_key(self.settings.resource_group, name, **self._kw(deadline)).value  # type: ignore[no-any-return]

    def _wait_not_updating(self, name: str, deadline: float) -> DeviceResult | None:
        """Wait for an update still running on the connection to end; UNKNOWN if it does not by the deadline."""
        def check() -> DeviceResult | None:
            return None if self._status(name, deadline)[1] == UPDATING else DeviceResult(DeviceStatus.OK)

        result = poll(check, deadline - 0.5, interval=self.settings.poll_interval, sleep=self.sleep, clock=self.clock,
                      on_timeout=lambda: DeviceResult(DeviceStatus.UNKNOWN, f"connection {name} is still updating "
                                                      "(an earlier change of its key may be running)"))
        return None if result.ok else result

    def _set_one(self, t: DeviceTunnel, c: _Conn, deadline: float, keys: list[str], settle: bool) -> DeviceResult:
        what = f"set the shared key of connection {c.name}"
        try:
            current = self._held(c.name, deadline)
        except Exception as exc:
            status, reason = classify(exc, f"read the shared key of connection {c.name}")
            return DeviceResult(DeviceStatus.FAILED, one_line(reason + "; nothing was changed", keys))
        if holds(current, t.psk):
            return DeviceResult(DeviceStatus.OK, f"connection {c.name} already holds the key; nothing sent")
        try:
            busy = self._wait_not_updating(c.name, deadline)
            if busy is not None:
                return DeviceResult(busy.status, one_line(busy.reason or "", keys))
            self._ops().begin_set_shared_key(self.settings.resource_group, c.name, {"value": t.psk.reveal()},
                                             polling=False, **self._kw(deadline))
        except Exception as exc:
            status, reason = classify(exc, what)
            if status is DeviceStatus.UNKNOWN and not isinstance(exc, _Late):
                status, reason = self._read_back(t, c, deadline, reason)
            return DeviceResult(status, one_line(reason, keys))
        if settle:
            return self._until_held(t, c, deadline, keys)
        return DeviceResult(DeviceStatus.OK, f"Azure accepted the new key for connection {c.name}; verify follows it")

    def _until_held(self, t: DeviceTunnel, c: _Conn, deadline: float, keys: list[str]) -> DeviceResult:
        """Follow an accepted update to its end: OK once the connection holds the key."""
        def check() -> DeviceResult | None:
            try:
                if self._status(c.name, deadline)[1] == UPDATING:
                    return None
                if holds(self._held(c.name, deadline), t.psk):
                    return DeviceResult(DeviceStatus.OK)
            except Exception:
                return None  # tried again until the deadline
            return DeviceResult(DeviceStatus.FAILED, f"the update of connection {c.name} ended without the key "
                                "(it failed at Azure); see the connection's activity log")

        return poll(check, deadline - 0.5, interval=self.settings.poll_interval, sleep=self.sleep, clock=self.clock,
                    on_timeout=lambda: DeviceResult(DeviceStatus.UNKNOWN, one_line(
                        f"the update of connection {c.name} had not ended by the deadline", keys)))

    def _read_back(self, t: DeviceTunnel, c: _Conn, deadline: float, reason: str) -> tuple[DeviceStatus, str]:
        """After an unclear answer to a write, the key the connection holds decides."""
        try:
            # The status first, then the key: an update that ends between the two reads is then seen in
            # the key. Read the other way round, an update ending in between looked like "no update
            # runs and the key is not there", and a key Azure may hold would have been unstaged.
            updating = self._status(c.name, deadline)[1] == UPDATING
            held = self._held(c.name, deadline)
        except Exception:
            return DeviceStatus.UNKNOWN, reason
        if holds(held, t.psk):
            return DeviceStatus.OK, f"{reason}; read back: connection {c.name} holds the key"
        if not updating:  # no update runs and the key is not there: the write did not happen
            return DeviceStatus.FAILED, f"{reason}; read back: connection {c.name} still holds the key it had"
        # An update runs (perhaps this one, perhaps an earlier one of this key): its end decides.
        ended = self._until_held(t, c, deadline, [])
        if ended.ok:
            return DeviceStatus.OK, f"{reason}; read back after the running update: connection {c.name} holds the key"
        return DeviceStatus.UNKNOWN, reason

    def _verify_one(self, t: DeviceTunnel, c: _Conn, deadline: float, keys: list[str]) -> DeviceResult:
        interval = self.settings.poll_interval
        state: dict[str, Any] = {"reset": None, "status": "Unknown"}

        def check() -> DeviceResult | None:
            try:
                return self._verify_step(t, c, deadline, state)
            except Exception as exc:
                state["error"] = classify(exc, f"read connection {c.name}")[1]
                return None  # a poll that failed is tried again until the deadline

        def on_timeout() -> DeviceResult:
            if state["reset"] == "done" and state["status"] == "NotConnected":
                return DeviceResult(DeviceStatus.FAILED, f"connection {c.name} did not come up on the new key "
                                    "after a reset (NotConnected at verify_timeout)")
            seen = f"; last error: {state['error']}" if state.get("error") else ""
            return DeviceResult(DeviceStatus.UNKNOWN, one_line(
                f"connection {c.name} was {state['status']} at verify_timeout (reset {state['reset'] or 'not sent'})"
                + seen, keys))

        return poll(check, deadline - 0.5, interval=interval, sleep=self.sleep, clock=self.clock,
                    on_timeout=on_timeout)

    def _verify_step(self, t: DeviceTunnel, c: _Conn, deadline: float, state: dict[str, Any]) -> DeviceResult | None:
        rg = self.settings.resource_group
        status, provisioning = self._status(c.name, deadline)
        state["status"] = status
        if state["reset"] is None:
            if provisioning == UPDATING:
                return None  # the key's update is still running
            if not holds(self._held(c.name, deadline), t.psk):
                return DeviceResult(DeviceStatus.FAILED, f"connection {c.name} does not hold the new key (its update "
                                    "failed or was replaced); see the connection's activity log")
            from azure.core.exceptions import HttpResponseError

            seen: list[Any] = []
            try:  # the operation's status URL comes in the 202's Azure-AsyncOperation header
                self._ops().begin_reset_connection(rg, c.name, polling=False, raw_response_hook=seen.append,
                                                   **self._kw(deadline))
            except HttpResponseError as exc:
                if exc.status_code == 409:
                    return None  # another operation first; try the reset again at the next poll
                raise
            headers = seen[-1].http_response.headers if seen else {}
            state["operation"] = headers.get("Azure-AsyncOperation")
            state["reset"] = "sent"
            return None
        if state["reset"] == "sent":
            if state.get("operation"):
                from azure.core.rest import HttpRequest

                answer = self.client().send_request(HttpRequest("GET", state["operation"]), **self._kw(deadline))
                op = answer.json().get("status", "") if answer.status_code == 200 else ""
                if op.lower() == "failed":
                    return DeviceResult(DeviceStatus.UNKNOWN, f"the reset of connection {c.name} failed at Azure")
                if op.lower() != "succeeded":
                    return None
            elif provisioning == UPDATING:
                return None
            state["reset"] = "done"
            return None
        if status == "Connected":
            return DeviceResult(DeviceStatus.OK)
        return None


def _text(value: Any) -> str:
    """An SDK enum (a str enum whose str() is its Python name) or a plain string, as ARM sent it."""
    return str(getattr(value, "value", value) or "")


def _rg_name(resource_id: str) -> tuple[str, str]:
    """(resource group, name) of an ARM resource id."""
    parts = resource_id.strip("/").split("/")
    lower = [p.lower() for p in parts]
    rg = parts[lower.index("resourcegroups") + 1] if "resourcegroups" in lower else ""
    return rg, parts[-1]


def _network_client(s: AzureVpnSettings) -> Any:
    """azure-mgmt-network's client with azure-identity's DefaultAzureCredential: the standard
    AZURE_* variables, workload identity, managed identity or the Azure CLI's login (the developer
    tools that would prompt or read editor caches are left out of a service)."""
    from azure.core import AzureClouds
    from azure.identity import DefaultAzureCredential
    from azure.mgmt.network import NetworkManagementClient

    logging.getLogger("azure").setLevel(logging.WARNING)  # the SDK logs every request at INFO
    verify: Any = s.ca_file or True
    credential_kw: dict[str, Any] = {"connection_verify": verify}
    if s.authority:
        # An authority named in the config is one the operator knows: MSAL's instance discovery
        # (a call to login.microsoftonline.com) is for hosts it must vouch for (azure-identity docs).
        credential_kw.update(authority=s.authority, disable_instance_discovery=True)
    credential = DefaultAzureCredential(
        exclude_shared_token_cache_credential=True, exclude_visual_studio_code_credential=True,
        exclude_powershell_credential=True, exclude_developer_cli_credential=True,
        exclude_interactive_browser_credential=True, **credential_kw)
    client_kw: dict[str, Any] = {"cloud_setting": AzureClouds(CLOUDS[s.cloud]), "connection_verify": verify,
                                 "polling_interval": s.poll_interval, "retry_total": 3, "retry_backoff_factor": 0.5,
                                 "retry_backoff_max": 4}
    if s.arm_endpoint:
        client_kw.update(base_url=s.arm_endpoint, credential_scopes=[f"{s.arm_endpoint}/.default"])
    return _Closing(NetworkManagementClient(credential, s.subscription_id, **client_kw), credential)


class _Closing:
    """The client, closing its credential with it."""

    def __init__(self, client: Any, credential: Any) -> None:
        self._client, self._credential = client, credential

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def close(self) -> None:
        self._client.close()
        self._credential.close()
