"""The admin API's request boundary over loopback (issue 20, item 4): what it cannot parse is a 400, a
body over the cap is a 413 before the rest of it is read, and the daemon goes on serving."""

from __future__ import annotations

import socket
from urllib.parse import urlparse

import httpx

from rotator.service.admin import MAX_BODY
from tests.helpers import assert_invariant, wait_for
from tests.test_daemon import ADMIN, daemon, metric  # noqa: F401  (the fixture)

AUTH = {"Authorization": f"Bearer {ADMIN}"}


def _raw_exchange(url: str, head: bytes, body: bytes) -> bytes:
    """Send a request whose body may be shorter than it says; return what came back before the socket closed."""
    parsed = urlparse(url)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=10) as conn:
        conn.sendall(head + body)
        answer = b""
        while b"\r\n\r\n" not in answer:  # bounded by the socket timeout
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer


def _first_run_done(daemon, acc: str) -> None:  # noqa: F811
    """The daemon's first tick rotates every tunnel; the invariant is asserted once it has settled."""
    wait_for(lambda: metric(httpx.get(daemon.admin_url + "/metrics").text, "psk_rotator_rotations_total",
                            account=acc, result="rotated") == 6, timeout=60, what="the first run")


def test_a_deeply_nested_body_is_a_400_not_a_500(sims, daemon):  # noqa: F811
    acc = next(iter(sims.tunnels_by_account))
    url = daemon.admin_url
    _first_run_done(daemon, acc)
    nested = b'{"account": "' + acc.encode() + b'", "tunnels": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    assert len(nested) < MAX_BODY
    r = httpx.post(url + "/v1/rotations", content=nested, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "body must be JSON", r.text
    for garbage in (b"{", b"\xff\xfe", b""):
        assert httpx.post(url + "/v1/rotations", content=garbage, headers=AUTH).status_code == 400
    assert not daemon.runs.get(""), "nothing was queued"
    assert_invariant(sims, acc)


def test_an_oversized_body_is_a_413_without_reading_it_whole(sims, daemon):  # noqa: F811
    acc = next(iter(sims.tunnels_by_account))
    url = daemon.admin_url
    _first_run_done(daemon, acc)
    host = urlparse(url).netloc.encode()
    # It says 30 MB and sends 10 bytes: an answer at all shows the server did not wait for the rest.
    head = (b"POST /v1/rotations HTTP/1.1\r\nHost: " + host + b"\r\nAuthorization: Bearer " + ADMIN.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 31457280\r\n\r\n")
    answer = _raw_exchange(url, head, b'{"account"')
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # Without a length (chunked), the cap holds while reading: the server stops at the cap.
    def chunks():
        for _ in range(4):
            yield b" " * MAX_BODY

    r = httpx.post(url + "/v1/rotations", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413 and "KiB" in r.json()["error"]
    # Just under the cap is read and judged as usual (a JSON body that asks for nothing valid: 400).
    padded = b'{"account": "' + acc.encode() + b'"}' + b" " * (MAX_BODY - 100)
    assert httpx.post(url + "/v1/rotations", content=padded, headers=AUTH).status_code == 400
    # The daemon goes on serving: an ordinary request is taken and runs.
    r = httpx.post(url + "/v1/rotations", json={"account": acc, "all": True}, headers=AUTH)
    assert r.status_code == 202, r.text
    wait_for(lambda: httpx.get(url + r.json()["href"], headers=AUTH).json()["state"] == "done", timeout=30,
             what="the run")
    assert_invariant(sims, acc, strict=True)
