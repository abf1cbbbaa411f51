"""plan() is pure: the same listing, records, policies and clock give the same plan."""

from __future__ import annotations

from rotator.errors import VaultError
from rotator.model import Outcome, Record, TunnelInfo
from rotator.rotation.plan import Mode, is_drifted, plan
from rotator.schedule import Policy
from rotator.secret import Secret

A = "023e105f4ecef8ad9ca31a8372d0c353"
DAY = 86400.0
NOW = 1_800_000_000.0


def tunnel(n: int, **kw: object) -> TunnelInfo:
    return TunnelInfo(f"{n:032x}", f"t{n}", **kw)  # type: ignore[arg-type]


def rec(n: int, **kw: object) -> Record:
    return Record(A, f"{n:032x}", 3, **kw)  # type: ignore[arg-type]


def daily(t: TunnelInfo) -> Policy:
    return Policy("daily", every=DAY)


def test_sorts_tunnels_into_due_pending_drifted_and_refused() -> None:
    old, key = "2027-01-01T00:00:00Z", Secret("k")
    tunnels = [tunnel(1), tunnel(2), tunnel(3), tunnel(4, last_generated_on="2027-01-15T00:00:01Z"),
               tunnel(5), TunnelInfo("../x", "bad", problem="not 32 lowercase hex"), tunnel(6)]
    records = {
        tunnels[0].id: rec(1, psk=key, rotated_at=old),  # rotated long ago: due
        tunnels[1].id: rec(2, psk=key, rotated_at="2027-01-15T00:00:00Z"),  # fresh: not due
        tunnels[2].id: rec(3, psk=key, pending_psk=Secret("p"), state="pending"),
        tunnels[3].id: rec(4, psk=key, rotated_at="2027-01-15T00:00:00Z", cf_generated_on="2027-01-15T00:00:00Z"),
        tunnels[4].id: rec(5, psk=key, pending_psk=Secret("p"), state="rolling_back"),
        tunnels[6].id: VaultError("sealed"),
    }
    now = 1_800_000_000.0  # 2027-01-15T08:00:00Z
    p = plan(tunnels, records, daily, now)
    assert p.due == [tunnels[0].id, tunnels[3].id]  # the drifted one is re-keyed
    assert p.pending == [tunnels[2].id, tunnels[4].id]
    assert p.drifted == [tunnels[3].id]
    assert p.refused == ["../x", tunnels[6].id]
    assert [o for _, o, _ in p.settled] == [Outcome.REFUSED, Outcome.UNAPPLIED]
    assert plan(tunnels, records, daily, now, on_drift="report").due == [tunnels[0].id]
    assert plan(tunnels, records, daily, now, reconcile_only=True).due == [tunnels[3].id]  # drift heals anyway


def test_no_policies_means_every_tunnel_is_due_and_unmanaged_ones_are_due_now() -> None:
    tunnels = [tunnel(1), tunnel(2)]
    records = {tunnels[0].id: rec(1, psk=Secret("k"), rotated_at="2027-01-15T00:00:00Z"),
               tunnels[1].id: Record(A, tunnels[1].id)}
    assert plan(tunnels, records, None, NOW).due == [t.id for t in tunnels]
    p = plan(tunnels, records, daily, NOW)
    assert p.due == [tunnels[1].id]
    assert [v.state for v in p.views] == ["active", "unmanaged"]


def test_backoff_after_failures_delays_the_next_attempt() -> None:
    t = tunnel(1)
    records = {t.id: Record(A, t.id)}
    assert plan([t], records, daily, NOW).due == [t.id]
    assert plan([t], records, daily, NOW, failures={t.id: (1, NOW - 1)}).due == []


def test_rollback_mode_needs_a_previous_key() -> None:
    a, b = tunnel(1), tunnel(2)
    records = {a.id: rec(1, psk=Secret("k"), previous_psk=Secret("o")), b.id: rec(2, psk=Secret("k"))}
    p = plan([a, b], records, None, NOW, rollback=True)
    assert [(t.id, m) for t, _, m in p.entries] == [(a.id, Mode.ROLLBACK)] and p.refused == [b.id]


def test_a_pending_or_unmanaged_record_is_never_drift() -> None:
    t = tunnel(1, last_generated_on="2027-02-01T00:00:00Z")
    assert not is_drifted(t, rec(1, psk=Secret("k"), pending_psk=Secret("p"), cf_generated_on="2027-01-01T00:00:00Z"))
    assert not is_drifted(t, Record(A, t.id))
    assert not is_drifted(t, rec(1, psk=Secret("k")))  # no cf_generated_on recorded yet: nothing to compare
    assert is_drifted(t, rec(1, psk=Secret("k"), cf_generated_on="2027-01-01T00:00:00Z"))
