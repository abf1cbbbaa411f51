"""The strongswan device against a fake charon speaking vici on a unix socket."""

from __future__ import annotations

import shutil
import socket
import tempfile
import time

import pytest

from rotator.adapters.devices.strongswan import StrongSwanDevice
from rotator.rotation.ports import DeviceStatus, DeviceTunnel
from tests.devices.conftest import ACCOUNT, assert_no_key, make_tunnels
from tests.devices.fake_vici import fake_charon

OWNER = "{tunnel_name}.site.example.net"


@pytest.fixture
def sock_dir():
    path = tempfile.mkdtemp(prefix="vici-", dir="/tmp")  # unix socket paths are short
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def charon(sock_dir):
    with fake_charon(f"{sock_dir}/charon.vici") as c:
        yield c


def site(charon, tunnels: list[DeviceTunnel], peer: str = "new", up: bool = True) -> None:
    """Connections named like the tunnels; the far end holds each tunnel's new (or old) key."""
    for t in tunnels:
        key = t.psk if peer == "new" else t.previous_psk
        charon.add_conn(t.tunnel_name, f"{t.tunnel_name}.site.example.net", key.reveal() if key else None, up=up)


def device(charon, **kwargs) -> StrongSwanDevice:
    kwargs.setdefault("timeout", 10)
    return StrongSwanDevice("site", charon.path, owners=[OWNER], poll_interval=0.02, **kwargs)


def deadline(seconds: float = 30.0) -> float:
    return time.monotonic() + seconds


def statuses(results) -> set[DeviceStatus]:
    return {r.status for r in results.values()}


def test_deliver_loads_a_stable_shared_secret_per_tunnel(charon):
    tunnels = make_tunnels(3)
    site(charon, tunnels)
    assert statuses(device(charon).deliver(ACCOUNT, "r", tunnels, deadline=deadline())) == {DeviceStatus.OK}
    for t in tunnels:
        assert charon.shared[f"psk-rotator-{t.tunnel_id}"] == {
            "data": t.psk.reveal(), "type": "IKE", "owners": [f"{t.tunnel_name}.site.example.net"]}
        assert charon.key_for(t.tunnel_name) == t.psk.reveal()
    # A rollback replaces the same secret in place.
    back = [DeviceTunnel(t.tunnel_id, t.tunnel_name, t.previous_psk, t.psk) for t in tunnels]
    assert statuses(device(charon).rollback(ACCOUNT, "r", back, deadline=deadline())) == {DeviceStatus.OK}
    assert len(charon.shared) == 3
    assert all(charon.key_for(t.tunnel_name) == t.previous_psk.reveal() for t in tunnels)


@pytest.mark.parametrize("reauth", ["rekey", "restart"])
def test_verify_forces_a_fresh_authentication_and_sees_a_new_sa_established(charon, reauth):
    tunnels = make_tunnels(3)
    site(charon, tunnels)
    before = {t.tunnel_name: charon.established(t.tunnel_name) for t in tunnels}
    dev = device(charon, reauth=reauth)
    dev.deliver(ACCOUNT, "r", tunnels, deadline=deadline())
    results = dev.verify(ACCOUNT, "r", tunnels, deadline=deadline())
    assert statuses(results) == {DeviceStatus.OK}, results
    for t in tunnels:
        now = charon.established(t.tunnel_name)
        assert len(now) == 1 and now != before[t.tunnel_name]
    names = [c for c, _ in charon.commands]
    if reauth == "rekey":
        rekeys = sorted((m for c, m in charon.commands if c == "rekey"), key=lambda m: m["ike"])
        assert rekeys == [{"ike": t.tunnel_name, "reauth": "yes"} for t in tunnels]  # concurrent: any order
    else:
        assert names.count("terminate") == 3 and names.count("initiate") == 3


def test_verify_fails_when_the_far_end_holds_another_key(charon):
    tunnels = make_tunnels(2)
    site(charon, tunnels[:1])
    site(charon, tunnels[1:], peer="old")
    dev = device(charon)
    dev.deliver(ACCOUNT, "r", tunnels, deadline=deadline())
    results = dev.verify(ACCOUNT, "r", tunnels, deadline=deadline())
    assert results[tunnels[0].tunnel_id].ok
    bad = results[tunnels[1].tunnel_id]
    assert bad.status is DeviceStatus.FAILED
    assert bad.reason == "the re-authentication of site-1 failed: the new IKE SA was torn down"


def test_verify_brings_up_a_tunnel_that_was_down(charon):
    tunnels = make_tunnels(1)
    site(charon, tunnels, up=False)
    dev = device(charon)
    results = dev.verify(ACCOUNT, "r", tunnels, deadline=deadline())
    assert statuses(results) == {DeviceStatus.OK}
    assert [c for c, _ in charon.commands].count("initiate") == 1
    assert charon.key_for(tunnels[0].tunnel_name) == tunnels[0].psk.reveal()  # verify (re)loads the key


def test_a_refused_key_fails_that_tunnel_only(charon):
    tunnels = make_tunnels(3)
    site(charon, tunnels)
    charon.refuse_ids.add(f"psk-rotator-{tunnels[1].tunnel_id}")
    results = device(charon).deliver(ACCOUNT, "r", tunnels, deadline=deadline())
    assert [results[t.tunnel_id].status for t in tunnels] == [DeviceStatus.OK, DeviceStatus.FAILED, DeviceStatus.OK]
    assert results[tunnels[1].tunnel_id].reason == "charon refused the key: Command failed: loading shared secret failed"


def test_an_unreachable_charon_fails_every_tunnel(sock_dir):
    tunnels = make_tunnels(2)
    dev = StrongSwanDevice("site", f"{sock_dir}/nothing.vici", owners=[OWNER], timeout=5)
    for action in ("deliver", "verify", "rollback"):
        results = getattr(dev, action)(ACCOUNT, "r", tunnels, deadline=deadline())
        assert statuses(results) == {DeviceStatus.FAILED}
        assert all(r.reason.startswith(f"cannot reach charon at {sock_dir}/nothing.vici") for r in results.values())


def test_a_charon_that_hangs_leaves_the_tunnel_in_flight_unknown_and_the_rest_unsent(charon):
    tunnels = make_tunnels(3)
    site(charon, tunnels)
    charon.hang["load-shared"] = 3.0
    started = time.monotonic()
    results = device(charon, timeout=1).deliver(ACCOUNT, "r", tunnels, deadline=deadline())
    assert time.monotonic() - started < 1 + 10  # the deadline held (generous bound)
    assert [results[t.tunnel_id].status for t in tunnels] == [DeviceStatus.UNKNOWN, DeviceStatus.FAILED,
                                                              DeviceStatus.FAILED]
    assert "the vici session broke during load-shared (TimeoutError" in results[tunnels[0].tunnel_id].reason
    assert results[tunnels[1].tunnel_id].reason == "not sent: the vici session broke before it"


def test_a_connection_dropped_during_the_reauth_is_unknown(charon):
    tunnels = make_tunnels(1)
    site(charon, tunnels)
    charon.drop.add("rekey")
    (r,) = device(charon).verify(ACCOUNT, "r", tunnels, deadline=deadline()).values()
    assert r.status is DeviceStatus.UNKNOWN and "while re-authenticating site-0" in r.reason


def test_a_reauth_that_never_completes_fails_at_the_deadline(charon):
    tunnels = make_tunnels(1)
    site(charon, tunnels)
    charon.auth_delay = 60  # the new SA stays CONNECTING
    (r,) = device(charon, timeout=1).verify(ACCOUNT, "r", tunnels, deadline=deadline()).values()
    assert r.status is DeviceStatus.FAILED and r.reason.startswith("no fresh IKE SA site-0 established within")


def test_templates_name_the_secret_the_sa_and_the_owners(charon):
    tunnels = make_tunnels(1)
    t = tunnels[0]
    charon.add_conn(f"cf-{t.tunnel_id}", t.customer_endpoint, t.psk.reveal())
    dev = StrongSwanDevice("site", charon.path, owners=["{customer_endpoint}", "{cloudflare_endpoint}"],
                           secret_id="cf-{tunnel_name}", ike="cf-{tunnel_id}", timeout=5, poll_interval=0.02)
    results = dev.verify(ACCOUNT, "r", tunnels, deadline=deadline())
    assert statuses(results) == {DeviceStatus.OK}
    assert charon.shared["cf-site-0"]["owners"] == [t.customer_endpoint, t.cloudflare_endpoint]


def test_no_key_in_any_reason_or_command_log(charon):
    tunnels = make_tunnels(2)
    site(charon, tunnels, peer="old")
    charon.refuse_ids.add(f"psk-rotator-{tunnels[0].tunnel_id}")
    dev = device(charon, timeout=2)
    results = {**dev.deliver(ACCOUNT, "r", tunnels, deadline=deadline()),
               "v": dev.verify(ACCOUNT, "r", tunnels, deadline=deadline())}
    assert_no_key(repr(results) + repr(dev), tunnels)


def test_an_sa_that_vanished_before_the_rekey_is_initiated_instead(charon):
    tunnels = make_tunnels(1)
    site(charon, tunnels)
    dev = device(charon)
    real = charon.command

    def vanish_then_answer(name, msg):
        if name == "rekey":
            with charon.lock:
                charon.sas[tunnels[0].tunnel_name] = []
        return real(name, msg)

    charon.command = vanish_then_answer
    (r,) = dev.verify(ACCOUNT, "r", tunnels, deadline=deadline()).values()
    assert r.status is DeviceStatus.OK
    assert [c for c, _ in charon.commands if c in ("rekey", "initiate")] == ["rekey", "initiate"]


def test_a_charon_that_cannot_be_watched_after_the_reauth_leaves_it_unknown(charon):
    tunnels = make_tunnels(1)
    site(charon, tunnels)
    charon.events = False  # no event stream, and list-sas goes too
    real = charon.command

    def blind_after_rekey(name, msg):
        if name == "rekey":
            charon.drop.add("list-sas")
        return real(name, msg)

    charon.command = blind_after_rekey
    (r,) = device(charon, timeout=1).verify(ACCOUNT, "r", tunnels, deadline=deadline()).values()
    assert r.status is DeviceStatus.UNKNOWN and r.reason.startswith("could not watch site-0 come up")


def test_the_verdicts_come_from_the_event_stream_without_polling(charon):
    tunnels = make_tunnels(2)
    site(charon, tunnels[:1])
    site(charon, tunnels[1:], peer="old")
    dev = device(charon, timeout=30)
    dev.poll_interval = 60  # a poll would take longer than the test's deadline allows
    results = dev.verify(ACCOUNT, "r", tunnels, deadline=deadline(20))
    assert results[tunnels[0].tunnel_id].ok
    assert results[tunnels[1].tunnel_id].reason == "the re-authentication of site-1 failed: the new IKE SA was torn down"
    assert [c for c, _ in charon.commands].count("list-sas") == 1  # the look before the triggers only


@pytest.mark.parametrize("events", [True, False])
def test_an_sa_that_list_sas_skips_while_busy_is_not_taken_for_torn_down(charon, events):
    tunnels = make_tunnels(3)
    site(charon, tunnels)
    charon.events = events
    charon.hide_connecting = True  # list-sas skips SAs busy in charon, as with noblock
    charon.auth_delay = 0.3  # several polls see nothing new
    results = device(charon).verify(ACCOUNT, "r", tunnels, deadline=deadline())
    assert statuses(results) == {DeviceStatus.OK}, results


def test_without_events_a_refused_key_fails_only_at_the_deadline(charon):
    tunnels = make_tunnels(1)
    site(charon, tunnels, peer="old")
    charon.events = False
    (r,) = device(charon, timeout=1).verify(ACCOUNT, "r", tunnels, deadline=deadline()).values()
    assert r.status is DeviceStatus.FAILED and r.reason.startswith("no fresh IKE SA site-0 established within")


def test_a_full_vici_backlog_is_retried_until_the_deadline(sock_dir):
    """A listener that never accepts: once its backlog is full, connects fail with EAGAIN at once."""
    path = f"{sock_dir}/full.vici"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    fillers = []
    try:
        for _ in range(8):  # bounded: fill the backlog until a non-blocking connect is refused
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            fillers.append(s)
            try:
                s.connect(path)
            except BlockingIOError:
                break
        else:
            pytest.skip("the backlog never filled")
        tunnels = make_tunnels(1)
        dev = StrongSwanDevice("site", path, owners=[OWNER], timeout=0.5)
        started = time.monotonic()
        (r,) = dev.deliver(ACCOUNT, "r", tunnels, deadline=deadline()).values()
        assert time.monotonic() - started >= 0.4  # retried, not refused at the first EAGAIN
        assert r.status is DeviceStatus.FAILED and r.reason.startswith(f"cannot reach charon at {path}")
        assert "backlog stayed full" in r.reason
    finally:
        for s in fillers:
            s.close()
        listener.close()


def test_an_event_stream_that_breaks_falls_back_to_list_sas(charon):
    tunnels = make_tunnels(2)
    site(charon, tunnels)
    charon.auth_delay = 0.3
    real = charon.command

    def break_events_at_rekey(name, msg):
        if name == "rekey":
            with charon.lock:
                for sock in charon.listeners:
                    sock.shutdown(socket.SHUT_RDWR)  # the event session ends
                charon.listeners.clear()
        return real(name, msg)

    charon.command = break_events_at_rekey
    results = device(charon).verify(ACCOUNT, "r", tunnels, deadline=deadline())
    assert statuses(results) == {DeviceStatus.OK}, results
    assert [c for c, _ in charon.commands].count("list-sas") > 1  # the verdicts came from polling
