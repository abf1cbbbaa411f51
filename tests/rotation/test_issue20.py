"""Issue 20 (items 1, 2, 6 and 9), in memory: each test reproduces one defect found on main and ends
with the invariant of DESIGN.md section 2 for both ends (Cloudflare and the far-end device)."""

from __future__ import annotations

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


