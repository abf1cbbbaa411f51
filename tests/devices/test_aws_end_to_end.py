"""``aws_vpn`` end to end: the Vault and Cloudflare simulators and the EC2 fake over loopback, the
rotator as users run it (config file, boto3's standard credential chain and AWS_ENDPOINT_URL_EC2).
Every test ends with the invariant for both ends: Cloudflare's key and the AWS tunnel's key each
readable from the latest Vault version (docs/design.md section 2)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import pytest

from rotator.model import Outcome
from rotator.rotation.engine import RunRequest
from rotator.sim import Simulators
from tests import helpers
from tests.helpers import assert_both_ends, record, run_cli, start_cli, wait_for, write_config

REPLACEMENT = 2.0  # seconds AWS (the fake) takes to replace a tunnel endpoint
POLICY = '[policies.default]\nevery = "30d"\npsk_charset = "aws"\n'


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[Simulators]:
    """Four Cloudflare tunnels on two AWS VPN connections (tunnels 1+2, 3+4), all UP."""
    with Simulators(accounts=1, tunnels=4, aws=True, aws_replacement=REPLACEMENT) as sims:
        for name, value in sims.env().items():
            if name.startswith("AWS_"):
                monkeypatch.setenv(name, value)  # boto3 reads its standard variables in this process
        helpers.remember_secrets(sims)
        try:
            yield sims
        finally:
            assert sims.aws_sim is not None
            helpers.SECRETS.update(sims.aws_sim.scan_secrets())
            helpers.remember_secrets(sims)


def config(sims: Simulators, verify_timeout: str = "20s", extra: str = "") -> str:
    return POLICY + "[cloudflare]\nbatch_size = 10\n" + sims.aws_config(verify_timeout=verify_timeout) + extra


def account(sims: Simulators) -> str:
    return next(iter(sims.tunnels_by_account))


def endpoint(sims: Simulators, tid: str) -> str:
    with sims.cloudflare.lock:
        return str(sims.cloudflare.accounts[account(sims)][tid].customer_endpoint)


def held(sims: Simulators):
    def key(acc: str, tid: str) -> str | None:
        assert sims.aws_sim is not None
        try:
            return sims.aws_sim.key_of(endpoint(sims, tid))
        except KeyError:
            return None  # not on AWS
    return key


def rotate(sims: Simulators, tmp_path, text: str, **kw: Any):
    with helpers.custom_runtime(sims, text, tmp_path) as rt:
        opts = rt.request_options(account(sims))
        return rt.engine.run(RunRequest(account(sims), **{**opts, **kw}))


def outcomes(report) -> dict[str, Outcome]:
    return {o.tunnel_id: o.result for o in report.outcomes}


def fake(sims: Simulators):
    assert sims.aws_sim is not None
    return sims.aws_sim


def manage(sims: Simulators, tmp_path) -> None:
    """One clean rotation first, so every tunnel's keys are in Vault before a fault is injected."""
    assert rotate(sims, tmp_path, config(sims)).ok
    assert_both_ends(sims, account(sims), held(sims), strict=True)
    fake(sims).modifications.clear()


def test_a_rotation_reaches_both_ends_pair_by_pair(aws: Simulators, tmp_path) -> None:
    acc, tids = account(aws), aws.tunnels_by_account[account(aws)]
    report = rotate(aws, tmp_path, config(aws))
    assert report.ok, [(o.name, o.result, o.reason) for o in report.outcomes]
    assert assert_both_ends(aws, acc, held(aws), strict=True) == 4
    mods = fake(aws).modifications_of()
    assert sorted(m.outside_ip for m in mods) == sorted(endpoint(aws, t) for t in tids)  # each tunnel once
    for conn in fake(aws).connections:  # the two tunnels of one connection never modify together
        first, second = sorted(m.at for m in mods if m.connection_id == conn)
        assert second - first >= REPLACEMENT
    assert (record(aws, acc, tids[0]) or {}).get("device") == "aws"


@pytest.mark.parametrize(("fault", "expected"), [
    ("refuse", Outcome.REFUSED), ("server_error", Outcome.UNKNOWN), ("timeout", Outcome.UNKNOWN)])
def test_a_modification_refused_answered_5xx_or_timed_out(aws: Simulators, tmp_path, fault: str,
                                                          expected: Outcome) -> None:
    manage(aws, tmp_path)
    acc = account(aws)
    tid = aws.tunnels_by_account[acc][0]
    before = aws.cloudflare.psk_of(acc, tid)
    if fault == "refuse":
        fake(aws).refuse_next("ModifyVpnTunnelOptions", "InvalidParameterValue", "Invalid value for PreSharedKey")
    elif fault == "server_error":
        fake(aws).server_error_next("ModifyVpnTunnelOptions")
    else:
        fake(aws).late_next("ec2.ModifyVpnTunnelOptions", delay=8.0)  # AWS acts; the answer comes too late
    report = rotate(aws, tmp_path, config(aws), tunnels=[tid])
    assert outcomes(report)[tid] is expected, report.outcomes[0].reason
    assert aws.cloudflare.psk_of(acc, tid) == before  # Cloudflare never saw the key
    assert_both_ends(aws, acc, held(aws), strict=expected is Outcome.REFUSED)
    landed = len(fake(aws).modifications_of(endpoint(aws, tid)))
    assert landed == (1 if fault == "timeout" else 0)
    if expected is Outcome.UNKNOWN:  # reconcile finishes it; a key already on AWS is not sent again
        report = rotate(aws, tmp_path, config(aws), reconcile_only=True)
        assert outcomes(report)[tid] is Outcome.ROTATED, report.outcomes[0].reason
        assert len(fake(aws).modifications_of(endpoint(aws, tid))) == 1
        assert_both_ends(aws, acc, held(aws), strict=True)


def test_a_tunnel_that_never_comes_up_rolls_both_ends_back(aws: Simulators, tmp_path) -> None:
    manage(aws, tmp_path)
    acc = account(aws)
    tid = aws.tunnels_by_account[acc][0]
    old = aws.cloudflare.psk_of(acc, tid)
    fake(aws).hold_down([endpoint(aws, tid)])  # the AWS side never negotiates on the new key
    # the partner is up by AWS's telemetry, so the tunnel may start
    report = rotate(aws, tmp_path, config(aws, verify_timeout="6s"), tunnels=[tid])
    assert outcomes(report)[tid] is Outcome.ROLLED_BACK, report.outcomes[0].reason
    assert aws.cloudflare.psk_of(acc, tid) == old and fake(aws).key_of(endpoint(aws, tid)) == old
    assert len(fake(aws).modifications_of(endpoint(aws, tid))) == 2  # the new key, then the old one back
    assert_both_ends(aws, acc, held(aws), strict=True)


def test_an_unmatched_tunnel_is_refused_and_nothing_is_sent(aws: Simulators, tmp_path) -> None:
    acc = account(aws)
    tid = aws.tunnels_by_account[acc][0]
    aws.cloudflare.set_endpoints(acc, tid, customer_endpoint="192.0.2.77")
    report = rotate(aws, tmp_path, config(aws), tunnels=[tid])
    assert outcomes(report)[tid] is Outcome.REFUSED
    assert "192.0.2.77" in (report.outcomes[0].reason or "") and "eu-west-1" in (report.outcomes[0].reason or "")
    assert fake(aws).modifications_of() == []
    assert_both_ends(aws, acc, held(aws), strict=True)


def test_a_tunnel_waits_while_its_partner_is_down(aws: Simulators, tmp_path) -> None:
    acc = account(aws)
    first, partner = aws.tunnels_by_account[acc][:2]
    fake(aws).hold_down([endpoint(aws, partner)])
    report = rotate(aws, tmp_path, config(aws), tunnels=[first])
    assert outcomes(report)[first] is Outcome.SKIPPED
    assert (report.outcomes[0].reason or "").startswith("partner down") and report.partner_down == [first]
    assert fake(aws).modifications_of() == []
    assert_both_ends(aws, acc, held(aws), strict=True)
    fake(aws).clear()
    assert rotate(aws, tmp_path, config(aws), tunnels=[first]).ok
    assert_both_ends(aws, acc, held(aws), strict=True)


def test_sigkill_while_the_connection_is_modifying_then_reconcile(aws: Simulators, tmp_path) -> None:
    manage(aws, tmp_path)
    acc = account(aws)
    tids = aws.tunnels_by_account[acc]
    path = write_config(tmp_path, config(aws, verify_timeout="30s"))
    proc = start_cli(["rotate", "--account", acc, "--all", "--local", "--config", path], aws.env())
    try:
        wait_for(lambda: len(fake(aws).modifications_of()) >= 2, timeout=60, what="the first wave's modifications")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        out, err = proc.communicate(timeout=30)
        helpers.OUTPUTS.extend([out, err])
    assert proc.returncode == -signal.SIGKILL
    modifying = [c for c in fake(aws).connections if fake(aws).state_of(c) == "modifying"]
    assert modifying  # killed during the replacement
    assert_both_ends(aws, acc, held(aws))
    before = {t: len(fake(aws).modifications_of(endpoint(aws, t))) for t in tids}
    proc2 = run_cli(["reconcile", "--account", acc, "--local", "--config", path], aws.env(), timeout=120)
    assert proc2.returncode == 0, proc2.stdout + proc2.stderr
    after = {t: len(fake(aws).modifications_of(endpoint(aws, t))) for t in tids}
    held_before = [t for t in tids if before[t]]
    assert len(held_before) == 2
    # a tunnel that already held its pending key was not modified again; one staged ahead once
    assert all(after[t] == before[t] for t in held_before) and all(after[t] <= 1 for t in tids)
    assert_both_ends(aws, acc, held(aws), strict=True)


def test_config_check_refuses_a_policy_aws_cannot_take(aws: Simulators, tmp_path) -> None:
    path = write_config(tmp_path, aws.aws_config())  # the default policy: alnum, may start with '0'
    proc = run_cli(["config", "check", "--config", path], aws.env())
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "\n" not in line and "devices[0] (aws, kind aws_vpn)" in line and "start with '0'" in line
    assert "Traceback" not in proc.stderr
    ok = write_config(tmp_path, config(aws))
    checked = run_cli(["config", "check", "--one-shot", "--config", ok], aws.env())
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_daemon_counts_the_tunnels_waiting_for_their_partner(aws: Simulators, tmp_path) -> None:
    import httpx

    from rotator import config as config_mod
    from rotator.service.daemon import build_daemon
    from tests.test_daemon import ADMIN, metric

    acc = account(aws)
    first, partner = aws.tunnels_by_account[acc][:2]
    fake(aws).hold_down([endpoint(aws, partner)])
    text = (f'[admin]\nlisten = "127.0.0.1:0"\n[[accounts]]\nid = "{acc}"\n' + config(aws, verify_timeout="6s")
            .replace('every = "30d"', 'every = "1h"'))
    d = build_daemon(config_mod.load(write_config(tmp_path, text), env={**aws.env(), "ROTATOR_ADMIN_TOKEN": ADMIN}),
                     tick_seconds=3600)
    d.start()
    try:
        url = d.admin_url

        def gauge() -> float | None:
            return metric(httpx.get(url + "/metrics").text, "psk_rotator_partner_down_tunnels", account=acc)

        def runs() -> float:  # every label set is exported at 0 from the start: wait for one to count
            text = httpx.get(url + "/metrics").text
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("psk_rotator_runs_total{") and f'account="{acc}"' in line)

        wait_for(lambda: runs() >= 1, timeout=60, what="the first run")
        assert gauge() == 1  # the first tunnel waits; its partner, down anyway, was tried and rolled back
        assert (record(aws, acc, first) or {}).get("pending_psk") is None
    finally:
        d.stop()
    assert_both_ends(aws, acc, held(aws), strict=True)
