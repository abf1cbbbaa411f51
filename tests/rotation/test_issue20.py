"""Issue 20 (items 1, 2, 6 and 9), in memory: each test reproduces one defect found on main and ends
with the invariant of docs/design.md section 2 for both ends (Cloudflare and the far-end device)."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import pytest

from rotator.model import Outcome, Record, RepeatedTunnel
from rotator.rotation import steps
from rotator.rotation.plan import Mode, plan
from rotator.secret import Secret
from tests.fakes import ACCOUNT, FakeVault
from tests.rotation.test_devices import dev, device_world
from tests.rotation.world import World

# -- item 1: a tunnel listed twice -----------------------------------------------------------------


def by_name(w: World) -> Any:
    """The device owns the tunnels named tun*: a second name matches no device (as in the issue)."""
    device = dev(w)
    return lambda t: device if t.name.startswith("tun") else None


def sent_to_cloudflare(w: World) -> list[str]:
    """Every tunnel id sent to Cloudflare from now on, validate_only or not."""
    seen: list[str] = []

    def spy(_account: str, psks: Any) -> None:
        seen.extend(psks)
    for op in ("validate", "apply"):
        w.cf.faults.on(op, spy, times=1000)
    return seen


@pytest.mark.parametrize("asked", ["all", "by id", "by the second name"])
def test_a_tunnel_listed_twice_is_reported_once_and_nothing_is_written_or_sent(asked: str) -> None:
    w = device_world()
    t1 = w.ids[0]
    w.cf.list_twice(ACCOUNT, t1, "branch-x-dup")
    version, ends = w.rec(t1).version, (w.cf.key_of(t1), dev(w).keys[t1])
    sent = sent_to_cloudflare(w)
    tunnels = {"all": None, "by id": [t1, *w.ids[1:]], "by the second name": ["branch-x-dup", *w.ids[1:]]}[asked]
    report = w.run(tunnels=tunnels, device_for=by_name(w))
    mine = [o for o in report.outcomes if o.tunnel_id == t1]
    assert len(mine) == 1 and mine[0].result == Outcome.REFUSED, [(o.result, o.name) for o in mine]
    assert "tun00001" in mine[0].name and "branch-x-dup" in mine[0].name
    assert "listing names tunnel" in (mine[0].reason or "") and "branch-x-dup" in (mine[0].reason or "")
    assert len(report.outcomes) == 4 and report.counts()[Outcome.ROTATED] == 3 and not report.ok
    assert w.rec(t1).version == version  # no Vault write
    assert (w.cf.key_of(t1), dev(w).keys[t1]) == ends and t1 not in sent  # nothing sent anywhere
    w.invariant(strict=True)


def test_a_tunnel_listed_twice_with_a_key_in_flight_keeps_it_pending() -> None:
    w = device_world()
    t1 = w.ids[0]
    dev(w).faults.on("verify", lambda d, tunnels, deadline: {})  # no answer: the key stays pending
    assert [o.result for o in w.run(tunnels=[t1]).outcomes] == [Outcome.UNKNOWN]
    pending = w.rec(t1)
    w.cf.list_twice(ACCOUNT, t1, "branch-x-dup")
    report = w.run(reconcile_only=True, device_for=by_name(w))
    assert [o.result for o in report.outcomes] == [Outcome.REFUSED]
    assert w.rec(t1).version == pending.version and w.rec(t1).pending_psk == pending.pending_psk
    w.invariant()
    w.cf.tunnels[ACCOUNT].pop()  # the listing is sound again: reconcile finishes the rotation
    assert [o.result for o in w.run(reconcile_only=True).outcomes] == [Outcome.ROTATED]
    w.invariant(strict=True)


def test_plan_takes_a_tunnel_listed_twice_once_as_refused() -> None:
    from rotator.model import TunnelInfo

    t = TunnelInfo("a" * 32, "one")
    the_plan = plan([t, TunnelInfo("a" * 32, "two")], {t.id: Record(ACCOUNT, t.id, 2, psk=Secret("k"))}, None, 0.0)
    assert the_plan.entries == [] and len(the_plan.settled) == 1
    assert the_plan.settled[0][0].name == "one / two" and the_plan.settled[0][1] == Outcome.REFUSED


def test_every_step_and_the_store_refuse_a_batch_with_a_repeated_tunnel() -> None:
    w = device_world()
    rec = w.rec(w.ids[0])
    tunnel = w.cf.list_tunnels(ACCOUNT)[0]
    items = [steps.Item(tunnel, rec, Mode.FRESH, Secret("k1" * 20)), steps.Item(tunnel, rec, Mode.FRESH,
                                                                                 Secret("k2" * 20))]
    for step in (*steps.FORWARD, *steps.BACKWARD):
        with pytest.raises(RepeatedTunnel, match=step.__name__):
            step(None, items)  # type: ignore[arg-type]  # refused before the step looks at its context
    with pytest.raises(RepeatedTunnel, match="write_many"):
        FakeVault().write_many([Record(ACCOUNT, rec.tunnel_id), Record(ACCOUNT, rec.tunnel_id)])
    assert w.rec(w.ids[0]).version == rec.version
    w.invariant(strict=True)




# -- item 2: an acknowledgement names what it confirms ---------------------------------------------

def manual_world_waiting() -> tuple[World, str]:
    from tests.fakes import waiting

    w = device_world(kind="manual", verify=False)
    dev(w).faults.on("deliver", waiting, times=10)
    dev(w).faults.on("rollback", waiting, times=10)
    return w, w.ids[0]


def test_an_ack_meant_for_the_new_key_never_completes_a_rollback_and_loses_it() -> None:
    """The K1 loss of issue 20: K1 is staged and waits; the operator types it into the device; the
    ack_timeout passes and a reconcile withdraws K1 (rolling_back); the operator then acknowledges,
    meaning "the device holds K1". That must not be taken for "back on the old key"."""
    w, t1 = manual_world_waiting()
    report = w.run(tunnels=[t1], ack_timeout=3600.0)
    k1, rotation = w.rec(t1).pending_psk, w.rec(t1).rotation_id
    assert k1 is not None and rotation is not None
    assert f"--rotation {rotation} --holds new" in (report.outcomes[0].reason or "")  # the run prints the command
    dev(w).keys[t1] = k1.reveal()  # the operator typed K1 into the device
    w.engine.clock = lambda: 4e9  # the ack_timeout passed
    report = w.run(tunnels=[t1], reconcile_only=True, ack_timeout=3600.0)
    assert w.rec(t1).state == "rolling_back" and "--holds previous" in (report.outcomes[0].reason or "")
    for asked in ({}, {"holds": "new"}, {"holds": "new", "rotation_id": rotation}):
        answer = w.engine.acknowledge(ACCOUNT, [t1], **asked)  # as `rotator ack` was typed, and with --holds new
        assert "rolling" in (answer[t1] or ""), answer
        assert f"--rotation {rotation} --holds previous" in (answer[t1] or ""), answer
        w.run(tunnels=[t1], reconcile_only=True, ack_timeout=3600.0)
        assert w.rec(t1).pending_psk == k1  # K1 stays readable while the device holds it
        w.invariant()
    dev(w).keys[t1] = w.rec(t1).psk.reveal()  # type: ignore[union-attr]  # the operator puts the old key back
    assert w.engine.acknowledge(ACCOUNT, [t1], holds="previous", rotation_id=rotation) == {t1: None}
    report = w.run(tunnels=[t1], reconcile_only=True, ack_timeout=3600.0)
    assert [o.result for o in report.outcomes] == [Outcome.ROLLED_BACK]
    w.invariant(strict=True)


def test_an_ack_for_a_rotation_the_record_moved_on_from_is_refused() -> None:
    w, t1 = manual_world_waiting()
    w.run(tunnels=[t1])
    first = w.rec(t1).rotation_id
    answer = w.engine.acknowledge(ACCOUNT, [t1], holds="new", rotation_id="20260101T000000Z-abcdef")
    assert "moved on" in (answer[t1] or "") and f"--rotation {first} --holds new" in (answer[t1] or "")
    assert "nothing to go back from" in (w.engine.acknowledge(ACCOUNT, [t1], holds="previous")[t1] or "")
    assert not w.rec(t1).acked
    w.invariant()
    assert w.engine.acknowledge(ACCOUNT, [t1], holds="new", rotation_id=first) == {t1: None}
    dev(w).keys[t1] = w.rec(t1).pending_psk.reveal()  # type: ignore[union-attr]
    assert [o.result for o in w.run(tunnels=[t1], reconcile_only=True).outcomes] == [Outcome.ROTATED]
    w.invariant(strict=True)


# -- item 6: a rollback is not drift -----------------------------------------------------------------

def test_a_rolled_back_tunnel_is_not_drifted_and_is_retried_once_per_back_off_step() -> None:
    """Verification fails for every attempt: each one rolls both ends back. The rollback's own apply
    at Cloudflare must be recorded, so no run takes it for drift and re-keys it past the back-off."""
    from rotator.rotation.plan import is_drifted
    from rotator.schedule import Policy, backoff
    from tests.fakes import refuse

    w = device_world(n=1)
    t1 = w.ids[0]
    dev(w).faults.on("verify", refuse("IKE_AUTH failed: AUTHENTICATION_FAILED"), times=1000)
    policy = Policy("daily", every=86400.0, retry_backoff=600.0, retry_backoff_max=2400.0)
    now = [2_000_000_000.0]
    w.engine.clock = lambda: now[0]
    failures: dict[str, tuple[int, float]] = {}  # as the daemon keeps them (service/daemon.py _record)
    attempts: list[float] = []
    for _ in range(150):  # 150 runs a minute apart (a virtual clock)
        count, last = failures.get(t1, (0, 0.0))
        due = not attempts or now[0] >= last + backoff(policy, count)
        report = w.run(policy_for=lambda t: policy, failures=dict(failures))
        assert not report.drifted and not is_drifted(w.cf.list_tunnels(ACCOUNT)[0],
                                                     w.rec(t1))
        outcome = w.by_id(report).get(t1)
        assert (outcome is not None) == due, f"at +{now[0] - 2e9:.0f}s: attempted={outcome is not None}, due={due}"
        if outcome is not None:
            assert outcome.result == Outcome.ROLLED_BACK, outcome.reason
            attempts.append(now[0])
            failures[t1] = (count + 1, now[0])
        w.invariant(strict=True)
        now[0] += 60.0
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert gaps == [600.0, 1200.0, 2400.0, 2400.0], gaps  # one attempt per back-off step, capped


# -- item 9: a dry run answers what the run will do ----------------------------------------------------

def test_a_dry_run_answers_what_the_run_does_for_a_key_whose_device_left_the_config() -> None:
    from tests.fakes import hang

    w = device_world()
    t1 = w.ids[0]
    dev(w).faults.on("deliver", hang())  # the device takes the key, the answer is lost: pending
    assert [o.result for o in w.run(tunnels=[t1]).outcomes] == [Outcome.UNKNOWN]
    dev(w).faults.clear()
    device = dev(w)
    gone = {"device_for": lambda t: None if t.id == t1 else device}  # the config no longer names t1's device
    versions = {t: w.rec(t).version for t in w.ids}
    dry = w.run(dry_run=True, **gone)
    assert {t: w.rec(t).version for t in w.ids} == versions  # a dry run changes nothing
    real = w.run(**gone)
    assert [(o.tunnel_id, o.result) for o in dry.outcomes if o.tunnel_id == t1] == [(t1, Outcome.UNKNOWN)]
    assert {o.tunnel_id: (o.result, o.reason) for o in dry.outcomes if o.tunnel_id == t1} == \
        {o.tunnel_id: (o.result, o.reason) for o in real.outcomes if o.tunnel_id == t1}
    assert {o.result for o in dry.outcomes if o.tunnel_id != t1} == {Outcome.WOULD_ROTATE}
    assert w.rec(t1).pending_psk is not None
    w.invariant()


def test_status_says_what_a_manual_tunnel_waits_for_and_the_command_in_both_states() -> None:
    from rotator.model import TunnelInfo
    from rotator.service.inventory import assess

    tunnel = TunnelInfo("b" * 32, "desk-1")
    base = Record(ACCOUNT, tunnel.id, 4, psk=Secret("old" * 10), pending_psk=Secret("new" * 10),
                  state="pending", rotation_id="20261202T101500Z-a1b2c3", device="desk")
    pending = assess(None, tunnel, base, 0.0, manual=True)
    assert pending.ack_command == (f"rotator ack --account {ACCOUNT} --tunnel {tunnel.id} "
                                   "--rotation 20261202T101500Z-a1b2c3 --holds new")
    assert "new key of rotation 20261202T101500Z-a1b2c3" in (pending.waits_for or "")
    back = assess(None, tunnel, replace(base, state="rolling_back"), 0.0, manual=True)
    assert (back.ack_command or "").endswith("--holds previous") and "previous key" in (back.waits_for or "")
    assert assess(None, tunnel, base, 0.0).ack_command is None  # an automatic device is not waited for
    assert assess(None, tunnel, replace(base, pending_psk=None), 0.0, manual=True).ack_command is None
    assert "new" * 10 not in repr(pending.as_dict(0.0)) + repr(back.as_dict(0.0))
