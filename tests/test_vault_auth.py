"""Vault auth beyond tokens: AppRole and Kubernetes login, renewal before expiry, re-login when gone."""

from __future__ import annotations

import contextlib
import time

from rotator import config
from rotator.wiring import build_runtime
from tests.helpers import write_config


@contextlib.contextmanager
def logged_in(sims, tmp_path, file_name: str, file_content: str, auth_block: str):
    """A runtime with no VAULT_TOKEN, logged in through ``auth_block`` (its ``{file}`` is the credential)."""
    credential = tmp_path / file_name
    credential.write_text(file_content)
    env = {k: v for k, v in sims.env().items() if k != "VAULT_TOKEN"}
    rt = build_runtime(config.load(write_config(tmp_path, auth_block.format(file=credential)), env=env))
    try:
        rt.vault_auth.login()
        rt.check_vault()
        yield rt
    finally:
        rt.close()


def test_approle_login_renewal_and_relogin(sims, tmp_path):
    role_id, secret_id = sims.vault.add_approle("psk-rotator", ["rotator"], ttl=30)
    block = f'[vault.auth]\nmethod = "approle"\nrole_id = "{role_id}"\nsecret_id_file = "{{file}}"\n'
    with logged_in(sims, tmp_path, "secret-id", secret_id, block) as rt:
        token = rt.vault_auth.client.token
        assert sims.vault.tokens[token].policies == ["default", "rotator"]
        assert rt.vault_auth.maintain() == "renewed"  # 30s TTL: under a minute left, so renew
        assert rt.vault_auth.client.token == token
        sims.vault.revoke_token(token)
        rt.vault_auth.expires_at = time.time() + 5
        assert rt.vault_auth.maintain() == "relogin"
        assert rt.vault_auth.client.token != token
        rt.check_vault()


def test_long_lived_token_is_not_renewed_early(sims, tmp_path):
    role_id, secret_id = sims.vault.add_approle("psk-rotator", ["rotator"], ttl=3600)
    block = f'[vault.auth]\nmethod = "approle"\nrole_id = "{role_id}"\nsecret_id_file = "{{file}}"\n'
    with logged_in(sims, tmp_path, "secret-id", secret_id, block) as rt:
        assert rt.vault_auth.maintain() == "none"
        rt.vault_auth.expires_at = time.time() + 1000  # under a third of the hour left
        assert rt.vault_auth.maintain() == "renewed"


def test_kubernetes_login(sims, tmp_path):
    jwt = sims.vault.add_kubernetes_role("psk-rotator", ["rotator"], service_account="rot", namespace="ops")
    block = '[vault.auth]\nmethod = "kubernetes"\nrole = "psk-rotator"\njwt_file = "{file}"\n'
    with logged_in(sims, tmp_path, "jwt", jwt, block) as rt:
        assert rt.vault_auth.expires_at is not None
        assert sims.vault.tokens[rt.vault_auth.client.token].meta["service_account_namespace"] == "ops"


def test_a_login_error_that_quotes_the_credential_is_redacted(sims, tmp_path):
    """Issue 20, item 3: Vault (or a proxy echoing the request) may quote the AppRole secret id or the
    Kubernetes JWT in its error; the one-line error shows neither, nor a token issued before."""
    import pytest

    from rotator.errors import VaultError

    role_id, secret_id = sims.vault.add_approle("psk-rotator", ["rotator"], ttl=30)
    block = f'[vault.auth]\nmethod = "approle"\nrole_id = "{role_id}"\nsecret_id_file = "{{file}}"\n'
    with logged_in(sims, tmp_path, "secret-id", secret_id, block) as rt:
        old_token = rt.vault_auth.client.token
        sims.vault.fail_next("auth.approle.login", status=400,
                             message=f"invalid secret id {secret_id!r} for a client that sent {old_token}")
        with pytest.raises(VaultError) as exc:
            rt.vault_auth.login()
        assert secret_id not in str(exc.value) and old_token not in str(exc.value)
        assert "**redacted**" in str(exc.value) and "400" in str(exc.value)
    jwt = sims.vault.add_kubernetes_role("psk-rotator", ["rotator"], service_account="rot", namespace="ops")
    block = '[vault.auth]\nmethod = "kubernetes"\nrole = "psk-rotator"\njwt_file = "{file}"\n'
    with logged_in(sims, tmp_path, "jwt", jwt, block) as rt:
        sims.vault.fail_next("auth.kubernetes.login", status=403, message=f"service account token {jwt} rejected")
        with pytest.raises(VaultError) as exc:
            rt.vault_auth.login()
        assert jwt not in str(exc.value) and "**redacted**" in str(exc.value)
