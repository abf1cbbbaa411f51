"""The report's pure functions on hand-written histories, for the states no run above ends in: keys still
pending, waiting for an acknowledgement, rolling back, a drift re-key in flight; a version current before
the period starts; Vault's nanosecond times; the differences --check prints."""

from __future__ import annotations

from typing import Any

from rotator.model import Record
from rotator.rotation.ports import History, VersionInfo
from rotator.secret import Secret
from rotator.service import report as rpt
from tests.helpers import OUTPUTS, SECRETS

D = 86400
T0 = 1767225600  # 2026-01-01T00:00:00Z
ACC = "1" * 32
KEYS = [f"pure-report-key-{i}-ZXCVBNMasdfghjkl" for i in range(4)]


def at(day: float) -> str:
    return rpt.rfc3339(T0 + day * D) or ""


def rec(tid: str, key: int | None, rotated: float | None, **kw: Any) -> Record:
    SECRETS.update(KEYS)
    pending = kw.pop("pending", None)
    return Record(ACC, tid, psk=Secret(KEYS[key]) if key is not None else None,
                  pending_psk=Secret(KEYS[pending]) if pending is not None else None,
                  rotated_at=at(rotated) if rotated is not None else None, tunnel_name=f"n-{tid[-1]}", **kw)


def hist(tid: str, *versions: tuple[float, Record | None], oldest: int = 0) -> History:
    first = oldest or 1
    listed = tuple(VersionInfo(first + i, at(day), record=r) for i, (day, r) in enumerate(versions))
    return History(ACC, tid, f"secret/p/{ACC}/{tid}", first + len(versions) - 1, oldest, 0, at(versions[0][0]), listed)


def build(*histories: History, start: float = -10, end: float = 20, manual: tuple[str, ...] = ()) -> dict[str, Any]:
    made = rpt.seal(rpt.build({ACC: list(histories)}, lambda *_: ("p", 30.0 * D), T0 + start * D, T0 + end * D,
                              manual))
    OUTPUTS.extend([rpt.render_json(made), rpt.render_csv(made), rpt.render_html(made)])
    return made


def one(made: dict[str, Any], tid: str) -> dict[str, Any]:
    return next(t for t in made["accounts"][0]["tunnels"] if t["tunnel_id"] == tid)


def test_open_items_at_the_end_of_the_period() -> None:
    a, b, c, d = ("a" * 31 + "1", "b" * 31 + "2", "c" * 31 + "3", "d" * 31 + "4")
    made = build(
        hist(a, (-30, rec(a, 0, -30, state="active")), (15, rec(a, 0, -30, state="pending", pending=1, device="desk",
                                                                rotation_id="r1"))),
        hist(b, (-30, rec(b, 0, -30, state="active")), (15, rec(b, 0, -30, state="pending", pending=1, device="desk",
                                                                rotation_id="r2", acked_rotation_id="r2"))),
        hist(c, (-30, rec(c, 0, -30, state="active")), (15, rec(c, 0, -30, state="pending", pending=1, rotation_id="r3")),
             (15, rec(c, 0, -30, state="rolling_back", pending=1, rotation_id="r3", last_error="verification failed"))),
        hist(d, (-30, rec(d, 0, -30, state="active", cf_generated_on="x")),
             (16, rec(d, 0, -30, state="pending", pending=1, rotation_id="r4", drift_generated_on="y",
                      cf_generated_on="x"))),
        manual=("desk",))
    assert made["fleet"]["open"] == {"pending": [b, d], "rolling_back": [c], "waiting_ack": [a], "drifted": [d]}
    [back] = one(made, c)["rollbacks"]
    assert (back["at"], back["reason"], back["completed_at"], back["completed_version"]) == \
        (at(15), "verification failed", None, None)
    [drift] = one(made, d)["drifts"]
    assert (drift["at"], drift["cloudflare_generated_on"], drift["recorded_generated_on"]) == (at(16), "y", "x")
    assert one(made, a)["current"]["state"] == "pending" and one(made, c)["current"]["state"] == "rolling_back"
    # Each key was 30 days old on day 0 and 50 on day 20: over policy from day 0 to the end.
    assert one(made, a)["key_age"]["over_policy"] == [{"from": at(0), "to": at(20), "seconds": 20 * D}]


def test_the_version_current_at_the_start_counts_and_events_before_it_do_not() -> None:
    a = "e" * 32
    made = build(hist(a, (-40, rec(a, 0, -40, state="active", verified_by="none", verified_at=at(-40))),
                      (-15, rec(a, 1, -15, state="active", verified_by="health", verified_at=at(-15))),
                      (5, rec(a, 2, 5, state="active", verified_by="health", verified_at=at(5)))))
    t = one(made, a)
    assert [r["at"] for r in t["rotations"]] == [at(5)]
    assert (t["key_age"]["max_seconds"], t["key_age"]["max_at"]) == (20 * D, at(5))
    assert t["key_age"]["segments"][0] == {"from": at(-10), "to": at(5), "kind": "known", "rotated_at": at(-15),
                                          "version": 2}
    assert made["sources"] == [{"path": f"secret/p/{ACC}/{a}", "versions": [2, 3]}]
    assert made["fleet"]["rotations_by_proof"] == {"health": 1}


def test_a_record_without_a_key_yet_is_unmanaged_not_a_breach() -> None:
    a = "f" * 31 + "0"
    made = build(hist(a, (2, rec(a, None, None, state="pending", pending=0, rotation_id="r"))))
    t = one(made, a)
    assert (t["key_age"]["unmanaged_seconds"], t["key_age"]["verdict"], t["rotations"]) == (30 * D, "within", [])
    assert made["fleet"]["open"]["pending"] == [a]


def test_vault_times_with_nanoseconds() -> None:
    assert rpt.vault_time("2026-01-01T00:00:01.123456789Z") == T0 + 1.123456
    assert rpt.vault_time("2026-01-01T00:00:01Z") == T0 + 1
    assert rpt.vault_time("") is None and rpt.vault_time("garbage") is None


def test_differences_name_each_path() -> None:
    old = {"a": [1, {"b": 2}], "c": 1, "digest": "x"}
    new = {"a": [1, {"b": 3}, 4], "d": 1, "digest": "y"}
    assert rpt.differences(old, new) == [
        "a[1].b: 2 in the file, 3 in Vault's history now", "a[2]: in Vault's history now, not in the file",
        "c: in the file, not in Vault's history now", "d: in Vault's history now, not in the file"]


def test_the_digest_covers_everything_but_itself() -> None:
    made = build(hist("a" * 32, (0, rec("a" * 32, 0, 0, state="active"))))
    assert rpt.intact(made)
    assert rpt.canonical(made) == rpt.canonical({k: v for k, v in made.items() if k != "digest"})
    assert b" " not in rpt.canonical({"a": [1, 2]}) and rpt.canonical({"b": 1, "a": 2}) == b'{"a":2,"b":1}'
    changed = {**made, "period": {**made["period"], "to": at(21)}}
    assert not rpt.intact(changed)


def test_a_copy_of_a_promoting_version_is_not_another_rotation() -> None:
    a = "9" * 32
    promoted = rec(a, 1, 2, state="active", verified_by="ike_reauth", verified_at=at(2), device="edge")
    patched = rec(a, 1, 2, state="active", verified_by="ike_reauth", verified_at=at(2), device="edge",
                  ipsec_id="changed-by-an-operator")
    made = build(hist(a, (0, rec(a, 0, 0, state="active", verified_by="none", verified_at=at(0))), (2, promoted),
                      (3, patched)))
    assert [(r["at"], r["version"]) for r in one(made, a)["rotations"]] == [(at(0), 1), (at(2), 2)]


def test_the_rollback_command_is_a_rotation_that_restores_the_previous_key() -> None:
    a = "8" * 32
    k0, k1 = Secret(KEYS[0]), Secret(KEYS[1])
    v1 = rec(a, 0, 0, state="active", verified_by="ike_reauth", verified_at=at(0))
    v2 = rec(a, 1, 5, state="active", verified_by="ike_reauth", verified_at=at(5))
    v2.previous_psk = k0
    v3 = rec(a, 1, 5, state="pending", rotation_id="rb")
    v3.pending_psk, v3.previous_psk = k0, k0
    v4 = rec(a, 0, 6, state="active", rotation_id="rb", verified_by="ike_reauth", verified_at=at(6))
    v4.previous_psk = k1
    made = build(hist(a, (0, v1), (5, v2), (6, v3), (6, v4)))
    rotations = one(made, a)["rotations"]
    assert [(r["at"], r.get("restores_previous_key", False)) for r in rotations] == \
        [(at(0), False), (at(5), False), (at(6), True)]
