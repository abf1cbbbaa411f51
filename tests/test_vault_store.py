"""The Vault record store against the simulator through hvac: ids, garbage, the error table, encoded paths."""

from __future__ import annotations

import hvac
import pytest

from rotator.adapters.vault import ERROR_TABLE, VaultStore, build_hvac_client, translate
from rotator.errors import CasConflict, VaultError
from rotator.model import Record
from rotator.secret import Secret

A = "023e105f4ecef8ad9ca31a8372d0c353"
T = "c4a7362d577a6c3019a474fd6f485821"
ODD = ["../" + "b" * 32, "../_leases/" + A, "sub/dir", "..", "ABCDEF" + "0" * 26, ""]


@pytest.fixture
def env(vault_sim):
    sim, addr = vault_sim
    token = sim.create_token(["default", "rotator"], ttl=3600)
    client = build_hvac_client(addr, token, concurrency=4, timeout=5)
    store = VaultStore(client, concurrency=4)
    yield sim, store, addr
    store.close()


def kv_counts(sim):
    return {k: v for k, v in sim.request_counts().items() if k.startswith("kv.")}


def test_round_trip(env):
    sim, store, _ = env
    rec = store.write(Record(A, T, psk=Secret("p" * 32), state="active"))
    assert rec.version == 1
    back = store.read(A, T)
    assert back.psk == Secret("p" * 32) and back.version == 1
    assert sim.read_data(f"cloudflare/magic-ipsec/{A}/{T}")["psk"] == "p" * 32


@pytest.mark.parametrize("odd", ODD)
def test_odd_ids_never_become_paths(env, odd):
    sim, store, _ = env
    with pytest.raises(VaultError, match="not 32 lowercase hex"):
        store.read(A, odd)
    with pytest.raises(VaultError, match="not 32 lowercase hex"):
        store.read(odd, T)
    result = store.write_many([Record(A, odd, psk=Secret("p" * 32)), Record(odd, T, psk=Secret("q" * 32))])
    assert all(isinstance(r, VaultError) for r in result.values())
    with pytest.raises(VaultError):
        store.read_lease(odd)
    with pytest.raises(VaultError):
        store.write_lease(odd, "me", 1.0, 0)
    assert kv_counts(sim) == {} and sim.keys_under("") == []


@pytest.mark.parametrize("variant", ["html", "not_json", "types"])
def test_garbage_reads_are_vault_errors(env, variant):
    sim, store, _ = env
    store.write(Record(A, T, psk=Secret("p" * 32)))
    sim.garbage_next("kv.read", variant=variant)
    with pytest.raises(VaultError) as exc:
        store.read(A, T)
    assert "\n" not in str(exc.value) and "VAULT_ADDR" in str(exc.value)
    assert store.read(A, T).psk == Secret("p" * 32)


@pytest.mark.parametrize("variant", ["html", "not_json", "types"])
def test_garbage_after_a_write_is_settled_by_reading_back(env, variant):
    sim, store, _ = env
    sim.garbage_next("kv.write", variant=variant)
    # The garbage answer took nothing in (the fault does not handle the request): read-back says so.
    with pytest.raises(VaultError) as exc:
        store.write(Record(A, T, psk=Secret("p" * 32)))
    assert exc.value.ambiguous and sim.version_of(f"cloudflare/magic-ipsec/{A}/{T}") == 0


def test_a_write_whose_answer_is_lost_but_landed_counts(env):
    sim, store, _ = env
    sim.drop_next("kv.write")
    rec = store.write(Record(A, T, psk=Secret("p" * 32)))
    assert rec.version == 1 and store.read(A, T).psk == Secret("p" * 32)


@pytest.mark.parametrize("expires_at", ["soon", "nan", "inf", ["1"], True])
def test_a_malformed_lease_is_a_vault_error(env, expires_at):
    sim, store, addr = env
    root = hvac.Client(url=addr, token=sim.root_token)
    root.secrets.kv.v2.create_or_update_secret(f"cloudflare/magic-ipsec/_leases/{A}",
                                              secret={"holder": "h", "expires_at": expires_at})
    with pytest.raises(VaultError) as exc:
        store.read_lease(A)
    assert "malformed" in str(exc.value) and "vault kv put" in str(exc.value)


@pytest.mark.parametrize("status,retryable,ambiguous_write", [
    (403, False, False), (429, True, False), (500, True, True), (502, True, True), (503, True, False),
])
def test_error_table_by_status(env, status, retryable, ambiguous_write):
    sim, store, _ = env
    sim.fail_next("kv.read", status=status)
    with pytest.raises(VaultError) as exc:
        store.read(A, T)
    assert exc.value.status == status and exc.value.retryable is retryable and not exc.value.ambiguous
    sim.fail_next("kv.write", status=status, count=5)
    with pytest.raises(VaultError) as exc:
        store.write(Record(A, T, psk=Secret("p" * 32)))
    assert exc.value.ambiguous is ambiguous_write and "\n" not in str(exc.value)


def test_error_table_by_vault_text(env):
    sim, store, _ = env
    store.write(Record(A, T, psk=Secret("p" * 32)))
    with pytest.raises(CasConflict):
        store.write(Record(A, T, version=0, psk=Secret("q" * 32)))
    sim.seal()
    with pytest.raises(VaultError, match="sealed") as exc:
        store.read(A, T)
    assert exc.value.retryable
    sim.unseal()
    sim.revoke_token(store._client.token)
    with pytest.raises(VaultError, match="invalid or expired"):
        store.read(A, T)


def test_every_table_row_is_reachable_by_its_key():
    texts = {(row[0], row[1]) for row in ERROR_TABLE}
    assert len(texts) == len(ERROR_TABLE), "two rows with the same key: the second is dead"
    with pytest.raises(KeyError):
        translate(KeyError("not a Vault failure"), "x")


def test_unreachable_vault(vault_sim):
    store = VaultStore(build_hvac_client("http://127.0.0.1:9", "t", timeout=2), concurrency=2)
    try:
        with pytest.raises(VaultError, match="cannot reach Vault") as exc:
            store.read(A, T)
        assert exc.value.retryable and not exc.value.ambiguous
    finally:
        store.close()


def test_paths_are_decoded_once_as_vault_does(vault_sim):
    """hvac quotes '%' as '%25'; the server decodes once, so a key named 'x%2Fy' stays one key."""
    sim, addr = vault_sim
    root = hvac.Client(url=addr, token=sim.root_token)
    root.secrets.kv.v2.create_or_update_secret("enc/x%2Fy", secret={"v": "1"})
    assert sim.read_data("enc/x%2Fy") == {"v": "1"} and sim.read_data("enc/x/y") is None
    with pytest.raises(hvac.exceptions.InvalidPath):
        root.secrets.kv.v2.read_secret_version("enc/x/y", raise_on_deleted_version=True)
    assert root.secrets.kv.v2.read_secret_version("enc/x%2Fy", raise_on_deleted_version=True)["data"]["data"] \
        == {"v": "1"}


def test_statuses_hvac_does_not_name_and_texts_that_look_like_transport_kinds():
    import hvac.exceptions as hx

    odd = translate(hx.UnexpectedError("http: request body too large"), "writing x", write=True)
    assert "unexpected status" in str(odd) and odd.ambiguous  # unknown status: the write may have landed
    refused = translate(hx.Unauthorized("missing client token"), "writing x", write=True)
    assert not refused.ambiguous and refused.status == 401 and "missing client token" in str(refused)
    multi = translate(hx.Forbidden(errors=["1 error occurred:\n\t* permission denied\n\n"]), "reading x")
    assert str(multi).startswith("reading x: Vault denied permission (403: permission denied)")


def test_latest_under_is_one_consistent_view(env):
    sim, store, _ = env
    store.write(Record(A, T, psk=Secret("p" * 32)))
    rec = store.write(Record(A, "d" * 32, psk=Secret("q" * 32)))
    store.write(Record(A, "d" * 32, version=rec.version, psk=Secret("r" * 32)))
    view = sim.latest_under(f"cloudflare/magic-ipsec/{A}/")
    assert {p.rsplit("/", 1)[1]: d["psk"] for p, d in view.items()} == {T: "p" * 32, "d" * 32: "r" * 32}


def test_write_many_refuses_a_batch_that_names_a_tunnel_twice(env):
    """Issue 20 item 1: two records for one tunnel in one batch is a programming error; nothing is written."""
    from rotator.model import RepeatedTunnel

    _, store, _ = env
    rec = store.write(Record(A, T, psk=Secret("p" * 32), state="active"))
    with pytest.raises(RepeatedTunnel, match="write_many"):
        store.write_many([Record(A, T, rec.version, psk=Secret("a" * 32)), Record(A, T, rec.version,
                                                                                  psk=Secret("b" * 32))])
    assert store.read(A, T).version == rec.version and store.read(A, T).psk == Secret("p" * 32)


# -- Vault's error texts quoting a credential (issue 20, item 3) ---------------------------------------

@pytest.mark.parametrize("status", [403, 500])
def test_an_error_that_quotes_the_token_is_redacted(env, status):
    """A proxy or plugin in front of Vault that echoes the request: its error quotes the token."""
    import httpx

    sim, store, addr = env
    token = store._client.token
    sim.echo_token_next("kv.read", status=status)
    raw = httpx.get(f"{addr}/v1/secret/data/x", headers={"X-Vault-Token": token})
    assert raw.status_code == status and token in raw.text  # the fault really quotes it
    sim.echo_token_next("kv.read", status=status, count=3)
    with pytest.raises(VaultError) as exc:
        store.read(A, T)
    text = str(exc.value) + repr(exc.value.args)
    assert token not in text and "X-Vault-Token \"**redacted**\"" in text, text
    assert str(status) in text and "\n" not in text
