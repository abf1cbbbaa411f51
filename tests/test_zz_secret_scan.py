"""No PSK or token in any output: every line the suite captured is scanned for every secret it made.

Named to run last. It first drives its own rotation through every output path (text, JSON, status,
dry run, a failing run, config check) so it has material even when run alone.
"""

from __future__ import annotations

import json

from rotator.secret import Secret
from rotator.sim import Simulators
from tests import helpers


def test_no_secret_in_any_captured_output(tmp_path):
    with Simulators(accounts=1, tunnels=4) as sims:
        acc = next(iter(sims.tunnels_by_account))
        env = sims.env()
        for args in (["rotate", "--account", acc, "--all"], ["rotate", "--account", acc, "--all", "--output", "json"],
                     ["rotate", "--account", acc, "--all", "--dry-run"], ["status", "--account", acc],
                     ["status", "--account", acc, "--output", "json"], ["config", "check"]):
            assert helpers.run_cli(args, env).returncode == 0
        sims.cloudflare.refuse_tunnels([sims.tunnels_by_account[acc][0]], stage="apply")
        sims.cloudflare.fail_next("cf.psk_validate", status=503)
        assert helpers.run_cli(["rotate", "--account", acc, "--all"], env).returncode == 1
        helpers.run_cli(["rotate", "--account", acc, "--all"], {**env, "CLOUDFLARE_API_TOKEN": "z" * 40})
        sims.vault.seal()
        helpers.run_cli(["rotate", "--account", acc, "--all"], env)
        sims.vault.unseal()
        # Vault records really hold the keys the scan looks for.
        for t in sims.tunnels_by_account[acc]:
            data = sims.vault.read_data(f"cloudflare/magic-ipsec/{acc}/{t}")
            helpers.SECRETS.update(v for k, v in data.items() if k.endswith("psk"))
        helpers.remember_secrets(sims)
    secrets = {s for s in helpers.SECRETS if s and len(s) >= 16}
    assert len(secrets) >= 10, "the scan must have real secrets to look for"
    text = "\n".join(helpers.OUTPUTS)
    assert len(text) > 1000
    leaks = sorted(s[:4] + "…" for s in secrets if s in text)
    assert leaks == [], f"secrets found in captured output: {leaks}"


def test_secret_type_never_shows_itself():
    s = Secret("supersecretvalue-1234567890")
    assert "supersecret" not in repr(s) and "supersecret" not in str(s) and "supersecret" not in f"{s}"
    assert "supersecret" not in json.dumps({"k": str(s)})
