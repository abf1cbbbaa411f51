"""Leases (DESIGN.md section 4, issue 9 items 3, 4, 8), through the simulators over loopback.

A lease is never handed over while a call it covers may still land; every call's deadline ends
before the lease does; a crashed holder on this host is taken over at once. Every test ends by
asserting the invariant of DESIGN.md section 2.
"""

from __future__ import annotations

import threading
import time

from rotator import config
from rotator.rotation.engine import RunRequest
from rotator.service import daemon as daemon_mod
from rotator.service.daemon import build_daemon
from tests.helpers import assert_invariant, runtime, wait_for, write_config

ADMIN = "a" * 32
LEASES = "cloudflare/magic-ipsec/_leases"


def account(sims):
    return next(iter(sims.tunnels_by_account))


def lease_of(sims, acc):
    return sims.vault.read_data(f"{LEASES}/{acc}") or {}


def applies_settled(sims):
    """Every apply request the Cloudflare simulator received has been handled (landed or refused)."""
    return len(sims.cloudflare.requests_of("cf.psk_apply")) == sims.cloudflare.request_counts().get("cf.psk_apply", 0)


# -- 9.3: a shutdown during a slow apply ----------------------------------------------------------

def test_shutdown_during_a_slow_apply_never_hands_the_account_over(sims, tmp_path, monkeypatch):
    """Regression: stop() used to wait 30 s, then release the lease while the apply was in flight;
    another rotator rotated, and the late apply left Cloudflare on a key Vault only had as previous_psk."""
    acc = account(sims)
    monkeypatch.setattr(daemon_mod, "SHUTDOWN_GRACE", 0.2)  # the grace runs out long before the apply answers
    text = (f'[admin]\nlisten = "127.0.0.1:0"\n[rotation]\nlease_ttl = "10s"\n[cloudflare]\ntimeout = "4s"\n'
            f'[policies.default]\nevery = "1h"\n[[accounts]]\nid = "{acc}"\n')
    settings = config.load(write_config(tmp_path, text), env={**sims.env(), "ROTATOR_ADMIN_TOKEN": ADMIN})
    sims.cloudflare.set_latency(2.5, route="cf.psk_apply")
    d = build_daemon(settings, tick_seconds=3600)
    d.start(serve_admin=False)  # the first tick rotates every tunnel: its apply is slow
    wait_for(lambda: sims.cloudflare.request_counts().get("cf.psk_apply", 0) >= 1, what="the daemon's apply")
    sims.cloudflare.set_latency(0, route="cf.psk_apply")  # only the daemon's apply is slow
    stopper = threading.Thread(target=d.stop)
    stopper.start()  # as SIGTERM does
    other = runtime(sims, "[cloudflare]\ntimeout = 4\n", tmp_path, holder="replica-b")
    reports = []

    def other_rotates_twice():
        reports.append(other.engine.run(RunRequest(acc)))
        return sum(r.ok for r in reports) >= 2

    try:
        # The other rotator tries all along; it may only get the account once no call of the daemon can land.
        wait_for(other_rotates_twice, timeout=40, what="the other rotator to rotate twice")
        stopper.join(timeout=40)
        wait_for(lambda: applies_settled(sims), what="every apply to land")
    finally:
        other.close()
        if stopper.is_alive():
            stopper.join(timeout=40)
    assert not stopper.is_alive()
    assert_invariant(sims, acc)  # the daemon's late apply must not have overwritten the other's key
    assert_invariant(sims, acc, strict=True)


def test_a_lease_with_a_call_in_flight_is_kept(sims, tmp_path):
    """release() while a covered call is in flight keeps the lease; it is released once the call answered."""
    acc = account(sims)
    rt = runtime(sims, "", tmp_path)
    try:
        leases = rt.leases
        leases.acquire(acc)
        with leases.covering(acc, 5.0):
            assert leases.release(acc) is False
            assert lease_of(sims, acc)["holder"] == leases.holder
            assert float(lease_of(sims, acc)["busy_until"]) > time.time()
        assert leases.release(acc) is True
        assert lease_of(sims, acc)["holder"] == "" and "busy_until" not in lease_of(sims, acc)
    finally:
        rt.close()
    assert_invariant(sims, acc, strict=True)
