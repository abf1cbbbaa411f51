"""Vault auth beyond tokens: AppRole and Kubernetes login, renewal before expiry, re-login when gone."""

from __future__ import annotations

import time

from rotator import config
from rotator.wiring import build_runtime
from tests.helpers import write_config


def _settings(sims, tmp_path, auth_block, env_extra=None):
    env = {k: v for k, v in sims.env().items() if k != "VAULT_TOKEN"}
    env.update(env_extra or {})
    return config.load(write_config(tmp_path, auth_block), env=env)


def test_approle_login_renewal_and_relogin(sims, tmp_path):
    role_id, secret_id = sims.vault.add_approle("psk-rotator", ["rotator"], ttl=30)
    secret_file = tmp_path / "secret-id"
    secret_file.write_text(secret_id)
    settings = _settings(sims, tmp_path, f'[vault.auth]\nmethod = "approle"\nrole_id = "{role_id}"\n'
                                         f'secret_id_file = "{secret_file}"\n')
    rt = build_runtime(settings)
    try:
        rt.vault_auth.login()
        rt.store.check()
        token = rt.hvac.token
        assert sims.vault.tokens[token].policies == ["default", "rotator"]
        assert rt.vault_auth.maintain() == "renewed"  # 30s TTL: under a minute left, so renew
        assert rt.hvac.token == token
        sims.vault.revoke_token(token)
        rt.vault_auth.expires_at = time.time() + 5
        assert rt.vault_auth.maintain() == "relogin"
        assert rt.hvac.token != token
        rt.store.check()
    finally:
        rt.close()


def test_kubernetes_login(sims, tmp_path):
    jwt = sims.vault.add_kubernetes_role("psk-rotator", ["rotator"], service_account="rot", namespace="ops")
    jwt_file = tmp_path / "jwt"
    jwt_file.write_text(jwt)
    settings = _settings(sims, tmp_path, f'[vault.auth]\nmethod = "kubernetes"\nrole = "psk-rotator"\n'
                                         f'jwt_file = "{jwt_file}"\n')
    rt = build_runtime(settings)
    try:
        rt.vault_auth.login()
        rt.store.check()
        assert rt.vault_auth.expires_at is not None
    finally:
        rt.close()
