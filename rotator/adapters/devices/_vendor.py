"""What the firewall kinds (panos, vyos, fortigate) share: the management host, TLS settings, an API
credential read from a file named in the config (never argv, never the config itself), the three
ways a call can fail, and the wait for a fresh IKE SA after verify forced one."""

from __future__ import annotations

import os
import re
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, Self

import httpx

from rotator import __version__
from rotator.adapters.cloudflare import Answer, DeadlinePassed, exchange
from rotator.adapters.devices._common import DeviceBase, DeviceSpec, Fields, batch_keys, one_line, poll
from rotator.rotation.ports import DeviceResult, DeviceStatus, DeviceTunnel
from rotator.secret import Secret

HOST_RE = re.compile(r"^[A-Za-z0-9.:-]{1,253}$")


def read_credential(f: Fields, name: str, what: str, fix: str) -> tuple[Secret, str]:
    """A credential from the file named by ``name`` (never from argv or the config itself)."""
    path = f.text(name, required=True)
    try:
        with open(path, encoding="utf-8") as fh:
            value = fh.read().strip()
    except OSError as exc:
        raise f.fail(name, f"cannot read {path} ({exc.strerror})", "check the path and its permissions") from None
    if not value or any(c.isspace() for c in value):
        raise f.fail(name, f"{path} holds {'no' if not value else 'a malformed'} {what}", fix)
    return Secret(value), path


def parse_tls(f: Fields) -> tuple[str, bool]:
    ca_file = f.text("ca_file", "")
    if ca_file and not os.path.isfile(ca_file):
        raise f.fail("ca_file", f"{ca_file} is not a file", "give the PEM file of the CA that signed the device's cert")
    if ca_file:
        try:
            ssl.create_default_context(cafile=ca_file)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise f.fail("ca_file", f"{ca_file} holds no usable PEM certificate ({type(exc).__name__})",
                         "give the PEM file of the CA that signed the device's cert") from None
    verify_tls = f.flag("verify_tls", True)
    if ca_file and not verify_tls:
        raise f.fail("verify_tls", "is false while ca_file is set", "remove one of them (TLS is verified by default)")
    return ca_file, verify_tls


def parse_host(f: Fields) -> str:
    host = f.text("host", required=True)
    if not HOST_RE.match(host):
        raise f.fail("host", f"{host!r} is not a host name or address",
                     "give the management address alone, e.g. fw.example.net (no scheme, no path)")
    return host


def tls_context(ca_file: str, verify: bool) -> ssl.SSLContext:
    """Verified TLS (the system's CAs, or ``ca_file``); unverified only where the operator set
    ``verify_tls = false``."""
    if verify:
        return ssl.create_default_context(cafile=ca_file or None)
    return ssl._create_unverified_context()  # noqa: S323 - the operator's explicit choice


class Refused(Exception):
    """The device answered that it did not do it (an error answer of its API): nothing changed."""


class Unclear(Exception):
    """No clear answer (a timeout, a 5xx, garbage): the request may have been acted on."""


class Unreached(Exception):
    """The request never reached the device, or the device refused the credential before acting."""


def tls_failure(text: str, where: str, what: str) -> str | None:
    """One line for a certificate the configured CA does not trust (None: not a TLS failure)."""
    if "CERTIFICATE_VERIFY_FAILED" not in text and "certificate verify failed" not in text:
        return None
    cause = text.split("]", 1)[-1].split("(_ssl", 1)[0].strip(" :") or "certificate verify failed"
    return f"TLS verification of {where} failed ({cause}): set ca_file to the CA that signed the {what}'s certificate"


def wait_fresh(fresh: Callable[[], bool], end: float, interval: float, keys: list[str], *, what: str,
               since: float, failure: str) -> DeviceResult:
    """Poll ``fresh`` (raises Refused/Unclear/Unreached when it has no answer) until it is true or
    ``end``: OK, FAILED with ``failure`` after answers that never showed a fresh SA, UNKNOWN when no
    poll was answered at all."""
    seen: dict[str, object] = {"answered": False, "last": ""}

    def check() -> DeviceResult | None:
        try:
            if fresh():
                return DeviceResult(DeviceStatus.OK)
            seen["answered"] = True
        except (Refused, Unclear, Unreached) as exc:
            seen["last"] = f" (last answer: {exc})"
        return None

    def timed_out() -> DeviceResult:
        if not seen["answered"]:
            return DeviceResult(DeviceStatus.UNKNOWN, one_line(f"{what}, then no readable status{seen['last']}", keys))
        return DeviceResult(DeviceStatus.FAILED, one_line(
            f"{failure} within {time.monotonic() - since:.0f}s of {what}: the two ends hold different keys, or the "
            f"device does not initiate{seen['last']}", keys))

    return poll(check, end - 0.05, interval=interval, on_timeout=timed_out)


# -- the body the three kinds share -----------------------------------------------------------------

class FirewallSettings(Protocol):
    host: str
    port: int
    ca_file: str
    verify_tls: bool
    poll_interval: float


class FirewallDevice(DeviceBase):
    """A firewall as a far end (rotation/ports.py, Device): deliver and rollback are one ``set_keys``
    (the old key is just another key to hold), verify forces a fresh IKE SA per tunnel, concurrently
    (at most ``concurrency`` at once), each answering before the call's deadline."""

    def __init__(self, name: str, settings: Any, *, timeout: float = 60.0, verify: bool = True,
                 verify_timeout: float | None = None, concurrency: int = 16) -> None:
        self.name = name
        self.settings = settings
        self.timeout = timeout
        self.verifies = verify
        self.verify_timeout = verify_timeout
        self.concurrency = concurrency
        self.where = f"{settings.host}:{settings.port}"
        self.tls = tls_context(settings.ca_file, settings.verify_tls)

    @classmethod
    def from_spec(cls, spec: DeviceSpec) -> Self:
        return cls(spec.name, spec.settings, timeout=spec.timeout, verify=spec.verify,
                   verify_timeout=spec.verify_timeout, concurrency=spec.concurrency)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, host={self.where!r}, credential=**redacted**)"

    def set_keys(self, action: str, tunnels: Sequence[DeviceTunnel], end: float, keys: list[str]
                 ) -> dict[str, DeviceResult]:
        """Make the device hold each tunnel's ``psk`` (``action``: deliver or rollback)."""
        raise NotImplementedError

    def verify_one(self, tunnel: DeviceTunnel, end: float, keys: list[str]) -> DeviceResult:
        raise NotImplementedError

    def each(self, tunnels: Sequence[DeviceTunnel], work: Callable[[DeviceTunnel], DeviceResult]
             ) -> dict[str, DeviceResult]:
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(tunnels))),
                                thread_name_prefix=f"{self.kind}-{self.name}") as pool:
            answers = list(pool.map(work, tunnels))
        return {t.tunnel_id: a for t, a in zip(tunnels, answers, strict=True)}

    def _keys_call(self, action: str, tunnels: Sequence[DeviceTunnel], deadline: float) -> dict[str, DeviceResult]:
        if not tunnels:
            return {}
        return self.set_keys(action, tunnels, min(deadline, time.monotonic() + self.timeout), batch_keys(tunnels))

    def deliver(self, account_id: str, rotation_id: str, tunnels: Sequence[DeviceTunnel], *,
                deadline: float) -> dict[str, DeviceResult]:
        return self._keys_call("deliver", tunnels, deadline)

    def rollback(self, account_id: str, rotation_id: str, tunnels: Sequence[DeviceTunnel], *,
                 deadline: float) -> dict[str, DeviceResult]:
        return self._keys_call("rollback", tunnels, deadline)

    def verify(self, account_id: str, rotation_id: str, tunnels: Sequence[DeviceTunnel], *,
               deadline: float) -> dict[str, DeviceResult]:
        if not tunnels:
            return {}
        keys = batch_keys(tunnels)
        end = min(deadline, time.monotonic() + (self.verify_timeout or self.timeout))
        return self.each(tunnels, lambda t: self.verify_one(t, end, keys))


class HttpsFirewall(FirewallDevice):
    """A firewall whose API is HTTPS and JSON, reached with httpx (vyos, fortigate)."""

    product = "device"  # in messages: "the router at ...", "the FortiGate at ..."

    def __init__(self, name: str, settings: Any, *, timeout: float = 60.0, verify: bool = True,
                 verify_timeout: float | None = None, concurrency: int = 16,
                 transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(name, settings, timeout=timeout, verify=verify, verify_timeout=verify_timeout,
                         concurrency=concurrency)
        self.base = f"https://{settings.host}:{settings.port}"
        self._client = httpx.Client(verify=self.tls, transport=transport, follow_redirects=False,
                                    headers={"User-Agent": f"psk-rotator/{__version__}"})

    def close(self) -> None:
        self._client.close()

    def send(self, method: str, url: str, end: float, headers: Mapping[str, str], **kwargs: Any) -> Answer:
        """One request with the call's total deadline (the Cloudflare adapter's exchange); a failure
        before an answer is Unreached (never sent, or refused at TLS) or Unclear (it may have landed)."""
        budget = end - time.monotonic()
        if budget <= 0.05:
            raise Unreached("not sent: no time left before the deadline")
        try:
            return exchange(self._client, method, url, headers, budget, **kwargs)
        except DeadlinePassed:
            raise Unclear(f"no answer from the {self.product} at {self.where} within {budget:.0f}s") from None
        except httpx.ConnectError as exc:
            text = str(exc)
            tls = tls_failure(text, self.where, f"{self.product}'s HTTPS")
            raise Unreached(tls or f"cannot connect to the {self.product} at {self.where} ({text or 'refused'}): "
                            "check host and port") from None
        except (httpx.ConnectTimeout, httpx.UnsupportedProtocol) as exc:
            raise Unreached(f"cannot connect to the {self.product} at {self.where} ({type(exc).__name__})") from None
        except (httpx.HTTPError, ValueError) as exc:
            raise Unclear(f"the connection to {self.where} failed after the request went out "
                          f"({type(exc).__name__})") from None
