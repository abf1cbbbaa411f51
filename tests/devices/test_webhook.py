"""The webhook device against the simulated device over loopback HTTP (and a TLS server), plus the
receiver-side signature check."""

from __future__ import annotations

import http.server
import json
import socket
import ssl
import subprocess
import threading
import time

import pytest
import structlog

from rotator.adapters.devices.webhook import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SignatureError,
    WebhookDevice,
    WebhookReceiver,
    sign,
)
from rotator.rotation.ports import DeviceStatus
from rotator.secret import Secret
from rotator.sim.device import DeviceSim, serve
from tests.devices.conftest import ACCOUNT, assert_no_key, make_tunnels


def deadline(seconds: float = 30.0) -> float:
    return time.monotonic() + seconds


def statuses(results) -> dict[str, DeviceStatus]:
    return {tid: r.status for tid, r in results.items()}


@pytest.fixture
def sim():
    device_sim = DeviceSim()
    with serve(device_sim) as url:
        device_sim.url = url
        yield device_sim


@pytest.fixture
def device(sim):
    dev = WebhookDevice("sim", sim.url, Secret(sim.secret), timeout=10, concurrency=1)  # one POST per call
    yield dev
    dev.close()


def test_deliver_verify_rollback_move_the_key_the_device_holds(sim, device):
    tunnels = make_tunnels(3)
    peer = {t.tunnel_id: t.psk.reveal() for t in tunnels}
    sim.peer = lambda acc, tid: peer.get(tid)
    assert set(statuses(device.deliver(ACCOUNT, "r1", tunnels, deadline=deadline())).values()) == {DeviceStatus.OK}
    assert sim.keys_of(ACCOUNT) == {t.tunnel_id: t.psk.reveal() for t in tunnels}
    assert set(statuses(device.verify(ACCOUNT, "r1", tunnels, deadline=deadline())).values()) == {DeviceStatus.OK}
    # The peer still holds the old key for one tunnel: a fresh authentication would fail.
    peer[tunnels[0].tunnel_id] = tunnels[0].previous_psk.reveal()
    verified = device.verify(ACCOUNT, "r1", tunnels, deadline=deadline())
    assert verified[tunnels[0].tunnel_id].status is DeviceStatus.FAILED
    assert verified[tunnels[0].tunnel_id].reason == "IKE_AUTH failed: the peer holds another key"
    back = [type(t)(t.tunnel_id, t.tunnel_name, t.previous_psk, t.psk) for t in tunnels]
    assert set(statuses(device.rollback(ACCOUNT, "r1", back, deadline=deadline())).values()) == {DeviceStatus.OK}
    assert sim.keys_of(ACCOUNT) == {t.tunnel_id: t.previous_psk.reveal() for t in tunnels}
    assert [c.action for c in sim.calls] == ["deliver", "verify", "verify", "rollback"]
    assert all(c.rotation_id == "r1" and c.account_id == ACCOUNT for c in sim.calls)


def test_a_refused_key_fails_that_tunnel_only_and_the_device_keeps_its_old_key(sim, device):
    tunnels = make_tunnels(2)
    sim.refuse([tunnels[1].tunnel_id])
    results = device.deliver(ACCOUNT, "r", tunnels, deadline=deadline())
    assert statuses(results) == {tunnels[0].tunnel_id: DeviceStatus.OK, tunnels[1].tunnel_id: DeviceStatus.FAILED}
    assert results[tunnels[1].tunnel_id].reason == "sim-device refused the key"
    assert sim.held(ACCOUNT, tunnels[1].tunnel_id) is None


def test_a_failing_verification_is_failed_with_the_devices_reason(sim, device):
    tunnels = make_tunnels(2)
    device.deliver(ACCOUNT, "r", tunnels, deadline=deadline())
    sim.fail_verify([tunnels[0].tunnel_id])
    results = device.verify(ACCOUNT, "r", tunnels, deadline=deadline())
    assert results[tunnels[0].tunnel_id].status is DeviceStatus.FAILED
    assert "AUTHENTICATION_FAILED" in results[tunnels[0].tunnel_id].reason
    assert results[tunnels[1].tunnel_id].ok


@pytest.mark.parametrize("status, expect, words", [
    (403, DeviceStatus.FAILED, "the device refused the call: HTTP 403"),
    (307, DeviceStatus.FAILED, "redirects are not followed"),
    (503, DeviceStatus.UNKNOWN, "the device failed (HTTP 503"),
])
def test_http_statuses(sim, device, status, expect, words):
    sim.fail_next("device.deliver", status=status)
    tunnels = make_tunnels(2)
    results = device.deliver(ACCOUNT, "r", tunnels, deadline=deadline())
    assert set(statuses(results).values()) == {expect}
    assert all(words in r.reason for r in results.values())
    assert sim.keys_of(ACCOUNT) == {}  # a faulted request was not acted on


def test_a_hanging_device_is_unknown_and_may_act_after_the_caller_gave_up(sim):
    device = WebhookDevice("sim", sim.url, Secret(sim.secret), timeout=1)
    tunnels = make_tunnels(1)
    sim.hang_next(2.0)
    try:
        results = device.deliver(ACCOUNT, "r", tunnels, deadline=deadline())
    finally:
        device.close()
    (r,) = results.values()
    assert r.status is DeviceStatus.UNKNOWN and "no answer within 1s" in r.reason
    end = time.monotonic() + 10
    while sim.held(ACCOUNT, tunnels[0].tunnel_id) is None and time.monotonic() < end:
        time.sleep(0.05)
    # This is why a timeout is never "failed": the device took the key after all.
    assert sim.held(ACCOUNT, tunnels[0].tunnel_id) == tunnels[0].psk.reveal()


def test_a_dropped_answer_is_unknown(sim, device):
    sim.drop_next("device.deliver")
    tunnels = make_tunnels(1)
    (r,) = device.deliver(ACCOUNT, "r", tunnels, deadline=deadline()).values()
    assert r.status is DeviceStatus.UNKNOWN and "after the request went out" in r.reason
    assert sim.held(ACCOUNT, tunnels[0].tunnel_id) == tunnels[0].psk.reveal()


@pytest.mark.parametrize("acted, variant", [(True, "html"), (False, "html"), (False, "deep")])
def test_a_garbage_answer_is_unknown(sim, device, acted, variant):
    if acted:
        sim.answer_garbage()
    else:
        sim.garbage_next("device.deliver", variant=variant)
    tunnels = make_tunnels(2)
    with structlog.testing.capture_logs() as logs:
        results = device.deliver(ACCOUNT, "r", tunnels, deadline=deadline())
    assert set(statuses(results).values()) == {DeviceStatus.UNKNOWN}
    assert "unreadable answer (HTTP 200, the answer is not JSON)" in next(iter(results.values())).reason
    assert logs[0]["event"] == "device_webhook_garbage"
    assert (sim.held(ACCOUNT, tunnels[0].tunnel_id) is not None) is acted


def test_a_trickling_answer_is_cut_at_the_total_deadline(sim):
    sim.trickle_next("device.deliver", interval=0.3)
    device = WebhookDevice("sim", sim.url, Secret(sim.secret), timeout=1)
    started = time.monotonic()
    try:
        (r,) = device.deliver(ACCOUNT, "r", make_tunnels(1), deadline=deadline()).values()
    finally:
        device.close()
    assert time.monotonic() - started < 1 + 5  # each byte arrives in time; only the total deadline ends it
    assert r.status is DeviceStatus.UNKNOWN and "no answer within 1s" in r.reason


def test_a_wrong_signing_key_is_refused_by_the_device(sim):
    device = WebhookDevice("sim", sim.url, Secret("not-the-shared-secret-0000"), timeout=5)
    try:
        results = device.deliver(ACCOUNT, "r", make_tunnels(1), deadline=deadline())
    finally:
        device.close()
    (r,) = results.values()
    assert r.status is DeviceStatus.FAILED and "HTTP 401" in r.reason and "does not match" in r.reason


def test_a_closed_port_fails_without_reaching_anyone():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    device = WebhookDevice("gone", f"http://127.0.0.1:{port}/psk", Secret("x" * 32), timeout=5)
    try:
        (r,) = device.deliver(ACCOUNT, "r", make_tunnels(1), deadline=deadline()).values()
    finally:
        device.close()
    assert r.status is DeviceStatus.FAILED and r.reason.startswith("not delivered: cannot connect to")


def test_one_call_is_spread_over_the_devices_concurrency(sim):
    sim.set_verify_latency(0.05)
    tunnels = make_tunnels(10)
    for concurrency, posts in ((4, 4), (1, 1), (16, 10)):
        sim.calls.clear()
        # A rotation id of its own per round: the rounds' bodies differ, so a round that lands within the
        # same second as another is not a byte-identical signed replay (which the receiver rightly refuses).
        run = f"r-{concurrency}"
        device = WebhookDevice("sim", sim.url, Secret(sim.secret), timeout=10, concurrency=concurrency)
        try:
            assert all(r.ok for r in device.deliver(ACCOUNT, run, tunnels, deadline=deadline()).values())
            results = device.verify(ACCOUNT, run, tunnels, deadline=deadline())
        finally:
            device.close()
        assert set(results) == {t.tunnel_id for t in tunnels} and all(r.ok for r in results.values())
        verified = sorted(tid for c in sim.calls_of("verify") for tid in c.tunnel_ids)
        assert len(sim.calls_of("verify")) == posts and verified == sorted(t.tunnel_id for t in tunnels)


def test_reasons_from_the_device_are_redacted(sim, device):
    tunnels = make_tunnels(2)
    sim.refuse([tunnels[0].tunnel_id])
    sim.name = "echo " + tunnels[0].psk.reveal()  # the device echoes a key in its reason
    results = device.deliver(ACCOUNT, "r", tunnels, deadline=deadline())
    assert results[tunnels[0].tunnel_id].reason == "echo **redacted** refused the key"
    assert_no_key(repr(results), tunnels)


# -- TLS -------------------------------------------------------------------------------------------

@pytest.fixture
def tls_server(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    bodies: list[bytes] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{httpd.server_address[1]}/psk", str(cert), bodies
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def test_tls_is_verified(tls_server):
    url, cert, bodies = tls_server
    tunnels = make_tunnels(1)
    untrusted = WebhookDevice("tls", url, Secret("s" * 32), timeout=5)
    trusted = WebhookDevice("tls", url, Secret("s" * 32), timeout=5, cacert=cert)
    try:
        (r,) = untrusted.deliver(ACCOUNT, "r", tunnels, deadline=deadline()).values()
        assert r.status is DeviceStatus.FAILED and "CERTIFICATE_VERIFY_FAILED" in r.reason
        assert bodies == []  # nothing crossed an unverified connection
        (r,) = trusted.deliver(ACCOUNT, "r", tunnels, deadline=deadline()).values()
        assert r.status is DeviceStatus.OK and len(bodies) == 1
    finally:
        untrusted.close()
        trusted.close()


# -- the receiving side ----------------------------------------------------------------------------

def test_the_receiver_checks_signature_window_and_replays():
    secret = "webhook-receiver-test-key-7d1e0c59a3b8"
    body = json.dumps({"version": 1}).encode()
    now = 1_800_000_000
    ts = str(now)
    headers = {TIMESTAMP_HEADER: ts, SIGNATURE_HEADER: sign(secret, ts, body)}
    receiver = WebhookReceiver(Secret(secret), window=300)
    receiver.check(headers, body, now=now + 10)
    with pytest.raises(SignatureError, match="replayed request"):
        receiver.check(headers, body, now=now + 20)
    with pytest.raises(SignatureError, match="outside the replay window"):
        WebhookReceiver(secret).check(headers, body, now=now + 301)
    with pytest.raises(SignatureError, match="outside the replay window"):
        WebhookReceiver(secret).check(headers, body, now=now - 301)
    with pytest.raises(SignatureError, match="does not match the body"):
        WebhookReceiver(secret).check(headers, body + b" ", now=now)
    with pytest.raises(SignatureError, match="does not match the body"):
        WebhookReceiver("another-secret-entirely").check(headers, body, now=now)
    with pytest.raises(SignatureError, match="missing or malformed"):
        WebhookReceiver(secret).check({SIGNATURE_HEADER: headers[SIGNATURE_HEADER]}, body, now=now)
    lower = {k.lower(): v for k, v in headers.items()}
    WebhookReceiver(secret).check(lower, body, now=now)  # header names are case-insensitive
    assert sign(secret, ts, body) == "sha256=" + __import__("hmac").new(
        secret.encode(), f"{ts}.".encode() + body, "sha256").hexdigest()
    assert secret not in repr(receiver)
