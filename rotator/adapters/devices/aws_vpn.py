"""The ``aws_vpn`` device: AWS Site-to-Site VPN tunnels, through boto3 (docs/design.md section 10).

AWS documentation followed (EC2 API reference and the Site-to-Site VPN user guide):

- ModifyVpnTunnelOptions (https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_ModifyVpnTunnelOptions.html):
  changes one tunnel's options, here only ``TunnelOptions.PreSharedKey``; one tunnel at a time.
  The connection is ``modifying`` while AWS replaces the tunnel endpoint, and a connection that is
  ``modifying`` refuses another modification with ``IncorrectState``.
- ModifyVpnTunnelOptionsSpecification
  (https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_ModifyVpnTunnelOptionsSpecification.html):
  the key "Allowed characters are alphanumeric characters, periods (.), and underscores (_). Must be
  between 8 and 64 characters in length and cannot start with zero (0)" -> KEY_RULES.
- DescribeVpnConnections (https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_DescribeVpnConnections.html):
  each connection's ``State`` (pending | available | deleting | deleted; ``modifying`` during a
  modification), ``Options.TunnelOptions[]`` (``OutsideIpAddress``, ``PreSharedKey`` unless the key
  is kept in Secrets Manager) and ``VgwTelemetry[]``.
- VgwTelemetry (https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_VgwTelemetry.html):
  ``Status`` UP | DOWN, ``LastStatusChange`` "updated when changes in IKE (Phase 1), IPSec
  (Phase 2), or BGP status are detected", ``OutsideIpAddress``.
- Tunnel initiation options (https://docs.aws.amazon.com/vpn/latest/s2svpn/initiate-vpn-tunnels.html):
  by default the customer gateway must initiate IKE; Cloudflare never does, so each tunnel's
  startup action must be ``start`` (AWS initiates). The README says so.

Behaviour:

- Match: the AWS tunnel whose ``OutsideIpAddress`` is the Cloudflare tunnel's ``customer_endpoint``,
  among ``vpn_connection_ids`` (default: every connection the credentials see in ``region``). The two
  tunnels of one VPN connection are the redundant pair (``pair_of``).
- deliver / rollback: read the current key first; a tunnel that already holds the key is left alone
  (a repeated deliver must not replace the tunnel again); else ``ModifyVpnTunnelOptions``, at most
  one per connection in a call. The call returns once AWS accepted the modification (quick, under
  the lease); verify follows the replacement.
- verify: poll DescribeVpnConnections to ``verify_timeout`` until the connection is ``available`` and
  the tunnel's telemetry is UP with ``LastStatusChange`` in a later second than the deliver (EC2
  reports whole seconds), or UP on the key where the deliver found it already held. DOWN on an
  available connection at the deadline: FAILED (both ends are rolled back); still modifying, or no
  answer: UNKNOWN (the key stays pending).
- Errors, one table (``classify``): throttling, 5xx and timeouts of a modification are UNKNOWN (AWS
  may have accepted it); a call that never reached AWS, ``InvalidVpnConnectionID.NotFound``,
  ``UnauthorizedOperation``, ``AuthFailure`` and validation errors are FAILED, with a one-line
  redacted reason naming the fix.
- Credentials: boto3's standard chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/
  ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, an instance or pod role). Endpoint: botocore's own
  ``AWS_ENDPOINT_URL_EC2`` / ``AWS_ENDPOINT_URL``. botocore's retries are off: every call has one
  attempt bounded by ``connect_timeout`` + ``read_timeout``, and no call starts unless it can end
  before the device call's deadline; reads are retried here, within that deadline.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import math
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from rotator.adapters.devices._common import (
    DeviceBase,
    DeviceSpec,
    Fields,
    batch_keys,
    every,
    holds,
    match_endpoint,
    one_line,
)
from rotator.model import TunnelInfo
from rotator.psk import ALNUM
from rotator.rotation.ports import DeviceResult, DeviceStatus, DeviceTunnel, KeyRules
from rotator.secret import Secret

KIND = "aws_vpn"
KEY_RULES = KeyRules(8, 64, ALNUM + "._", "0", "AWS: 8-64 characters of A-Z a-z 0-9 . _, not starting with 0")
INTERRUPTS = True  # AWS replaces the tunnel endpoint: the tunnel is down for minutes
PROOF = "vendor_status"
EXTRA_COMMON_KEYS = ("verify_timeout",)

REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$")
VPN_ID_RE = re.compile(r"^vpn-[0-9a-f]{8,17}$")
CONNECT_TIMEOUT = 5.0
MIN_POLL, MAX_POLL = 0.25, 15.0

# The one table of EC2 error codes (https://docs.aws.amazon.com/AWSEC2/latest/APIReference/errors-overview.html):
# code -> the fix, for errors that say the request was refused (nothing changed).
REFUSED: dict[str, str] = {
    "InvalidVpnConnectionID.NotFound": "check the device's region and vpn_connection_ids",
    "UnauthorizedOperation": "grant ec2:DescribeVpnConnections and ec2:ModifyVpnTunnelOptions (README, aws_vpn)",
    "AuthFailure": "check the AWS credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE / the instance role)",
    "InvalidClientTokenId": "check the AWS credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE / the instance role)",
    "SignatureDoesNotMatch": "check AWS_SECRET_ACCESS_KEY",
    "ExpiredToken": "refresh the AWS session credentials",
    "IncorrectState": "the VPN connection is busy (modifying); the tunnel is rotated in a later run",
    "InvalidParameterValue": "the key or the tunnel address was refused; check the PSK policy and the tunnel",
    "InvalidParameter": "the request was refused as invalid; check the PSK policy and the tunnel",
    "InvalidParameterCombination": "the request was refused as invalid; check the tunnel's options",
    "MissingParameter": "the request was refused as incomplete",
    "OptInRequired": "enable the region for the account",
    "Blocked": "the account is blocked; contact AWS support",
}
# code -> transient: the request may or may not have been acted on (a modification stays unknown).
TRANSIENT = frozenset({"RequestLimitExceeded", "Throttling", "ThrottlingException", "InternalError",
                       "InternalFailure", "ServiceUnavailable", "Unavailable", "RequestTimeout"})


@dataclass(frozen=True)
class AwsVpnSettings:
    region: str
    vpn_connection_ids: tuple[str, ...] = ()

    def masked(self) -> dict[str, object]:
        return {"region": self.region, "vpn_connection_ids": list(self.vpn_connection_ids) or "all",
                "credentials": "the standard AWS chain", "endpoint": _endpoint() or "<AWS>"}


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_EC2") or os.environ.get("AWS_ENDPOINT_URL")


def parse_settings(f: Fields) -> AwsVpnSettings:
    region = f.text("region", required=True)
    if not REGION_RE.match(region):
        raise f.fail("region", f"{region!r} is not an AWS region", "e.g. eu-west-1")
    ids = f.texts("vpn_connection_ids")
    for i, vpn in enumerate(ids):
        if not VPN_ID_RE.match(vpn):
            raise f.fail(f"vpn_connection_ids[{i}]", f"{vpn!r} is not a VPN connection id", "e.g. vpn-0abc12345def67890")
    if len(set(ids)) != len(ids):
        raise f.fail("vpn_connection_ids", "lists a connection twice", "list each VPN connection once")
    return AwsVpnSettings(region, tuple(ids))


def secrets(settings: AwsVpnSettings) -> list[Secret]:
    """The AWS credentials come from the standard chain, not the settings; those in the environment
    are handed to the log redactor all the same."""
    return [Secret(v) for k in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN") if (v := os.environ.get(k))]


def build(spec: DeviceSpec) -> AwsVpnDevice:
    s = spec.settings
    assert isinstance(s, AwsVpnSettings)
    return AwsVpnDevice(spec.name, s.region, connection_ids=s.vpn_connection_ids, timeout=spec.timeout,
                        verify_timeout=spec.verify_timeout or 1200.0, verifies=spec.verify,
                        concurrency=spec.concurrency)


def make_client(region: str, timeout: float) -> Any:
    """An EC2 client from the standard credential chain and botocore's endpoint resolution
    (AWS_ENDPOINT_URL_EC2 / AWS_ENDPOINT_URL), one attempt per call, bounded in time."""
    connect = min(CONNECT_TIMEOUT, timeout / 4)
    config = botocore.config.Config(connect_timeout=connect, read_timeout=max(1.0, timeout / 2 - connect),
                                    retries={"total_max_attempts": 1, "mode": "standard"},
                                    max_pool_connections=32, user_agent_extra="psk-rotator")
    return boto3.session.Session().client("ec2", region_name=region, config=config)


# -- what DescribeVpnConnections says ---------------------------------------------------------------

@dataclass(frozen=True)
class AwsTunnel:
    connection_id: str
    state: str  # the connection's
    outside_ip: str
    psk: str | None  # None: not returned (kept in Secrets Manager)
    status: str | None  # telemetry UP | DOWN
    last_change: float | None  # UNIX seconds
    message: str = ""

    @property
    def up(self) -> bool:
        return self.state == "available" and self.status == "UP"


def _timestamp(value: Any) -> float | None:
    if isinstance(value, datetime.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=datetime.UTC)).timestamp()
    return None


def parse_connections(answer: Any) -> dict[str, AwsTunnel]:
    """Outside address -> tunnel, from a DescribeVpnConnections answer (botocore-parsed). Raises
    ValueError for an answer of the wrong shape."""
    if not isinstance(answer, dict) or not isinstance(answer.get("VpnConnections"), list):
        raise ValueError("DescribeVpnConnections answered without a VpnConnections list")
    out: dict[str, AwsTunnel] = {}
    for conn in answer["VpnConnections"]:
        if not isinstance(conn, dict) or not isinstance(conn.get("VpnConnectionId"), str):
            raise ValueError("DescribeVpnConnections answered a connection without an id")
        if conn.get("State") in ("deleted", "deleting"):
            continue
        telemetry = {t.get("OutsideIpAddress"): t for t in conn.get("VgwTelemetry") or [] if isinstance(t, dict)}
        for option in (conn.get("Options") or {}).get("TunnelOptions") or []:
            ip = option.get("OutsideIpAddress") if isinstance(option, dict) else None
            if not isinstance(ip, str):
                continue
            tel = telemetry.get(ip, {})
            psk = option.get("PreSharedKey")
            out[ip] = AwsTunnel(conn["VpnConnectionId"], str(conn.get("State")), ip,
                                psk if isinstance(psk, str) else None, tel.get("Status"),
                                _timestamp(tel.get("LastStatusChange")), str(tel.get("StatusMessage") or ""))
    return out


def classify(exc: BaseException, changes: bool) -> tuple[DeviceStatus, str]:
    """The one table: a botocore error -> (status, reason naming the fix). ``changes``: the call
    would change a key, so an answer that may hide an accepted change is UNKNOWN."""
    maybe = DeviceStatus.UNKNOWN if changes else DeviceStatus.FAILED
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {}) if isinstance(exc.response, dict) else {}
        code = str(error.get("Code") or "Unknown")
        status = int((exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
        message = str(error.get("Message") or "")
        if code in REFUSED:
            return DeviceStatus.FAILED, f"AWS refused it ({code}: {message}); {REFUSED[code]}"
        if code in TRANSIENT or status >= 500:
            return maybe, (f"AWS answered {code} (HTTP {status}): it may have accepted the change; "
                           "the key stays pending" if changes else f"AWS answered {code} (HTTP {status}); retry later")
        return DeviceStatus.FAILED, f"AWS refused it ({code}: {message})"
    if isinstance(exc, botocore.exceptions.ConnectTimeoutError | botocore.exceptions.EndpointConnectionError):
        return DeviceStatus.FAILED, f"AWS could not be reached ({type(exc).__name__}); check the network and " \
                                    "AWS_ENDPOINT_URL_EC2"
    if isinstance(exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError):
        return DeviceStatus.FAILED, "no AWS credentials; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE " \
                                    "or give the host a role"
    if isinstance(exc, botocore.exceptions.ParamValidationError):
        return DeviceStatus.FAILED, "the request did not pass botocore's validation; check the PSK policy"
    if isinstance(exc, botocore.exceptions.ReadTimeoutError | botocore.exceptions.ConnectionClosedError):
        return maybe, f"no answer from AWS ({type(exc).__name__})" + ("; it may have accepted the change" if changes
                                                                      else "")
    if isinstance(exc, botocore.exceptions.BotoCoreError | ValueError):
        return maybe, f"unusable answer from AWS ({type(exc).__name__})"
    return maybe, f"the AWS call failed ({type(exc).__name__})"


@dataclass
class _Delivered:
    at: float  # UNIX time the modification was accepted (or found unnecessary)
    skipped: bool


@dataclass
class AwsVpnDevice(DeviceBase):
    """One AWS account and region (docs/design.md section 10). ``client``: an EC2 client (tests give
    one with ``endpoint_url``); ``clock``/``sleep``: for verify's polling."""

    name: str
    region: str
    connection_ids: tuple[str, ...] = ()
    timeout: float = 60.0
    verify_timeout: float | None = 1200.0
    verifies: bool = True
    concurrency: int = 16
    client: Any = None
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    poll_interval: float | None = None  # default: a fortieth of verify_timeout, within 0.25..15 s
    kind: str = KIND
    interrupts: bool = INTERRUPTS
    proof: str = PROOF
    key_rules: KeyRules = KEY_RULES
    _delivered: dict[tuple[str, str], _Delivered] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.client is None:
            self.client = make_client(self.region, self.timeout)

    def __repr__(self) -> str:
        return f"AwsVpnDevice(name={self.name!r}, region={self.region!r})"

    @property
    def looked_in(self) -> str:
        where = f"VPN connections {', '.join(self.connection_ids)}" if self.connection_ids else "the VPN connections"
        return f"{where} in {self.region}"

    # -- reading -----------------------------------------------------------------------------------
    def _bound(self) -> float:
        """Seconds one API call may take at most (connect + read)."""
        cfg = self.client.meta.config
        return float(cfg.connect_timeout or CONNECT_TIMEOUT) + float(cfg.read_timeout or 60)

    def describe(self, deadline: float) -> dict[str, AwsTunnel]:
        """Every tunnel this device may match; raises what botocore raises, or TimeoutError when no
        attempt could end before ``deadline`` (``time.monotonic()``). Throttling is retried within it."""
        kwargs: dict[str, Any] = {"VpnConnectionIds": list(self.connection_ids)} if self.connection_ids else {}
        last: BaseException = TimeoutError("no time left for DescribeVpnConnections before the deadline")
        for attempt in range(4):
            if deadline - time.monotonic() < min(self._bound(), 1.0):
                raise last
            try:
                return parse_connections(self.client.describe_vpn_connections(**kwargs))
            except botocore.exceptions.ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code"))
                if code not in TRANSIENT:
                    raise
                last = exc
            self.sleep(min(0.2 * 2 ** attempt, max(0.0, deadline - time.monotonic())))
        raise last

    def pair_of(self, account_id: str, tunnels: Sequence[TunnelInfo], *, deadline: float) -> dict[str, str]:
        """The two tunnels of one VPN connection are the redundant pair."""
        try:
            found = self.describe(deadline)
        except Exception:  # the engine falls back to pairs by endpoint; deliver still guards each connection
            return {}
        return {t.id: found[t.customer_endpoint].connection_id for t in tunnels
                if t.customer_endpoint and t.customer_endpoint in found}

    def tunnels_up(self, account_id: str, tunnels: Sequence[TunnelInfo], *, deadline: float) -> dict[str, bool]:
        try:
            found = self.describe(deadline)
        except Exception:  # not known: partner gating asks Cloudflare's health, else waits
            return {}
        # The telemetry alone: a partner's connection may be modifying another tunnel and still carry traffic.
        return {t.id: found[t.customer_endpoint].status == "UP" for t in tunnels
                if t.customer_endpoint and t.customer_endpoint in found}

    # -- deliver / rollback -------------------------------------------------------------------------
    def deliver(self, account_id: str, rotation_id: str, tunnels: Sequence[DeviceTunnel], *,
                deadline: float) -> dict[str, DeviceResult]:
        return self._set(account_id, tunnels, deadline, "deliver")

    def rollback(self, account_id: str, rotation_id: str, tunnels: Sequence[DeviceTunnel], *,
                 deadline: float) -> dict[str, DeviceResult]:
        return self._set(account_id, tunnels, deadline, "rollback")

    def _set(self, account_id: str, tunnels: Sequence[DeviceTunnel], deadline: float,
             action: str) -> dict[str, DeviceResult]:
        if not tunnels:
            return {}
        keys = batch_keys(tunnels)
        deadline = min(deadline, time.monotonic() + self.timeout)
        try:
            found = self.describe(deadline)
        except Exception as exc:  # nothing was sent: every tunnel of the call is FAILED
            reason = classify(exc, changes=False)[1]
            return every(tunnels, DeviceStatus.FAILED, one_line(f"reading the VPN connections failed: {reason}", keys))
        out: dict[str, DeviceResult] = {}
        todo: list[tuple[DeviceTunnel, AwsTunnel]] = []
        busy: dict[str, str] = {}  # connection -> the tunnel modified in this call
        for t in tunnels:
            match = match_endpoint(t, found, self.looked_in)
            if isinstance(match, DeviceResult):
                out[t.tunnel_id] = match
            elif holds(match.psk, t.psk):
                self._note(account_id, t, skipped=True)
                out[t.tunnel_id] = DeviceResult(DeviceStatus.OK)
            elif match.state != "available":
                out[t.tunnel_id] = DeviceResult(DeviceStatus.FAILED, f"VPN connection {match.connection_id} is "
                                                f"{match.state}, not available: nothing was changed; the tunnel is "
                                                "rotated in a later run")
            elif match.connection_id in busy:
                out[t.tunnel_id] = DeviceResult(DeviceStatus.FAILED, f"VPN connection {match.connection_id} is "
                                                f"being modified for tunnel {busy[match.connection_id]}: AWS takes "
                                                "one modification per connection; nothing was changed")
            else:
                busy[match.connection_id] = t.tunnel_name
                todo.append((t, match))
        with concurrent.futures.ThreadPoolExecutor(max(1, min(self.concurrency, len(todo) or 1)),
                                                   thread_name_prefix=f"aws-{self.name}") as pool:
            futures = {t.tunnel_id: pool.submit(self._modify, account_id, t, m, deadline, keys) for t, m in todo}
            for tid, future in futures.items():
                out[tid] = future.result()
        return out

    def _modify(self, account_id: str, t: DeviceTunnel, match: AwsTunnel, deadline: float,
                keys: Sequence[str]) -> DeviceResult:
        if deadline - time.monotonic() < self._bound():
            return DeviceResult(DeviceStatus.FAILED, "not sent: no time left before the device call's deadline")
        sent = self.clock()  # before the request: AWS cannot change the tunnel for it any earlier
        try:
            self.client.modify_vpn_tunnel_options(VpnConnectionId=match.connection_id,
                                                  VpnTunnelOutsideIpAddress=match.outside_ip,
                                                  TunnelOptions={"PreSharedKey": t.psk.reveal()})
        except Exception as exc:
            status, reason = classify(exc, changes=True)
            if status is not DeviceStatus.FAILED:
                self._note(account_id, t, skipped=False, at=sent)  # it may have landed: verify judges from then
            return DeviceResult(status, one_line(f"ModifyVpnTunnelOptions on {match.connection_id} "
                                                 f"({match.outside_ip}): {reason}", keys))
        self._note(account_id, t, skipped=False, at=sent)
        return DeviceResult(DeviceStatus.OK)

    def _note(self, account_id: str, t: DeviceTunnel, *, skipped: bool, at: float | None = None) -> None:
        with self._lock:
            self._delivered[(account_id, t.tunnel_id)] = _Delivered(self.clock() if at is None else at, skipped)

    # -- verify ---------------------------------------------------------------------------------------
    def verify(self, account_id: str, rotation_id: str, tunnels: Sequence[DeviceTunnel], *,
               deadline: float) -> dict[str, DeviceResult]:
        if not tunnels:
            return {}
        keys = batch_keys(tunnels)
        limit = self.verify_timeout or self.timeout
        deadline = min(deadline, time.monotonic() + limit)
        interval = self.poll_interval or min(MAX_POLL, max(MIN_POLL, limit / 40))
        with self._lock:
            since = {t.tunnel_id: self._delivered.get((account_id, t.tunnel_id)) for t in tunnels}
        out: dict[str, DeviceResult] = {}
        last: dict[str, AwsTunnel] = {}
        problem = "no answer from AWS"
        for _ in range(int(limit / interval) + 2):
            pending = [t for t in tunnels if t.tunnel_id not in out]
            if not pending:
                break
            try:
                found = self.describe(deadline)
            except Exception as exc:  # a read: keep polling until the deadline
                problem = classify(exc, changes=False)[1]
                found = {}
            for t in pending:
                aws = found.get(t.customer_endpoint or "")
                if aws is None:
                    continue
                last[t.tunnel_id] = aws
                verdict = self._judge(t, aws, since[t.tunnel_id])
                if verdict is not None:
                    out[t.tunnel_id] = verdict
            left = deadline - time.monotonic()
            if left <= 0 or len(out) == len(tunnels):
                break
            self.sleep(min(interval, left))
        for t in tunnels:
            if t.tunnel_id not in out:
                out[t.tunnel_id] = self._timed_out(t, last.get(t.tunnel_id), problem, limit)
        return {tid: DeviceResult(r.status, one_line(r.reason, keys) if r.reason else None) for tid, r in out.items()}

    @staticmethod
    def _judge(t: DeviceTunnel, aws: AwsTunnel, since: _Delivered | None) -> DeviceResult | None:
        if aws.psk is not None and not holds(aws.psk, t.psk):
            return DeviceResult(DeviceStatus.FAILED, f"the AWS tunnel {aws.outside_ip} of {aws.connection_id} does "
                                "not hold the key (changed outside the rotator?)")
        if not aws.up or aws.last_change is None:
            return None
        if since is None or since.skipped:
            return DeviceResult(DeviceStatus.OK)  # UP on the key it already held
        # LastStatusChange has whole seconds: the change must fall in a later second than the deliver.
        return DeviceResult(DeviceStatus.OK) if math.floor(aws.last_change) > math.floor(since.at) else None

    @staticmethod
    def _timed_out(t: DeviceTunnel, aws: AwsTunnel | None, problem: str, limit: float) -> DeviceResult:
        if aws is None:
            return DeviceResult(DeviceStatus.UNKNOWN, f"no status for the tunnel within {limit:.0f}s ({problem}); "
                                "the key stays pending")
        if aws.state != "available":
            return DeviceResult(DeviceStatus.UNKNOWN, f"VPN connection {aws.connection_id} still {aws.state} after "
                                f"{limit:.0f}s (verify_timeout); the key stays pending")
        if aws.status == "UP":
            return DeviceResult(DeviceStatus.FAILED, f"the AWS tunnel {aws.outside_ip} of {aws.connection_id} is UP, "
                                "but its last status change is not later than the deliver (EC2 reports whole "
                                f"seconds) within {limit:.0f}s (verify_timeout): no proof it runs on the new key")
        detail = f": {aws.message}" if aws.message else ""
        return DeviceResult(DeviceStatus.FAILED, f"the AWS tunnel {aws.outside_ip} of {aws.connection_id} is "
                            f"{aws.status or 'not reported'}, not UP on the new key within {limit:.0f}s "
                            f"(verify_timeout){detail}; check the tunnel's startup action is 'start'")

    def close(self) -> None:
        close = getattr(self.client, "close", None)
        if callable(close):
            close()
