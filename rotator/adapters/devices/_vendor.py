"""What the firewall kinds (panos, vyos, fortigate) share: the management host, TLS settings, an API
credential read from a file named in the config (never argv, never the config itself), the three
ways a call can fail, and the wait for a fresh IKE SA after verify forced one."""

from __future__ import annotations

import os
import re
import ssl
import time
from collections.abc import Callable

from rotator.adapters.devices._common import Fields, one_line, poll
from rotator.rotation.ports import DeviceResult, DeviceStatus
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
