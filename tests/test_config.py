"""`rotator config check` refuses everything `run` would refuse: one line naming the key, exit 2."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_cli, write_config

ACC = "5e2b9c0d71a84f36b0c9e1d2a7f48c63"  # an id no test uses as a key
GOOD = f'[[accounts]]\nid = "{ACC}"\n'
ENV = {"VAULT_ADDR": "http://127.0.0.1:8200", "VAULT_TOKEN": "hvs.config-test-token",
       "CLOUDFLARE_API_TOKEN": "cf-config-test-token-0000000000", "ROTATOR_ADMIN_TOKEN": "admin-config-test-token",
       "ROTATOR_CONFIG": "", "CLOUDFLARE_EMAIL": "", "CLOUDFLARE_API_KEY": ""}


def check(tmp_path, text: str, env: dict[str, str] | None = None, *extra: str):
    cfg = write_config(tmp_path, text)
    return run_cli(["config", "check", "--config", cfg, *extra], {**ENV, **(env or {})}, timeout=60)


@pytest.mark.parametrize(("text", "needle"), [
    ('[policies.default]\ncron = "0 0 31 2 *"\n', "policies.default.cron"),
    ('[policies.default]\nevery = "30d"\nmax_age = "7d"\n', "policies.default.max_age"),
    ('[policies.default]\nevery = "1h"\njitter = "2h"\n', "policies.default.jitter"),
    ("[cloudflare]\nretry_attempts = -1\n", "cloudflare.retry_attempts"),
    ('[[accounts]]\nid = "' + ACC + '"\n[[accounts.select]]\nnames = [1, "x"]\n', "accounts[0].select[0].names[0]"),
    ("[vault]\ntimeout = 0\n", "vault.timeout"),
    ('[admin]\nlisten = "127.0.0.1:70000"\n', "admin.listen"),
    ('[admin]\nlisten = "::1:9477"\n', "admin.listen"),
    ('[admin]\nlisten = "999.1.1.1:9477"\n', "admin.listen"),
    ("[admin]\nqueue = 0\n", "admin.queue"),
])
def test_config_check_names_the_key(tmp_path, text, needle):
    proc = check(tmp_path, text + ("" if "accounts" in text else GOOD))
    assert proc.returncode == 2, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr


def test_a_config_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "rotator.toml"
    path.write_bytes(b'[admin]\nlisten = "127.0.0.1:9477"\n# caf\xe9\n')
    proc = run_cli(["config", "check", "--config", str(path)], ENV, timeout=60)
    assert proc.returncode == 2 and "not UTF-8" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_run_needs_an_admin_token_and_accounts_and_check_says_so(tmp_path):
    proc = check(tmp_path, GOOD, {"ROTATOR_ADMIN_TOKEN": ""})
    assert proc.returncode == 2 and "admin token" in proc.stderr and "ROTATOR_ADMIN_TOKEN" in proc.stderr
    proc = check(tmp_path, "", {})
    assert proc.returncode == 2 and "accounts" in proc.stderr
    # One-shot commands need neither.
    assert check(tmp_path, "", {"ROTATOR_ADMIN_TOKEN": ""}, "--one-shot").returncode == 0


def test_every_missing_variable_in_one_message(tmp_path):
    proc = check(tmp_path, GOOD, {"VAULT_ADDR": "", "VAULT_TOKEN": "", "CLOUDFLARE_API_TOKEN": ""})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert all(name in lines[0] for name in ("VAULT_ADDR", "VAULT_TOKEN", "CLOUDFLARE_API_TOKEN"))


def test_ipv6_listen_and_a_good_config_pass(tmp_path):
    proc = check(tmp_path, '[admin]\nlisten = "[::1]:9477"\n' + GOOD)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["admin"]["listen"] == "[::1]:9477" and out["admin"]["token"] == "<set>"
    assert ENV["VAULT_TOKEN"] not in proc.stdout and ENV["ROTATOR_ADMIN_TOKEN"] not in proc.stdout


def test_the_example_config_passes_the_check():
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "config" / "rotator.example.toml"
    proc = run_cli(["config", "check", "--config", str(example)], ENV, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["admin"]["queue"] == 16


@pytest.mark.parametrize(("devices", "needle"), [
    ('[[devices]]\nname = "a"\nkind = "telnet"\ntunnels = ["*"]\n', "devices[0].kind"),
    ('[[devices]]\nname = "a"\nkind = "manual"\ntunnels = ["*"]\n[[devices]]\nname = "a"\nkind = "manual"\n'
     'tunnels = ["x"]\n', "devices[1].name"),
])
def test_device_config_errors_name_the_key(tmp_path, devices, needle):
    proc = check(tmp_path, GOOD + devices)
    assert proc.returncode == 2 and needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_device_pattern_no_tunnel_matches_is_a_warning(sims, tmp_path):
    acc = next(iter(sims.tunnels_by_account))
    cfg = write_config(tmp_path, f'[[accounts]]\nid = "{acc}"\n[[devices]]\nname = "branch"\nkind = "manual"\n'
                                 'tunnels = ["tun0000*", "nowhere-*"]\n')
    proc = run_cli(["config", "check", "--config", cfg], {**sims.env(), "ROTATOR_ADMIN_TOKEN": "t" * 32}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["devices"][0]["name"] == "branch"
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("rotator: warning:")]
    assert len(warnings) == 1 and "devices[0].tunnels[1]" in warnings[0] and "nowhere-*" in warnings[0]
