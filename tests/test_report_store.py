"""The history port of the Vault store against the simulator through hvac, with the least-privilege
token: metadata and versioned reads (docs/specs/vault-kv2.md), pruned, deleted and destroyed versions,
garbage and refusals as one-line VaultErrors, and a command that reports them without a traceback."""

from __future__ import annotations

import hvac
import pytest

from rotator.adapters.vault import VaultStore, build_hvac_client
from rotator.errors import VaultError
from rotator.secret import Secret
from rotator.service import report as rpt
from tests.helpers import SECRETS, run_cli

A = "5e0f2a4b6c8d0e1f3a5b7c9d1e3f5a7b"
T, U = "9" * 31 + "1", "9" * 31 + "2"
KEYS = [f"store-history-key-{i}-ABCDEFGHIJKLMNOP" for i in range(6)]


@pytest.fixture
def env(vault_sim):
    sim, addr = vault_sim
    SECRETS.update(KEYS)
    token = sim.create_token(["default", "rotator"], ttl=3600)
    store = VaultStore(build_hvac_client(addr, token, concurrency=4, timeout=5), concurrency=4)
    root = hvac.Client(url=addr, token=sim.root_token)
    yield sim, store, root, addr, token
    store.close()


def put(store: VaultStore, tid: str, n: int) -> None:
    rec = store.read(A, tid)
    rec.psk, rec.rotated_at = Secret(KEYS[n]), f"2026-01-0{n + 1}T00:00:00Z"
    store.write(rec)


def test_history_lists_every_version_with_its_data(env) -> None:
    sim, store, root, _, _ = env
    for n in range(3):
        put(store, T, n)
    put(store, U, 0)
    assert store.list_records(A) == [T, U]
    h = store.record_history(A, T)
    assert (h.path, h.current_version, h.oldest_version, h.max_versions) == (
        f"secret/cloudflare/magic-ipsec/{A}/{T}", 3, 0, 0)
    assert [v.number for v in h.versions] == [1, 2, 3]
    assert [v.record.psk for v in h.versions if v.record] == [Secret(k) for k in KEYS[:3]]
    assert all(rpt.vault_time(v.created_time) for v in h.versions)


def test_pruned_deleted_and_destroyed_versions(env) -> None:
    sim, store, root, _, _ = env
    path = f"cloudflare/magic-ipsec/{A}/{T}"
    put(store, T, 0)
    root.secrets.kv.v2.update_metadata(path, max_versions=3)
    for n in range(1, 5):
        put(store, T, n)
    root.secrets.kv.v2.delete_secret_versions(path, versions=[3])
    root.secrets.kv.v2.destroy_secret_versions(path, versions=[4])
    h = store.record_history(A, T)
    assert (h.oldest_version, h.max_versions, [v.number for v in h.versions]) == (3, 3, [3, 4, 5])
    deleted, destroyed, live = h.versions
    assert (deleted.record, deleted.destroyed, bool(deleted.deletion_time)) == (None, False, True)
    assert (destroyed.record, destroyed.destroyed) == (None, True)
    assert live.record is not None and live.record.psk == Secret(KEYS[4])


def test_an_account_without_records_has_an_empty_history(env) -> None:
    _, store, _, _, _ = env
    assert store.list_records(A) == []
    assert store.history_many(A, []) == {}


@pytest.mark.parametrize("route", ["kv.metadata.read", "kv.read", "kv.list"])
def test_garbage_is_a_one_line_vault_error(env, route) -> None:
    sim, store, _, _, _ = env
    put(store, T, 0)
    sim.garbage_next(route, variant="html")
    if route == "kv.list":
        with pytest.raises(VaultError) as exc:
            store.list_records(A)
        err = exc.value
    else:
        err = store.history_many(A, [T])[T]
    assert isinstance(err, VaultError)
    assert "\n" not in str(err) and "VAULT_ADDR" in str(err)
    assert store.list_records(A) == [T]  # the next answer is Vault's again


def test_the_command_names_a_refusal_in_one_line(env, tmp_path) -> None:
    sim, store, _, addr, _ = env
    put(store, T, 0)
    narrow = sim.create_token(["default"], ttl=3600)  # no read on the records
    proc = run_cli(["report", "--account", A], {"VAULT_ADDR": addr, "VAULT_TOKEN": narrow,
                                                "CLOUDFLARE_API_TOKEN": ""})
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Vault denied permission" in lines[0] and "Traceback" not in proc.stderr
    assert KEYS[0] not in proc.stdout + proc.stderr and narrow not in proc.stderr


def test_the_command_with_the_least_privilege_token(env, tmp_path) -> None:
    sim, store, _, addr, token = env
    put(store, T, 0)
    out = tmp_path / "r.csv"
    proc = run_cli(["report", "--account", A, "--from", "2020-01-01", "--output", "csv", "--out", str(out)],
                   {"VAULT_ADDR": addr, "VAULT_TOKEN": token, "CLOUDFLARE_API_TOKEN": ""})
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert text.startswith(",".join(rpt.CSV_COLUMNS)) and f"source,,,,,,1,,secret/cloudflare/magic-ipsec/{A}/{T}" in text
    assert KEYS[0] not in text


def test_the_command_without_an_account_to_report_on(env) -> None:
    _, _, _, addr, token = env
    proc = run_cli(["report"], {"VAULT_ADDR": addr, "VAULT_TOKEN": token, "CLOUDFLARE_API_TOKEN": ""})
    assert (proc.returncode, proc.stderr.strip()) == (2, "rotator: configuration error: no account to report on "
                                                      "(give --account ID or configure [[accounts]] in the file)")
    proc = run_cli(["report", "--account", A, "--from", "2026-02-01", "--to", "2026-01-01"],
                   {"VAULT_ADDR": addr, "VAULT_TOKEN": token, "CLOUDFLARE_API_TOKEN": ""})
    assert proc.returncode == 2 and "--from is not before --to" in proc.stderr
