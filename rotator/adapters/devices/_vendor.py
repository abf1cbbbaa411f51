"""What the firewall kinds (panos, vyos, fortigate) share: the management host, TLS settings and an
API credential read from a file named in the config (never argv, never the config itself)."""

from __future__ import annotations

import os
import re
import ssl

from rotator.adapters.devices._common import Fields
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
