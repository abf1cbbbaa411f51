"""``rotator report``: audit evidence built from Vault's KV v2 version history (issue 19).

The history is made by real rotations through the Vault and Cloudflare simulators over loopback, on a
virtual clock shared by the engine and the Vault simulator's version times (50 days in a second): a
webhook device that verifies (ike_reauth), a manual device acknowledged late (a policy breach), a
verification that fails (a rollback), a key changed at Cloudflare (drift), a record whose old versions
are pruned by max_versions, one with a deleted version, and a hand-written record in the format from
before verified_by existed. Every figure of the report is asserted; the invariant holds at both ends.
"""

from __future__ import annotations

import csv
import io
import json
import tomllib
from typing import Any

import hvac
import pytest

from rotator.adapters.devices import DeviceRegistry, parse_devices
from rotator.model import ack
from rotator.rotation.engine import RunRequest
from rotator.schedule import Policy
from rotator.service import report as rpt
from rotator.sim import Simulators
from rotator.sim.device import start as start_device
from tests import helpers
from tests.devices.test_end_to_end import both_ends

D = 86400
T0 = 1767225600  # 2026-01-01T00:00:00Z, day 0 of the virtual clock
START, END = T0 - D, T0 + 50 * D
POLICY = Policy("audit", every=30 * D, max_age=35 * D)
CONFIG = """
[cloudflare]
batch_size = 10
[policies.audit]
every = "30d"
max_age = "35d"
[[accounts]]
id = "{acc}"
[[accounts.select]]
all = true
policy = "audit"
[[devices]]
name = "desk"
kind = "manual"
tunnels = ["{manual}"]
ack_timeout = "30d"
"""
LEGACY = "f" * 32  # a record written by hand in the format from before verified_by (no such tunnel at Cloudflare)
LEGACY_KEYS = ("legacy-key-one-0123456789abcdefXYZ", "legacy-key-two-0123456789abcdefXYZ")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = float(now)

    def __call__(self) -> float:
        return self.now

    def day(self, n: int) -> None:
        self.now = float(T0 + n * D)


def iso(day: float) -> str:
    return rpt.rfc3339(T0 + day * D) or ""


@pytest.fixture(scope="module")
def history(tmp_path_factory) -> Any:
    tmp = tmp_path_factory.mktemp("report")
    with Simulators(accounts=1, tunnels=6) as sims:
        acc = next(iter(sims.tunnels_by_account))
        t = sims.tunnels_by_account[acc]
        clock = Clock(T0)
        sims.vault.kv_clock = clock
        device = start_device(str(tmp), peer=sims.cloudflare.psk_of)
        text = CONFIG.format(acc=acc, manual=t[2]) + device.config("site", tunnels=(t[0], t[1]), timeout="5s")
        rt = helpers.runtime(sims, text, tmp)
        rt.engine.clock = clock
        registry = DeviceRegistry(parse_devices(tomllib.loads(text)["devices"]))
        root = hvac.Client(url=sims.vault_addr, token=sims.vault.root_token)
        runs: dict[str, str] = {}

        def run(name: str, **kw: Any) -> None:
            opts = {**rt.request_options(acc), "device_for": registry.for_account(acc)}
            report = rt.engine.run(RunRequest(acc, policy_for=lambda _t: POLICY, **{**opts, **kw}))
            runs[name] = report.rotation_id

        def acknowledge(tid: str) -> None:
            current = rt.store.read(acc, tid)
            rt.store.write_many([ack(current, holds="new")])

        def path(tid: str) -> str:
            return f"cloudflare/magic-ipsec/{acc}/{tid}"

        try:
            run("day0")                                   # every tunnel's first key; t2 waits for its ack
            acknowledge(t[2])
            run("day0-ack", reconcile_only=True)
            root.secrets.kv.v2.update_metadata(path(t[4]), max_versions=2)
            clock.day(30)
            device.sim.fail_verify([t[1]])
            run("day30")                                  # t1 rolled back; t2 waits again (until day 40)
            device.sim.clear()
            root.secrets.kv.v2.delete_secret_versions(path(t[5]), versions=[2])
            clock.day(31)
            run("day31")                                  # t1 due again
            clock.day(40)
            acknowledge(t[2])
            run("day40-ack", reconcile_only=True)         # t2 promoted 5 days past max_age
            clock.day(45)
            sims.cloudflare.change_psk_out_of_band(acc, t[3])
            run("day45")                                  # t3 drifted: re-keyed from Vault
            clock.now = T0 - 100 * D
            legacy = {"state": "active", "account_id": acc, "tunnel_name": "legacy-site", "rotated_at": iso(-100),
                      "psk": LEGACY_KEYS[0]}
            root.secrets.kv.v2.create_or_update_secret(path(LEGACY), secret=legacy, cas=0)
            clock.day(10)
            legacy.update(psk=LEGACY_KEYS[1], previous_psk=LEGACY_KEYS[0], rotated_at=iso(10))
            root.secrets.kv.v2.create_or_update_secret(path(LEGACY), secret=legacy, cas=1)
            clock.day(50)
            helpers.SECRETS.update(LEGACY_KEYS)
            helpers.SECRETS.update(device.sim.keys.values())
            made = rpt.collect(rt.store, [acc], rpt.policy_lookup(rt.settings), START, END, ["desk"])
            yield {"sims": sims, "acc": acc, "t": t, "runs": runs, "report": made, "rt": rt, "device": device.sim,
                   "config": text, "tmp": tmp, "root": root, "path": path}
        finally:
            helpers.remember_secrets(sims)
            registry.close()
            rt.close()
            device.stop()


def tunnels(h: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["tunnel_id"]: t for t in h["report"]["accounts"][0]["tunnels"]}


def rotations(tunnel: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    return [(r["at"], r["verified_by"], r["device"]) for r in tunnel["rotations"]]


def test_both_ends_hold_what_vault_says_after_the_whole_history(history) -> None:
    sims, acc = history["sims"], history["acc"]
    assert both_ends(sims, acc, history["device"], strict=True) == 6


def test_verified_rotations_name_their_proof_and_device(history) -> None:
    t, runs, by = history["t"], history["runs"], tunnels(history)
    assert rotations(by[t[0]]) == [(iso(0), "ike_reauth", "site"), (iso(30), "ike_reauth", "site")]
    assert [r["rotation_id"] for r in by[t[0]]["rotations"]] == [runs["day0"], runs["day30"]]
    assert [r["verified_at"] for r in by[t[0]]["rotations"]] == [iso(0), iso(30)]
    assert by[t[0]]["key_age"] | {"segments": None} == {
        "max_seconds": 30 * D, "max_at": iso(30), "at_end_seconds": 20 * D, "over_policy": [],
        "over_policy_seconds": 0, "unknown_seconds": 0, "unmanaged_seconds": D, "verdict": "within",
        "segments": None}
    assert by[t[0]]["policy"] == "audit" and by[t[0]]["max_age_seconds"] == 35 * D
    assert by[t[0]]["current"] | {"rotated_at": None} == {
        "version": 4, "state": "active", "rotation_id": runs["day30"], "rotated_at": None, "device": "site",
        "last_error": None, "open": [],
        "last_rotation": {"at": iso(30), "version": 4, "rotation_id": runs["day30"], "verified_by": "ike_reauth"}}


def test_a_failed_verification_is_a_rollback_with_its_reason(history) -> None:
    t, runs, by = history["t"], history["runs"], tunnels(history)
    one = by[t[1]]
    assert rotations(one) == [(iso(0), "ike_reauth", "site"), (iso(31), "ike_reauth", "site")]
    [back] = one["rollbacks"]
    assert (back["at"], back["version"], back["rotation_id"], back["completed_at"], back["completed_version"]) == \
        (iso(30), 4, runs["day30"], iso(30), 5)
    assert back["reason"].startswith("verification failed")
    assert (one["key_age"]["max_seconds"], one["key_age"]["max_at"], one["key_age"]["verdict"]) == \
        (31 * D, iso(31), "within")


def test_a_late_manual_ack_is_a_policy_breach_and_each_ack_names_its_rotation(history) -> None:
    t, runs, by = history["t"], history["runs"], tunnels(history)
    two = by[t[2]]
    assert rotations(two) == [(iso(0), "operator_ack", "desk"), (iso(40), "operator_ack", "desk")]
    assert [(r["rotation_id"], r["acked_rotation_id"]) for r in two["rotations"]] == \
        [(runs["day0-ack"], runs["day0"]), (runs["day40-ack"], runs["day30"])]
    age = two["key_age"]
    assert age["over_policy"] == [{"from": iso(35), "to": iso(40), "seconds": 5 * D}]
    assert (age["max_seconds"], age["max_at"], age["over_policy_seconds"], age["verdict"]) == \
        (40 * D, iso(40), 5 * D, "breached")


def test_drift_is_the_re_key_that_found_cloudflares_key_changed(history) -> None:
    acc, t, runs, by = history["acc"], history["t"], history["runs"], tunnels(history)
    three = by[t[3]]
    assert rotations(three) == [(iso(0), "none", None), (iso(30), "none", None), (iso(45), "none", None)]
    [drift] = three["drifts"]
    assert (drift["at"], drift["version"], drift["rotation_id"]) == (iso(45), 5, runs["day45"])
    listed = {x.id: x for x in history["rt"].cloudflare.list_tunnels(acc)}
    assert drift["cloudflare_generated_on"] < listed[t[3]].last_generated_on  # ours, applied after the drift
    assert drift["recorded_generated_on"] < drift["cloudflare_generated_on"]
    assert three["key_age"]["verdict"] == "within"


def test_pruned_versions_are_a_gap_never_guessed(history) -> None:
    t, by = history["t"], tunnels(history)
    four = by[t[4]]
    assert four["gaps"] == [{"versions": [1, 2], "reason": "pruned (max_versions)", "from": iso(0), "to": iso(30)}]
    assert rotations(four) == [(iso(30), "none", None)]  # the day-0 rotation is in the gap: not reported
    age = four["key_age"]
    assert (age["unknown_seconds"], age["unmanaged_seconds"], age["max_seconds"], age["verdict"]) == \
        (30 * D, D, 20 * D, "unprovable")


def test_a_deleted_version_is_a_gap_with_its_bounds(history) -> None:
    t, by = history["t"], tunnels(history)
    five = by[t[5]]
    assert five["gaps"] == [{"versions": [2, 2], "reason": "deleted", "from": iso(0), "to": iso(30)}]
    assert rotations(five) == [(iso(30), "none", None)]
    assert (five["key_age"]["unknown_seconds"], five["key_age"]["verdict"]) == (30 * D, "unprovable")


def test_records_from_before_the_proof_existed_say_not_recorded(history) -> None:
    legacy = tunnels(history)[LEGACY]
    assert legacy["tunnel_name"] == "legacy-site"
    assert [(r["at"], r["verified_by"], r["verified_at"]) for r in legacy["rotations"]] == \
        [(iso(10), "not recorded", None)]
    age = legacy["key_age"]
    assert age["over_policy"] == [{"from": iso(-1), "to": iso(10), "seconds": 11 * D},
                                  {"from": iso(45), "to": iso(50), "seconds": 5 * D}]
    assert (age["max_seconds"], age["max_at"], age["at_end_seconds"], age["verdict"]) == \
        (110 * D, iso(10), 40 * D, "breached")


def test_the_fleet_summary(history) -> None:
    acc, report = history["acc"], history["report"]
    expected = {
        "tunnels": 7, "rotations": 12, "rollbacks": 1, "drifts": 1, "gaps": 2,
        "rotations_by_proof": {"ike_reauth": 4, "operator_ack": 2, "none": 5, "not recorded": 1},
        "within_policy": 3, "breached": 2, "unprovable": 2, "without_max_age": 0, "share_within_policy": 0.4286,
        "oldest_key": {"account_id": acc, "tunnel_id": LEGACY, "tunnel_name": "legacy-site", "age_seconds": 110 * D,
                       "at": iso(10)},
        "open": {"pending": [], "rolling_back": [], "waiting_ack": [], "drifted": []},
    }
    assert report["fleet"] == expected
    assert report["accounts"][0]["summary"] == expected
    assert report["period"] == {"from": iso(-1), "to": iso(50)}


def test_the_report_lists_its_sources_and_seals_them(history) -> None:
    t, report = history["t"], history["report"]
    sources = {s["path"].rsplit("/", 1)[1]: s["versions"] for s in report["sources"]}
    assert sources[t[0]] == [1, 2, 3, 4]
    assert sources[t[4]] == [3, 4]
    assert sources[t[5]] == [1, 3, 4]
    assert sources[LEGACY] == [1, 2]
    assert all(s["path"].startswith(f"secret/cloudflare/magic-ipsec/{history['acc']}/") for s in report["sources"])
    assert rpt.intact(report)
    edited = json.loads(json.dumps(report))
    edited["fleet"]["breached"] = 0
    assert not rpt.intact(edited)
    assert rpt.differences(report, edited) == ["fleet.breached: 2 in the file, 0 in Vault's history now"]


def test_no_key_in_any_format(history) -> None:
    report, sims, acc = history["report"], history["sims"], history["acc"]
    texts = [rpt.render_json(report), rpt.render_csv(report), rpt.render_html(report)]
    helpers.OUTPUTS.extend(texts)  # the session's secret scan looks for every key in them too
    keys = {*LEGACY_KEYS, *(k for k in sims.cloudflare.psks(acc).values() if k),
            *(h.psk for h in sims.cloudflare.applied_history())}
    assert len(keys) > 12
    for text in texts:
        assert not any(k in text for k in keys)


def test_csv_has_a_row_per_fact(history) -> None:
    rows = list(csv.DictReader(io.StringIO(rpt.render_csv(history["report"]))))
    kinds = [r["type"] for r in rows]
    assert kinds.count("tunnel") == 7 and kinds.count("rotation") == 12 and kinds.count("rollback") == 1
    assert kinds.count("drift") == 1 and kinds.count("gap") == 2 and kinds.count("over_policy") == 3
    assert rows[-1] == {**dict.fromkeys(rpt.CSV_COLUMNS, ""), "type": "digest", "detail": history["report"]["digest"]}


# -- the command -----------------------------------------------------------------------------------------

def index(history: dict[str, Any], tunnel_id: str) -> int:
    return [t["tunnel_id"] for t in history["report"]["accounts"][0]["tunnels"]].index(tunnel_id)


def cli(history: dict[str, Any], *args: str) -> Any:
    sims = history["sims"]
    env = {k: v for k, v in sims.env().items() if not k.startswith("CLOUDFLARE")}  # Vault alone suffices
    config = helpers.write_config(history["tmp"], history["config"])
    return helpers.run_cli(["report", "--config", config, *args], env)


def test_the_command_writes_the_same_report_and_check_matches(history) -> None:
    out = history["tmp"] / "report.json"
    proc = cli(history, "--from", iso(-1), "--to", iso(50), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text()) == history["report"]
    assert history["report"]["digest"] in proc.stderr
    checked = cli(history, "--check", str(out))
    assert (checked.returncode, checked.stdout.strip()) == \
        (0, f"rotator: {out} matches Vault's history ({history['report']['digest']})")


def test_check_finds_an_edited_report(history) -> None:
    out = history["tmp"] / "edited.json"
    data = json.loads(json.dumps(history["report"]))
    i = index(history, history["t"][0])
    data["accounts"][0]["tunnels"][i]["rotations"][0]["verified_by"] = "operator_ack"
    out.write_text(json.dumps(data))
    proc = cli(history, "--check", str(out))
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [
        "rotator: differs: digest: the file's content no longer matches its own digest (edited)",
        f"rotator: differs: accounts[0].tunnels[{i}].rotations[0].verified_by: \"operator_ack\" in the file, "
        "\"ike_reauth\" in Vault's history now"]


def test_check_usage_errors(history) -> None:
    bad = history["tmp"] / "bad.json"
    bad.write_text("<html>")
    proc = cli(history, "--check", str(bad))
    assert (proc.returncode, proc.stderr.strip()) == (2, f"rotator: configuration error: --check: {bad} is not "
                                                      "JSON (check the JSON report (--output json), not the CSV or "
                                                      "HTML one)")
    proc = cli(history, "--from", "yesterday")
    assert proc.returncode == 2 and "is not a time" in proc.stderr and "Traceback" not in proc.stderr


def test_check_finds_a_changed_vault_history(history) -> None:
    """Last in this module: it changes the history (destroys a version the report rests on)."""
    out = history["tmp"] / "before.json"
    out.write_text(rpt.render_json(history["report"]))
    t = history["t"]
    history["root"].secrets.kv.v2.destroy_secret_versions(history["path"](t[0]), versions=[2])
    proc = cli(history, "--check", str(out))
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    i = index(history, t[0])
    assert f"rotator: differs: accounts[0].tunnels[{i}].gaps[0]: in Vault's history now, not in the file" in lines
    assert f"rotator: differs: sources[{i}].versions[3]: in the file, not in Vault's history now" in lines
    assert "does not match Vault's history" in proc.stderr
