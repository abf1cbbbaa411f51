"""The one-shot CLI as a subprocess against the simulators: exit codes, one-line errors, crash recovery."""

from __future__ import annotations

import json
import signal

import pytest

from tests.helpers import assert_invariant, record, run_cli, start_cli, wait_for, write_config


def account(sims):
    return next(iter(sims.tunnels_by_account))


def test_rotate_all_then_status_json(sims):
    acc = account(sims)
    proc = run_cli(["rotate", "--account", acc, "--all", "--output", "json"], sims.env())
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] and report["counts"]["rotated"] == 6
    status = run_cli(["status", "--account", acc, "--output", "json"], sims.env())
    rows = json.loads(status.stdout)["tunnels"]
    assert {r["state"] for r in rows} == {"active"} and not any(r["pending"] for r in rows)
    assert all(r["psk_age_seconds"] is not None and r["psk_age_seconds"] < 60 for r in rows)
    assert_invariant(sims, acc, strict=True)


def test_text_output_has_a_summary_table(sims):
    acc = account(sims)
    proc = run_cli(["rotate", "--verbose", "--account", acc, "--tunnel", "tun00001", "--tunnel",
                    sims.tunnels_by_account[acc][1]], sims.env())
    assert proc.returncode == 0
    assert "TUNNEL" in proc.stdout and "Summary: 2 rotated" in proc.stdout
    assert_invariant(sims, acc, strict=True)


def test_some_tunnel_not_rotated_exits_1(sims):
    acc = account(sims)
    sims.cloudflare.refuse_tunnels([sims.tunnels_by_account[acc][0]], stage="validate")
    proc = run_cli(["rotate", "--account", acc, "--all"], sims.env())
    assert proc.returncode == 1 and "refused" in proc.stdout
    assert_invariant(sims, acc, strict=True)


@pytest.mark.parametrize("args", [["rotate", "--account", "x"], ["rotate", "--all"], ["bogus"]])
def test_usage_errors_exit_2(sims, args):
    proc = run_cli(args, sims.env())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_wrong_cloudflare_token_one_line_nothing_changed(sims):
    acc = account(sims)
    proc = run_cli(["rotate", "--account", acc, "--all"], {**sims.env(), "CLOUDFLARE_API_TOKEN": "w" * 40})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("rotator:")]
    assert len(line) == 1 and "10000" in line[0] and "Magic WAN Write" in line[0]
    assert not sims.vault.keys_under(f"cloudflare/magic-ipsec/{acc}/")  # no record touched
    assert "cf.psk_apply" not in sims.cloudflare.request_counts()


def test_unreachable_vault_one_line(sims):
    acc = account(sims)
    proc = run_cli(["rotate", "--account", acc, "--all"], {**sims.env(), "VAULT_ADDR": "http://127.0.0.1:9"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "cannot reach Vault" in proc.stderr and "VAULT_ADDR" in proc.stderr
    assert sims.cloudflare.request_counts() == {}


def test_vault_mount_not_kv2_is_a_config_error(sims, tmp_path):
    sims.vault.add_mount("legacy", kv_version="1")
    sims.vault.policies["rotator"].append(("legacy/*", {"read"}))
    cfg = write_config(tmp_path, '[vault]\nmount = "legacy"\n')
    proc = run_cli(["--config", cfg, "status", "--account", account(sims)], sims.env())
    assert proc.returncode == 2 and "not a KV version 2" in proc.stderr


@pytest.mark.parametrize(("text", "needle"), [
    ("[cloudflare]\nbatch_size = 0\n", "cloudflare.batch_size"),
    ("[policies.default]\nevery = \"3d\"\npsk_length = 20\n", "psk length"),
    ("[policies.default]\nevery = \"3d\"\npsk_alphabet = \"ab\"\npsk_length = 64\n", "entropy"),
    ("[vault]\nmystery = 1\n", "vault.mystery"),
    ("[[accounts]]\nid = \"nope\"\n", "accounts[0].id"),
    ("not toml [", "not valid TOML"),
])
def test_bad_config_names_the_key(sims, tmp_path, text, needle):
    cfg = write_config(tmp_path, text)
    proc = run_cli(["--config", cfg, "config", "check"], sims.env())
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_config_check_masks_secrets(sims):
    proc = run_cli(["config", "check", "--one-shot"], sims.env())
    assert proc.returncode == 0
    out = json.loads(proc.stdout)
    assert out["vault"]["token"] == "<set>" and out["cloudflare"]["api_token"] == "<set>"
    assert sims.vault_token not in proc.stdout and sims.cloudflare_api_token not in proc.stdout


def test_missing_credentials_are_config_errors(sims):
    env = {**sims.env(), "CLOUDFLARE_API_TOKEN": ""}
    proc = run_cli(["status", "--account", account(sims)], env)
    assert proc.returncode == 2 and "CLOUDFLARE_API_TOKEN" in proc.stderr


# -- crash recovery: kill the process at every step boundary ---------------------------------------

def _kill_when(sims, tmp_path, arm, reached):
    acc = account(sims)
    # The default lease (120 s): a dead run's lease is taken over at once, never waited out.
    cfg = write_config(tmp_path, "[cloudflare]\nbatch_size = 3\ntimeout = 2\n")
    # One managed generation first, so every tunnel has a psk before the crash.
    assert run_cli(["--config", cfg, "rotate", "--account", acc, "--all"], sims.env()).returncode == 0
    disarm = arm()
    proc = start_cli(["--config", cfg, "rotate", "--account", acc, "--all"], sims.env())
    try:
        wait_for(reached, what="the step boundary")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
    if callable(disarm):
        disarm()
    sims.cloudflare.clear_faults()
    sims.vault.clear_faults()
    assert_invariant(sims, acc)
    # The dead process's lease is taken over; reconcile then settles everything.
    result = {}

    def reconciled():
        proc = run_cli(["--config", cfg, "reconcile", "--account", acc, "--output", "json"], sims.env())
        result["report"] = json.loads(proc.stdout) if proc.stdout.strip() else None
        return proc.returncode == 0

    wait_for(reconciled, timeout=30, what="reconcile after the crash")
    assert_invariant(sims, acc, strict=True)
    return result["report"]


def test_killed_during_plan(sims, tmp_path):
    sims_cf = sims.cloudflare
    _kill_when(sims, tmp_path, lambda: sims_cf.set_latency(5, route="cf.list"),
               lambda: sims_cf.request_counts().get("cf.list", 0) >= 2)


def test_killed_after_stage_before_validate(sims, tmp_path):
    cf = sims.cloudflare
    report = _kill_when(sims, tmp_path, lambda: cf.set_latency(5, route="cf.psk_validate"),
                        lambda: cf.request_counts().get("cf.psk_validate", 0) >= 3)
    # Batch 1 was staged and at validation; batch 2 may have been staged ahead meanwhile. Reconcile
    # finishes every staged key, and only staged keys.
    assert 3 <= report["counts"]["rotated"] <= 6
    assert all(t["reconciled"] and t["result"] == "rotated" for t in report["tunnels"])


def test_killed_during_apply(sims, tmp_path):
    cf = sims.cloudflare
    _kill_when(sims, tmp_path, lambda: cf.set_latency(3, route="cf.psk_apply"),
               lambda: cf.request_counts().get("cf.psk_apply", 0) >= 3)


def test_killed_after_apply_before_promote(sims, tmp_path):
    cf, vault = sims.cloudflare, sims.vault
    acc = account(sims)
    base = {}

    def arm():
        base["history"] = len(cf.applied_history())
        original = cf._apply

        def apply_then_stall_vault(*a, **kw):
            original(*a, **kw)
            vault.set_latency(5, route="kv.write")  # promote will hang: the kill lands before it

        cf._apply = apply_then_stall_vault
        return lambda: setattr(cf, "_apply", original)

    _kill_when(sims, tmp_path, arm, lambda: len(cf.applied_history()) > base["history"])
    assert record(sims, acc, sims.tunnels_by_account[acc][0])["state"] == "active"


def test_killed_between_batches(sims, tmp_path):
    cf = sims.cloudflare
    _kill_when(sims, tmp_path, lambda: cf.set_latency(1.5, route="cf.psk_validate"),  # within the 2 s timeout
               lambda: cf.request_counts().get("cf.psk_apply", 0) >= 3 and
               cf.request_counts().get("cf.psk_validate", 0) >= 4)


def test_on_a_terminal_there_is_a_progress_line(sims):
    """stderr on a pseudo-terminal: a progress line counts the tunnels settled."""
    from tests.helpers import run_on_a_terminal

    acc = account(sims)
    sims.cloudflare.refuse_tunnels([sims.tunnels_by_account[acc][0]], stage="validate")
    code, out, tty = run_on_a_terminal(["rotate", "--account", acc, "--all"], sims.env(), timeout=60)
    assert code == 1
    assert "6/6 tunnels" in tty and "[####" in tty
    assert "Summary: 5 rotated, 1 refused" in out
    assert_invariant(sims, acc, strict=True)


# -- operating it (issue 13 items 1, 4, 5; issue 9 item 2) ------------------------------------------

@pytest.mark.parametrize("command", [["rotate", "--all"], ["reconcile"], ["status"]])
@pytest.mark.parametrize("bad", ["x", "0123456789ABCDEF0123456789ABCDEF", "../" + "a" * 29, "a" * 33])
def test_account_must_be_32_lowercase_hex(sims, command, bad):
    proc = run_cli([*command, "--account", bad], sims.env())
    assert proc.returncode == 2 and "32 lowercase hex" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert sims.cloudflare.request_counts() == {} and not sims.vault.keys_under("cloudflare/magic-ipsec/")


def test_default_output_lists_only_tunnels_needing_attention(sims, tmp_path):
    acc = account(sims)
    refused = sims.tunnels_by_account[acc][2]
    sims.cloudflare.refuse_tunnels([refused], stage="validate")
    cfg = write_config(tmp_path, "[cloudflare]\nbatch_size = 2\n")
    proc = run_cli(["rotate", "--account", acc, "--all", "--config", cfg], sims.env())  # --config after the command
    assert proc.returncode == 1
    assert proc.stdout.startswith("Rotation ")
    table = [ln for ln in proc.stdout.splitlines() if acc not in ln and ln.startswith("tun")]
    assert len(table) == 1 and refused in table[0] and "refused" in table[0]
    assert "5 tunnels done as asked are not listed" in proc.stdout and "Summary: 5 rotated, 1 refused" in proc.stdout
    sims.cloudflare.clear_refusals()
    proc = run_cli(["reconcile", "--account", acc], sims.env())
    assert proc.returncode == 0 and proc.stdout.startswith("Reconcile ")
    assert_invariant(sims, acc, strict=True)


def test_status_filters_and_summary(sims):
    acc = account(sims)
    tunnels = sims.tunnels_by_account[acc]
    assert run_cli(["rotate", "--account", acc, "--tunnel", tunnels[0], "--tunnel", tunnels[1]],
                   sims.env()).returncode == 0
    proc = run_cli(["status", "--account", acc, "--state", "active", "--output", "json"], sims.env())
    out = json.loads(proc.stdout)
    assert {t["tunnel_id"] for t in out["tunnels"]} == {tunnels[0], tunnels[1]}
    assert out["summary"]["tunnels"] == 2 and out["summary"]["active"] == 2
    assert out["cloudflare_rate_budget"]["remaining"] > 0 and out["cloudflare_rate_budget"]["reserved"] >= 0
    proc = run_cli(["status", "--account", acc, "--state", "unmanaged"], sims.env())
    assert proc.returncode == 0 and "Summary: 4 tunnels" in proc.stdout and "4 unmanaged" in proc.stdout
    assert "Cloudflare rate budget: " in proc.stdout
    proc = run_cli(["status", "--account", acc, "--tunnel", "tun0000[12]", "--output", "json"], sims.env())
    assert sorted(t["name"] for t in json.loads(proc.stdout)["tunnels"]) == ["tun00001", "tun00002"]
    proc = run_cli(["status", "--account", acc, "--device", "nowhere", "--output", "json"], sims.env())
    assert json.loads(proc.stdout)["tunnels"] == []
    assert_invariant(sims, acc, strict=True)


@pytest.mark.parametrize("command", [["status"], ["rotate", "--all"], ["reconcile"]])
def test_a_403_on_the_listing_asks_whether_the_account_is_right(sims, command):
    other = "f" * 32  # a well-formed id the token has no access to
    proc = run_cli([*command, "--account", other], sims.env())
    assert proc.returncode == 1 and f"is the account id {other} right?" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_retry_is_one_short_line(sims):
    acc = account(sims)
    sims.cloudflare.fail_next("cf.list", count=1, status=503)
    proc = run_cli(["rotate", "--account", acc, "--all"], sims.env())
    assert proc.returncode == 0, proc.stderr
    retries = [ln for ln in proc.stderr.splitlines() if "retr" in ln.lower()]
    assert len(retries) == 1 and retries[0].startswith("rotator: retrying (attempt 2) in "), proc.stderr
    assert float(retries[0].split(" in ", 1)[1].split("s:", 1)[0]) >= 0.5, retries  # the backoff it really waits
    assert "stamina" not in proc.stderr and len(retries[0]) < 160
    assert_invariant(sims, acc, strict=True)


def test_rollback_returns_both_ends_to_the_previous_key(sims):
    acc = account(sims)
    tunnel = sims.tunnels_by_account[acc][0]
    for _ in range(2):
        assert run_cli(["rotate", "--account", acc, "--tunnel", tunnel], sims.env()).returncode == 0
    before = record(sims, acc, tunnel)
    proc = run_cli(["rollback", "--account", acc, "--tunnel", tunnel, "--verbose"], sims.env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("Rollback ") and "rolled_back" in proc.stdout
    assert sims.cloudflare.psk_of(acc, tunnel) == before["previous_psk"]
    assert_invariant(sims, acc, strict=True)


def test_ack_records_the_acknowledgement_and_applies_the_pending_key(sims):
    acc = account(sims)
    tunnel = sims.tunnels_by_account[acc][0]
    proc = run_cli(["ack", "--account", acc, "--tunnel", tunnel], sims.env())
    assert proc.returncode == 1 and "no key waiting for an acknowledgement" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    sims.cloudflare.drop_next("cf.psk_apply", count=10)  # every answer to the apply is lost: the key stays pending
    assert run_cli(["rotate", "--account", acc, "--tunnel", tunnel], sims.env()).returncode == 1
    sims.cloudflare.clear_faults()
    pending = record(sims, acc, tunnel)
    assert pending["state"] == "pending"
    proc = run_cli(["ack", "--account", acc, "--tunnel", "tun00001", "--holds", "new", "--verbose"], sims.env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "acknowledged 1 tunnel(s)" in proc.stderr and proc.stdout.startswith("Reconcile ")
    assert record(sims, acc, tunnel)["psk"] == pending["pending_psk"]
    assert_invariant(sims, acc, strict=True)


def test_ack_says_what_the_manual_device_holds_and_status_prints_the_command(sims, tmp_path):
    """Issue 20 item 2: an acknowledgement names what it confirms (--holds, --rotation); one that does
    not, or that names a rotation the record moved on from, is refused with the state and the command."""
    acc = account(sims)
    tunnel = sims.tunnels_by_account[acc][0]
    path = write_config(tmp_path, '[[devices]]\nname = "desk"\nkind = "manual"\ntunnels = ["tun00001"]\n')
    env = {**sims.env(), "ROTATOR_CONFIG": path}
    assert run_cli(["rotate", "--account", acc, "--all"], sims.env()).returncode == 0  # every tunnel managed
    proc = run_cli(["rotate", "--account", acc, "--tunnel", tunnel], env)
    rotation = record(sims, acc, tunnel)["rotation_id"]
    command = f"rotator ack --account {acc} --tunnel {tunnel} --rotation {rotation} --holds new"
    assert proc.returncode == 1 and "waiting" in proc.stdout and command in proc.stdout, proc.stdout
    status = run_cli(["status", "--account", acc], env)
    assert command in status.stdout and "waits for the device to hold the new key" in status.stdout
    row = next(r for r in json.loads(run_cli(["status", "--account", acc, "--output", "json"], env).stdout)["tunnels"]
               if r["tunnel_id"] == tunnel)
    assert row["ack_command"] == command and row["waits_for"]
    for extra, needle in (([], "say what the device holds"), (["--holds", "previous"], "nothing to go back from"),
                          (["--holds", "new", "--rotation", "20260101T000000Z-abcdef"], "moved on")):
        proc = run_cli(["ack", "--account", acc, "--tunnel", "tun00001", *extra], env)
        assert proc.returncode == 1 and needle in proc.stderr and command in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
        assert record(sims, acc, tunnel)["state"] == "pending" and "acked_rotation_id" not in record(sims, acc, tunnel)
        assert_invariant(sims, acc)
    pending = record(sims, acc, tunnel)["pending_psk"]
    proc = run_cli(["ack", "--account", acc, "--tunnel", "tun00001", "--rotation", rotation, "--holds", "new"], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert record(sims, acc, tunnel)["psk"] == pending and sims.cloudflare.psk_of(acc, tunnel) == pending
    assert_invariant(sims, acc, strict=True)


def test_rotate_due_rotates_only_what_the_schedule_would(sims, tmp_path):
    """Issue 20 item 12: `rotate --due` for cron and CI, the policies' due and drift decision."""
    acc = account(sims)
    path = write_config(tmp_path, f'[[accounts]]\nid = "{acc}"\n[policies.default]\nevery = "30d"\n')
    env = {**sims.env(), "ROTATOR_CONFIG": path}
    assert run_cli(["rotate", "--account", acc, "--all"], env).returncode == 0
    applies = sims.cloudflare.request_counts().get("cf.psk_apply", 0)
    proc = run_cli(["rotate", "--account", acc, "--due"], env)
    assert proc.returncode == 0 and "nothing to do" in proc.stdout, proc.stdout + proc.stderr
    assert sims.cloudflare.request_counts().get("cf.psk_apply", 0) == applies  # nothing was due: nothing sent
    drifted = sims.tunnels_by_account[acc][2]
    sims.cloudflare.change_psk_out_of_band(acc, drifted)  # a key set outside the rotator: re-keyed as drift
    new = sims.cloudflare.add_tunnel(acc)  # a tunnel never rotated: due at once
    sims.tunnels_by_account[acc].append(new)
    proc = run_cli(["rotate", "--account", acc, "--due", "--output", "json"], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert sorted(t["tunnel_id"] for t in report["tunnels"]) == sorted([drifted, new])
    assert report["counts"]["rotated"] == 2 and report["drifted"] == [drifted]
    proc = run_cli(["rotate", "--account", acc, "--due", "--all"], env)
    assert proc.returncode == 2 and "not allowed with" in proc.stderr
    assert_invariant(sims, acc, strict=True)


def test_history_lists_the_record_versions_never_a_key(sims):
    """Issue 20 item 12: `rotator history`: when, rotation id, state, outcome, device; never a key."""
    acc = account(sims)
    tunnel = sims.tunnels_by_account[acc][0]
    proc = run_cli(["history", "--account", acc, "--tunnel", tunnel], sims.env())
    assert proc.returncode == 0 and "never written" in proc.stdout, proc.stdout + proc.stderr
    rotations = []
    for _ in range(2):
        report = json.loads(run_cli(["rotate", "--account", acc, "--tunnel", tunnel, "--output", "json"],
                                    sims.env()).stdout)
        rotations.append(report["rotation_id"])
    proc = run_cli(["history", "--account", acc, "--tunnel", "tun00001", "--output", "json"], sims.env())
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    versions = answer["versions"]
    assert [v["version"] for v in versions] == [4, 3, 2, 1] and answer["tunnel_id"] == tunnel
    assert [(v["rotation_id"], v["state"], v["pending"]) for v in versions] == [
        (rotations[1], "active", False), (rotations[1], "pending", True),
        (rotations[0], "active", False), (rotations[0], "pending", True)]
    assert versions[0]["outcome"] == "rotated" and all(v["written_at"] for v in versions)
    data = record(sims, acc, tunnel)
    for key in (data["psk"], data["previous_psk"]):
        assert key not in proc.stdout
    assert all("psk" not in field for v in versions for field in v)
    text = run_cli(["history", "--account", acc, "--tunnel", tunnel, "--limit", "2"], sims.env())
    assert text.returncode == 0 and rotations[1] in text.stdout and rotations[0] not in text.stdout
    assert "VERSION" in text.stdout and "OUTCOME" in text.stdout
    bad = run_cli(["history", "--account", acc, "--tunnel", "nonesuch"], sims.env())
    assert bad.returncode == 2 and "no tunnel 'nonesuch'" in bad.stderr and "Traceback" not in bad.stderr
    assert_invariant(sims, acc, strict=True)


def test_a_tunnel_listed_twice_is_one_refused_row_in_rotate_and_status(sims):
    """Issue 20 item 1 through the CLI: reported once, by id and both names; nothing written or sent."""
    acc = account(sims)
    assert run_cli(["rotate", "--account", acc, "--all"], sims.env()).returncode == 0
    victim = sims.tunnels_by_account[acc][0]
    sims.cloudflare.list_twice(acc, victim, "branch-dup")
    before = record(sims, acc, victim)
    proc = run_cli(["rotate", "--account", acc, "--all", "--output", "json"], sims.env())
    report = json.loads(proc.stdout)
    rows = [t for t in report["tunnels"] if t["tunnel_id"] == victim]
    assert proc.returncode == 1 and len(report["tunnels"]) == 6 and report["counts"]["rotated"] == 5
    assert [r["result"] for r in rows] == ["refused"] and rows[0]["name"] == "tun00001 / branch-dup"
    assert record(sims, acc, victim) == before
    status = json.loads(run_cli(["status", "--account", acc, "--output", "json"], sims.env()).stdout)
    rows = [t for t in status["tunnels"] if t["tunnel_id"] == victim]
    assert len(rows) == 1 and rows[0]["state"] == "refused" and "listing names tunnel" in rows[0]["last_error"]
    assert status["summary"]["tunnels"] == 6
    assert_invariant(sims, acc, strict=True)
