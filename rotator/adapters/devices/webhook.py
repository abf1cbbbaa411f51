"""The ``webhook`` device: the JSON of docs/design.md section 9 as an HTTPS POST, signed.

Signature: HMAC-SHA256 with the key from ``secret_file`` over ``f"{timestamp}.{body}"``, sent as
``X-Rotator-Timestamp: <unix seconds>`` and ``X-Rotator-Signature: sha256=<hex>``. TLS is verified
(``cacert`` for a private CA); plain http is refused at config time except to a loopback address.
The receiver answers 2xx with the same optional ``{"results": {...}}`` as an exec hook's stdout;
a tunnel missing from it counts as done.

Outcomes: 4xx (and 3xx: redirects are not followed) -> FAILED, the device said no; 5xx, a timeout
or a connection lost after the request went out -> UNKNOWN (it may have acted); a connection that
never opened -> FAILED. ``WebhookReceiver`` is the receiving side's check (signature, replay window,
replayed signatures), for people writing a receiver in Python and for the simulated device.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import ssl
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlparse

import httpx
import structlog

from rotator import __version__
from rotator.adapters.devices._common import (
    ActionDevice,
    DeviceSpec,
    Fields,
    Garbage,
    batch_keys,
    every,
    one_line,
    parse_results,
    request_body,
    split,
    strangers_note,
    with_note,
)
from rotator.errors import ConfigError
from rotator.rotation.ports import DeviceResult, DeviceStatus, DeviceTunnel, KeyRules
from rotator.secret import Secret

log = structlog.get_logger("rotator.devices.webhook")

TIMESTAMP_HEADER = "X-Rotator-Timestamp"
SIGNATURE_HEADER = "X-Rotator-Signature"
MAX_ANSWER = 1 << 20  # bytes of a response body we read at most
DEFAULT_WINDOW = 300.0


KIND = "webhook"
KEY_RULES = KeyRules()  # the receiver's business: any printable ASCII key
INTERRUPTS = False
PROOF = "ike_reauth"


@dataclass(frozen=True)
class WebhookSettings:
    url: str
    secret: Secret
    secret_file: str
    cacert: str = ""

    def masked(self) -> dict[str, str]:
        return {"url": self.url, "secret_file": self.secret_file, "cacert": self.cacert or "<system>"}


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_url(url: str, key: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme not in ("https", "http") or not parsed.hostname:
        raise ConfigError(f"{key}: {url!r} is not an http(s) URL", "e.g. https://router.example.net/psk")
    if parsed.username or parsed.password:
        raise ConfigError(f"{key}: the URL carries credentials", "remove them: the body is signed with secret_file")
    if parsed.scheme == "http" and not is_loopback(parsed.hostname):
        raise ConfigError(f"{key}: plain http to {parsed.hostname} would send keys unencrypted",
                          "use https (plain http is accepted only on loopback)")
    return url


def parse_settings(f: Fields) -> WebhookSettings:
    url = check_url(f.text("url", required=True), f.key("url"))
    secret_file = f.text("secret_file", required=True)
    try:
        with open(secret_file, encoding="utf-8") as fh:
            secret = fh.read().strip()
    except OSError as exc:
        raise f.fail("secret_file", f"cannot read {secret_file} ({exc.strerror})",
                     "check the path and its permissions") from None
    if len(secret) < 16:
        raise f.fail("secret_file", f"{secret_file} holds {'no' if not secret else 'a too short'} signing key",
                     "write at least 16 random characters into it, e.g. openssl rand -hex 32")
    cacert = f.text("cacert", "")
    if cacert and not os.path.isfile(cacert):
        raise f.fail("cacert", f"{cacert} is not a file", "give the PEM file of the CA that signed the device's cert")
    return WebhookSettings(url, Secret(secret), secret_file, cacert)


def sign(secret: Secret | str | bytes, timestamp: str, body: bytes) -> str:
    key = secret.reveal().encode() if isinstance(secret, Secret) else \
        secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def build(spec: DeviceSpec) -> WebhookDevice:
    s = spec.settings
    assert isinstance(s, WebhookSettings)
    return WebhookDevice(spec.name, s.url, s.secret, timeout=spec.timeout, verify=spec.verify,
                         concurrency=spec.concurrency, cacert=s.cacert)


def secrets(settings: WebhookSettings) -> list[Secret]:
    return [settings.secret]


class WebhookDevice(ActionDevice):
    kind = "webhook"

    def __init__(self, name: str, url: str, secret: Secret, *, timeout: float = 60.0, verify: bool = True,
                 concurrency: int = 16, cacert: str = "", transport: httpx.BaseTransport | None = None) -> None:
        self.name = name
        self.url = url
        self.timeout = timeout
        self.verifies = verify
        self.concurrency = concurrency
        self._secret = secret
        self._recent: dict[str, int] = {}  # signatures sent in the current second
        self._lock = threading.Lock()
        tls = ssl.create_default_context(cafile=cacert) if cacert else True
        self._client = httpx.Client(verify=tls, transport=transport, follow_redirects=False,
                                    headers={"User-Agent": f"psk-rotator/{__version__}",
                                             "Content-Type": "application/json"})

    def __repr__(self) -> str:
        return f"WebhookDevice(name={self.name!r}, url={self.url!r}, secret=**redacted**)"

    def close(self) -> None:
        self._client.close()

    def call(self, action: str, account_id: str, rotation_id: str, tunnels: Sequence[DeviceTunnel],
             deadline: float) -> dict[str, DeviceResult]:
        """The batch as up to ``concurrency`` POSTs in parallel (the engine makes one call per batch;
        a device verifying tunnel after tunnel would otherwise take the batch's sum of times)."""
        if not tunnels:
            return {}
        keys = batch_keys(tunnels)
        end = min(deadline, time.monotonic() + self.timeout)
        parts = split(tunnels, self.concurrency)
        if len(parts) == 1:
            return self._post(action, account_id, rotation_id, tunnels, end, keys)
        results: dict[str, DeviceResult] = {}
        with ThreadPoolExecutor(max_workers=len(parts), thread_name_prefix=f"webhook-{self.name}") as pool:
            for answer in pool.map(lambda p: self._post(action, account_id, rotation_id, p, end, keys), parts):
                results.update(answer)
        return results

    def _post(self, action: str, account_id: str, rotation_id: str, tunnels: Sequence[DeviceTunnel], end: float,
              keys: list[str]) -> dict[str, DeviceResult]:
        budget = end - time.monotonic()
        if budget <= 0:
            return every(tunnels, DeviceStatus.FAILED, "not sent: no time left before the deadline")
        body = request_body(action, self.name, account_id, rotation_id, tunnels)
        headers = self._signed_headers(body, end)
        if headers is None:
            return every(tunnels, DeviceStatus.FAILED, "not sent: no time left before the deadline")
        try:
            with self._client.stream("POST", self.url, content=body, headers=headers,
                                     timeout=httpx.Timeout(budget)) as resp:
                answer = b""
                for chunk in resp.iter_bytes():
                    answer += chunk
                    if len(answer) > MAX_ANSWER:
                        return every(tunnels, DeviceStatus.UNKNOWN,
                                     f"answer larger than {MAX_ANSWER} bytes (HTTP {resp.status_code}): "
                                     "the device may hold the key")
                    if time.monotonic() > end:
                        raise httpx.ReadTimeout("deadline passed while reading the answer")
                status = resp.status_code
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol) as exc:
            return every(tunnels, DeviceStatus.FAILED, f"not delivered: cannot connect to {self.url} "
                                                       f"({one_line(str(exc) or type(exc).__name__, keys, 160)})")
        except httpx.TimeoutException:
            log.warning("device_webhook_timeout", device=self.name, action=action, tunnels=len(tunnels))
            return every(tunnels, DeviceStatus.UNKNOWN,
                         f"no answer within {budget:.0f}s: the device may hold the key")
        except httpx.HTTPError as exc:
            return every(tunnels, DeviceStatus.UNKNOWN,
                         f"the connection failed after the request went out ({type(exc).__name__}): "
                         "the device may hold the key")
        return self._judge(action, status, answer, tunnels, keys)

    def _signed_headers(self, body: bytes, end: float) -> dict[str, str] | None:
        """Timestamp and signature. A receiver refuses a signature it has seen (a replay), so the
        same body is never signed twice with the same timestamp: a repeat within one second waits
        for the next second (None when that would pass ``end``)."""
        for _ in range(3):
            with self._lock:
                now = time.time()
                timestamp = str(int(now))
                signature = sign(self._secret, timestamp, body)
                self._recent = {s: t for s, t in self._recent.items() if t >= int(now)}
                if signature not in self._recent:
                    self._recent[signature] = int(now)
                    return {TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: signature}
            wait = int(now) + 1 - now
            if time.monotonic() + wait >= end:
                return None
            time.sleep(wait)
        return None

    def _judge(self, action: str, status: int, answer: bytes, tunnels: Sequence[DeviceTunnel],
               keys: list[str]) -> dict[str, DeviceResult]:
        if 200 <= status < 300:
            try:
                answered, strangers = parse_results(answer, tunnels, keys)
            except Garbage as exc:
                log.warning("device_webhook_garbage", device=self.name, action=action, problem=str(exc))
                return every(tunnels, DeviceStatus.UNKNOWN,
                             f"unreadable answer (HTTP {status}, {exc}): the device may hold the key")
            note = strangers_note(strangers) if strangers else None
            if strangers:
                log.warning("device_webhook_strangers", device=self.name, action=action, ignored=len(strangers))
            ok = DeviceResult(DeviceStatus.OK)
            return {t.tunnel_id: with_note(answered.get(t.tunnel_id, ok), note) for t in tunnels}
        detail = one_line(answer.decode("utf-8", "replace"), keys, 160)
        reason = f"HTTP {status}" + (f": {detail}" if detail else "")
        if 300 <= status < 500:
            hint = " (redirects are not followed: configure the final URL)" if status < 400 else ""
            return every(tunnels, DeviceStatus.FAILED, f"the device refused the call: {reason}{hint}")
        return every(tunnels, DeviceStatus.UNKNOWN, f"the device failed ({reason}): it may hold the key")


class SignatureError(Exception):
    """A webhook request that must not be acted on; ``str()`` says why (never the key)."""


class WebhookReceiver:
    """The receiving side's check: a valid signature, a timestamp within ``window`` seconds of now,
    and a signature not seen before within the window (a replayed request is refused)."""

    def __init__(self, secret: Secret | str | bytes, window: float = DEFAULT_WINDOW) -> None:
        self._secret = secret
        self.window = window
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"WebhookReceiver(window={self.window}, secret=**redacted**)"

    def check(self, headers: Mapping[str, str], body: bytes, now: float | None = None) -> None:
        now = time.time() if now is None else now
        lower = {k.lower(): v for k, v in headers.items()}
        timestamp = lower.get(TIMESTAMP_HEADER.lower(), "")
        signature = lower.get(SIGNATURE_HEADER.lower(), "")
        if not timestamp.isdigit() or len(timestamp) > 12:
            raise SignatureError(f"missing or malformed {TIMESTAMP_HEADER}")
        if abs(now - int(timestamp)) > self.window:
            raise SignatureError(f"{TIMESTAMP_HEADER} is outside the replay window of {self.window:.0f}s")
        if not hmac.compare_digest(signature.encode(), sign(self._secret, timestamp, body).encode()):
            raise SignatureError(f"{SIGNATURE_HEADER} does not match the body")
        with self._lock:
            self._seen = {s: t for s, t in self._seen.items() if now - t <= self.window}
            if signature in self._seen:
                raise SignatureError("replayed request: this signature was already used")
            self._seen[signature] = int(timestamp)
