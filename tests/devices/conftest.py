"""Shared pieces of the device tests: tunnels with fresh keys, remembered for the secret scan."""

from __future__ import annotations

import secrets
import string
import time
from dataclasses import dataclass

import pytest

from rotator.rotation.ports import DeviceTunnel
from rotator.secret import Secret
from tests import helpers

ACCOUNT = "023e105f4ecef8ad9ca31a8372d0c353"
ALNUM = string.ascii_letters + string.digits


def new_key() -> str:
    # A letter first: every kind takes it (AWS and FortiOS refuse a leading 0).
    key = secrets.choice(string.ascii_letters) + "".join(secrets.choice(ALNUM) for _ in range(31))
    helpers.SECRETS.add(key)
    return key


def make_tunnels(n: int, *, previous: bool = True) -> list[DeviceTunnel]:
    return [DeviceTunnel(secrets.token_hex(16), f"site-{i}", Secret(new_key()),
                         Secret(new_key()) if previous else None, f"203.0.113.{i + 1}", "162.159.66.164")
            for i in range(n)]


def keys_of(tunnels: list[DeviceTunnel]) -> set[str]:
    return {k.reveal() for t in tunnels for k in (t.psk, t.previous_psk) if k is not None}


def assert_no_key(text: str, tunnels: list[DeviceTunnel]) -> None:
    leaked = [k[:4] for k in keys_of(tunnels) if k in text]
    assert leaked == [], f"a key leaked into output: {leaked}"


def statuses(results) -> dict:
    """tunnel id -> DeviceStatus of one device call's answer."""
    return {tid: r.status for tid, r in results.items()}


def deadline(seconds: float = 10.0) -> float:
    return time.monotonic() + seconds


def assert_unknown_by_the_deadline(device, tunnels: list[DeviceTunnel], seconds: float = 1.5) -> None:
    """A deliver that meets an unclear answer: every tunnel UNKNOWN (the device may hold the key), the
    call back by its deadline, and no key in any reason."""
    from rotator.rotation.ports import DeviceStatus

    start = time.monotonic()
    results = device.deliver(ACCOUNT, "r1", tunnels, deadline=start + seconds)
    assert time.monotonic() - start < seconds + 0.3
    assert set(statuses(results).values()) == {DeviceStatus.UNKNOWN}, results
    for r in results.values():
        assert_no_key(r.reason or "", tunnels)


@pytest.fixture
def tunnels() -> list[DeviceTunnel]:
    return make_tunnels(3)


@dataclass(frozen=True)
class LoopbackTls:
    """A CA and a certificate for 127.0.0.1 it signed (the simulated vendor APIs serve HTTPS with it),
    and the file of another CA, which does not trust that certificate."""

    ca_file: str
    certfile: str
    keyfile: str
    other_ca_file: str


@pytest.fixture(scope="session")
def loopback_tls(tmp_path_factory) -> LoopbackTls:
    trustme = pytest.importorskip("trustme")
    where = tmp_path_factory.mktemp("tls")
    ca, other = trustme.CA(), trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(where / "ca.pem"))
    other.cert_pem.write_to_path(str(where / "other-ca.pem"))
    cert.private_key_pem.write_to_path(str(where / "key.pem"))
    for i, pem in enumerate(cert.cert_chain_pems):
        pem.write_to_path(str(where / "cert.pem"), append=i > 0)
    return LoopbackTls(str(where / "ca.pem"), str(where / "cert.pem"), str(where / "key.pem"),
                       str(where / "other-ca.pem"))
