"""The ``strongswan`` device kind against a real charon (the lab's site): deliver with load-shared,
verify by a forced re-authentication that the real edge accepts or refuses, roll back.

The edge's key stands in for Cloudflare's apply; a verification that succeeds proves the site holds
the edge's key (IKE_AUTH succeeded with it).
"""

from __future__ import annotations

import secrets
import time

import pytest

from rotator.rotation.ports import DeviceStatus, DeviceTunnel
from rotator.secret import Secret
from tests import helpers

strongswan = pytest.importorskip("rotator.adapters.devices.strongswan", reason="the strongswan device has not landed")

pytestmark = pytest.mark.ike
ACCOUNT = "0" * 32


def new_key() -> str:
    key = secrets.token_urlsafe(24)
    helpers.SECRETS.add(key)
    return key


def device(lab, timeout: float = 5.0):
    return strongswan.StrongSwanDevice("lab-site", lab.site.vici_socket, owners=["{tunnel_id}.site.lab"],
                                       timeout=timeout)


def dt(lab, tid: str, psk: str, previous: str | None) -> DeviceTunnel:
    t = lab.tunnel(tid)
    return DeviceTunnel(tid, t.name, Secret(psk), Secret(previous) if previous else None)


@pytest.fixture
def up(lab):
    old = {secrets.token_hex(16): new_key() for _ in range(3)}
    lab.add_tunnels([(t, f"dev-{i}") for i, t in enumerate(old)], old)
    lab.up(timeout=10)
    return old


def test_deliver_then_verify_authenticates_afresh_on_the_new_key(lab, up):
    dev = device(lab)
    new = {t: new_key() for t in up}
    batch = [dt(lab, t, new[t], up[t]) for t in up]
    delivered = dev.deliver(ACCOUNT, "r1", batch, deadline=time.monotonic() + 10)
    assert all(r.status is DeviceStatus.OK for r in delivered.values())
    assert lab.sa_states("edge") == dict.fromkeys(up, "ESTABLISHED")  # nothing re-authenticated yet
    before = {t: lab.ike_ids(t) for t in up}
    for t in up:  # Cloudflare's apply
        lab.load_edge_psk(t, new[t])
    started = time.monotonic()
    verified = dev.verify(ACCOUNT, "r1", batch, deadline=time.monotonic() + 10)
    took = time.monotonic() - started
    assert {t: r.status for t, r in verified.items()} == dict.fromkeys(up, DeviceStatus.OK), verified
    for t in up:  # a new IKE SA, authenticated with the key both ends now hold
        assert lab.ike_ids(t) - before[t]
    assert lab.sa_states("edge") == dict.fromkeys(up, "ESTABLISHED")
    print(f"verify of {len(up)} tunnels against a real charon: {took:.3f} s")


def test_verify_fails_when_the_edge_holds_another_key_and_rollback_restores_the_tunnel(lab, up):
    dev = device(lab, timeout=30.0)  # a refused re-authentication is seen at once (ike-updown), not at the deadline
    victim, *others = list(up)
    new = new_key()
    batch = [dt(lab, victim, new, up[victim])]
    assert dev.deliver(ACCOUNT, "r2", batch, deadline=time.monotonic() + 5)[victim].ok
    # the edge keeps the old key (an apply that did not happen): the fresh authentication must fail
    started = time.monotonic()
    verified = dev.verify(ACCOUNT, "r2", batch, deadline=time.monotonic() + 30)[victim]
    took = time.monotonic() - started
    assert verified.status is DeviceStatus.FAILED, verified
    assert verified.reason == f"the re-authentication of {lab.tunnel(victim).name} failed: the new IKE SA was torn down"
    print(f"verdict on a refused key: {took:.3f} s")
    assert new not in (verified.reason or "")
    assert lab.sa_states("edge")[victim] == "ESTABLISHED"  # make-before-break: the old SA still carries
    rollback = [dt(lab, victim, up[victim], new)]
    assert dev.rollback(ACCOUNT, "r2", rollback, deadline=time.monotonic() + 5)[victim].ok
    again = dev.verify(ACCOUNT, "r2", rollback, deadline=time.monotonic() + 5)[victim]
    assert again.ok, again
    assert lab.reauth(victim).ok  # and it keeps working on the old key
    assert all(lab.sa_states("edge")[t] == "ESTABLISHED" for t in others)


def test_verify_at_the_default_concurrency_against_a_real_charon(lab):
    old = {secrets.token_hex(16): new_key() for _ in range(40)}
    lab.add_tunnels([(t, f"many-{i}") for i, t in enumerate(old)], old)
    lab.up(timeout=20)
    dev = strongswan.StrongSwanDevice("lab-site", lab.site.vici_socket, owners=["{tunnel_id}.site.lab"], timeout=10)
    assert dev.concurrency == 16  # the default
    new = {t: new_key() for t in old}
    batch = [dt(lab, t, new[t], old[t]) for t in old]
    assert all(r.ok for r in dev.deliver(ACCOUNT, "r3", batch, deadline=time.monotonic() + 10).values())
    for t in old:
        lab.load_edge_psk(t, new[t])
    verified = dev.verify(ACCOUNT, "r3", batch, deadline=time.monotonic() + 15)
    failed = {r.reason for r in verified.values() if not r.ok}
    assert not failed, failed
