"""Conformance cases of docs/specs/vault-kv2.md section 8, driven through hvac and raw HTTP."""

from __future__ import annotations

import json
import re
import time

import httpx
import hvac
import hvac.exceptions as hx
import pytest

from rotator.sim.vault import VaultSim

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")


@pytest.fixture
def env(vault_sim):
    sim, url = vault_sim
    client = hvac.Client(url=url, token=sim.root_token)
    raw = httpx.Client(base_url=url, headers={"X-Vault-Token": sim.root_token})
    yield sim, client, raw
    raw.close()


def kv(client):
    return client.secrets.kv.v2


def test_cases_1_to_19_in_order(env):
    sim, client, raw = env
    # 1: first write, exact envelope
    r = raw.post("/v1/secret/data/a", json={"options": {}, "data": {"k": "v1"}})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert list(body) == ["request_id", "lease_id", "renewable", "lease_duration", "data", "wrap_info",
                          "warnings", "auth", "mount_type"]
    assert UUID_RE.match(body["request_id"])
    assert (body["lease_id"], body["renewable"], body["lease_duration"]) == ("", False, 0)
    assert (body["wrap_info"], body["warnings"], body["auth"], body["mount_type"]) == (None, None, None, "kv")
    assert list(body["data"]) == ["created_time", "custom_metadata", "deletion_time", "destroyed", "version"]
    assert TS_RE.match(body["data"]["created_time"])
    assert body["data"]["version"] == 1 and body["data"]["deletion_time"] == "" and not body["data"]["destroyed"]
    assert r.text.endswith("}\n")
    # 2
    assert kv(client).create_or_update_secret("a", {"k": "v2"})["data"]["version"] == 2
    # 3
    read = kv(client).read_secret_version("a", raise_on_deleted_version=True)["data"]
    assert read["data"] == {"k": "v2"} and read["metadata"]["version"] == 2
    assert read["metadata"]["deletion_time"] == "" and read["metadata"]["destroyed"] is False
    # 4
    assert kv(client).read_secret_version("a", version=1, raise_on_deleted_version=True)["data"]["data"] == {"k": "v1"}
    # 5, 6
    for path in ("/v1/secret/data/a?version=99", "/v1/secret/data/missing"):
        r = raw.get(path)
        assert r.status_code == 404 and r.json() == {"errors": []}
    # 7
    r = raw.post("/v1/secret/data/a", json={"options": {"cas": 1}, "data": {"k": "x"}})
    assert r.status_code == 400 and r.json() == {"errors": ["check-and-set parameter did not match the current version"]}
    with pytest.raises(hx.InvalidRequest) as exc:
        kv(client).create_or_update_secret("a", {"k": "x"}, cas=1)
    assert str(exc.value).startswith("check-and-set parameter did not match the current version")
    # 8
    assert kv(client).create_or_update_secret("a", {"k": "v3"}, cas=2)["data"]["version"] == 3
    # 9
    assert kv(client).create_or_update_secret("new", {"n": 1}, cas=0)["data"]["version"] == 1
    with pytest.raises(hx.InvalidRequest):
        kv(client).create_or_update_secret("new", {"n": 2}, cas=0)
    # 10
    r = raw.post("/v1/secret/data/a", json={"options": {"cas": "abc"}, "data": {}})
    assert r.status_code == 400 and r.json() == {"errors": ["error parsing check-and-set parameter"]}
    # 11
    assert raw.post("/v1/secret/config", json={"cas_required": True}).status_code == 204
    r = raw.post("/v1/secret/data/c11", json={"options": {}, "data": {"x": 1}})
    assert r.status_code == 400 and r.json() == {"errors": ["check-and-set parameter required for this call"]}
    assert kv(client).create_or_update_secret("c11", {"x": 1}, cas=0)["data"]["version"] == 1
    assert raw.post("/v1/secret/config", json={"cas_required": False}).status_code == 204
    # 12
    assert raw.post("/v1/secret/metadata/b", json={"cas_required": True}).status_code == 204
    r = raw.post("/v1/secret/data/b", json={"options": {}, "data": {"x": 1}})
    assert r.status_code == 400 and "required for this call" in r.json()["errors"][0]
    # 13
    r = raw.post("/v1/secret/data/a", json={"options": {}})
    assert r.status_code == 400 and r.json() == {"errors": ["no data provided"]}
    # 14
    r = raw.delete("/v1/secret/data/a")
    assert r.status_code == 204 and r.content == b""
    r = raw.get("/v1/secret/data/a")
    assert r.status_code == 404
    meta = r.json()["data"]["metadata"]
    assert r.json()["data"]["data"] is None and meta["version"] == 3 and meta["deletion_time"] and not meta["destroyed"]
    deleted_at = meta["deletion_time"]
    got = kv(client).read_secret_version("a", raise_on_deleted_version=False)
    assert got["data"]["metadata"]["deletion_time"] == deleted_at
    with pytest.raises(hx.InvalidPath):
        kv(client).read_secret_version("a", raise_on_deleted_version=True)
    # 15
    assert raw.delete("/v1/secret/data/a").status_code == 204
    assert raw.get("/v1/secret/data/a").json()["data"]["metadata"]["deletion_time"] == deleted_at
    # 16
    kv(client).undelete_secret_versions("a", [3])
    r = raw.get("/v1/secret/data/a")
    assert r.status_code == 200 and r.json()["data"]["metadata"]["deletion_time"] == ""
    # 17
    kv(client).destroy_secret_versions("a", [3])
    r = raw.get("/v1/secret/data/a")
    assert r.status_code == 404 and r.json()["data"]["metadata"]["destroyed"] is True
    assert raw.post("/v1/secret/undelete/a", json={"versions": [3]}).status_code == 204
    assert raw.get("/v1/secret/data/a").status_code == 404
    # 18
    r = raw.post("/v1/secret/delete/a", json={"versions": []})
    assert r.status_code == 400 and r.json() == {"errors": ["No version number provided"]}
    r = raw.post("/v1/secret/destroy/a", json={"versions": []})
    assert r.status_code == 400 and r.json() == {"errors": ["no version number provided"]}
    # 19
    assert kv(client).create_or_update_secret("a", {"k": "v4"}, cas=3)["data"]["version"] == 4


def test_case_20_max_versions_trims_oldest(env):
    _, client, raw = env
    raw.post("/v1/secret/metadata/c", json={"max_versions": 3})
    for i in range(5):
        kv(client).create_or_update_secret("c", {"i": i})
    meta = kv(client).read_secret_metadata("c")["data"]
    assert (meta["current_version"], meta["oldest_version"]) == (5, 3)
    assert sorted(meta["versions"]) == ["3", "4", "5"]
    r = raw.get("/v1/secret/data/c?version=1")
    assert r.status_code == 404 and r.json() == {"errors": []}


def test_case_21_oldest_version_window_with_default_limit(env):
    _, client, _ = env
    for i in range(2):
        kv(client).create_or_update_secret("w", {"i": i})
    assert kv(client).read_secret_metadata("w")["data"]["oldest_version"] == 0
    for i in range(2, 10):
        kv(client).create_or_update_secret("w", {"i": i})
    meta = kv(client).read_secret_metadata("w")["data"]
    assert meta["oldest_version"] == 1 and len(meta["versions"]) == 10
    kv(client).create_or_update_secret("w", {"i": 10})
    assert kv(client).read_secret_metadata("w")["data"]["oldest_version"] == 2


def test_case_22_effective_max_is_the_larger(env):
    _, client, raw = env
    raw.post("/v1/secret/config", json={"max_versions": 5})
    raw.post("/v1/secret/metadata/m", json={"max_versions": 2})
    for i in range(7):
        kv(client).create_or_update_secret("m", {"i": i})
    assert sorted(int(v) for v in kv(client).read_secret_metadata("m")["data"]["versions"]) == [3, 4, 5, 6, 7]


def test_case_23_metadata_fields(env):
    _, client, _ = env
    for i in range(3):
        kv(client).create_or_update_secret("a", {"i": i})
    data = kv(client).read_secret_metadata("a")["data"]
    assert sorted(data) == ["cas_required", "created_time", "current_version", "custom_metadata",
                            "delete_version_after", "max_versions", "oldest_version", "updated_time", "versions"]
    assert data["delete_version_after"] == "0s" and sorted(data["versions"]) == ["1", "2", "3"]


def test_case_24_metadata_missing(env):
    _, _, raw = env
    r = raw.get("/v1/secret/metadata/missing")
    assert r.status_code == 404 and r.json() == {"errors": []}


def test_case_25_custom_metadata_replaces(env):
    _, client, raw = env
    kv(client).create_or_update_secret("a", {"x": 1})
    assert raw.post("/v1/secret/metadata/a", json={"custom_metadata": {"owner": "x"}}).status_code == 204
    assert kv(client).read_secret_version("a", raise_on_deleted_version=True)["data"]["metadata"]["custom_metadata"] == {"owner": "x"}
    raw.post("/v1/secret/metadata/a", json={"custom_metadata": {"team": "y"}})
    assert kv(client).read_secret_metadata("a")["data"]["custom_metadata"] == {"team": "y"}


def test_case_26_custom_metadata_too_many_keys(env):
    _, _, raw = env
    r = raw.post("/v1/secret/metadata/a", json={"custom_metadata": {f"k{i}": "v" for i in range(65)}})
    assert r.status_code == 400
    assert r.json() == {"errors": ["1 error occurred:\n\t* custom_metadata validation failed: payload must "
                                   "contain at most 64 keys, provided 65\n\n"]}


def test_case_27_custom_metadata_value_too_long(env):
    _, _, raw = env
    r = raw.post("/v1/secret/metadata/a", json={"custom_metadata": {"k": "v" * 513}})
    assert r.status_code == 400
    assert 'length of value for key "k" is 513 but must be 0 < len(value) <= 512' in r.json()["errors"][0]


def test_case_28_cas_required_false_under_mount_mandate_warns(env):
    _, client, raw = env
    kv(client).create_or_update_secret("a", {"x": 1})
    raw.post("/v1/secret/config", json={"cas_required": True})
    r = raw.post("/v1/secret/metadata/a", json={"cas_required": False})
    assert r.status_code == 200 and r.json()["data"] is None
    assert r.json()["warnings"] == ['"cas_required" set to false, but is mandated by backend config. '
                                    "This value will be ignored."]


def test_case_29_empty_metadata_post_creates_nothing(env):
    _, _, raw = env
    assert raw.post("/v1/secret/metadata/new29", json={}).status_code == 204
    assert raw.get("/v1/secret/metadata/new29").status_code == 404


def test_case_30_hvac_update_metadata(env):
    _, client, _ = env
    kv(client).create_or_update_secret("a", {"x": 1})
    resp = kv(client).update_metadata("a", max_versions=5)
    assert resp.status_code == 204
    assert kv(client).read_secret_metadata("a")["data"]["max_versions"] == 5


def test_case_31_list(env):
    _, client, raw = env
    kv(client).create_or_update_secret("foo", {"x": 1})
    kv(client).create_or_update_secret("foo/bar", {"x": 1})
    assert kv(client).list_secrets("")["data"]["keys"] == ["foo", "foo/"]
    for q in ("true", "True"):
        assert raw.get(f"/v1/secret/metadata?list={q}").json()["data"]["keys"] == ["foo", "foo/"]
    r = raw.get("/v1/secret/metadata?list=maybe")
    assert r.status_code == 400 and r.json() == {"errors": []}


def test_case_32_list_empty_folder(env):
    _, client, raw = env
    r = raw.request("LIST", "/v1/secret/metadata/emptyfolder")
    assert r.status_code == 404 and r.json() == {"errors": []}
    with pytest.raises(hx.InvalidPath):
        kv(client).list_secrets("emptyfolder")


def test_case_33_delete_metadata(env):
    _, client, raw = env
    kv(client).create_or_update_secret("a", {"x": 1})
    kv(client).create_or_update_secret("b", {"x": 1})
    assert raw.delete("/v1/secret/metadata/a").status_code == 204
    assert raw.get("/v1/secret/data/a").json() == {"errors": []}
    assert "a" not in kv(client).list_secrets("")["data"]["keys"]
    assert kv(client).create_or_update_secret("a", {"x": 2})["data"]["version"] == 1


def test_case_34_deletes_of_missing_are_204(env):
    _, _, raw = env
    assert raw.delete("/v1/secret/metadata/nonexistent").status_code == 204
    assert raw.delete("/v1/secret/data/nonexistent").status_code == 204


def test_case_35_merge_patch(env):
    _, client, raw = env
    kv(client).create_or_update_secret("d", {"x": "1", "y": {"z": "2"}})
    r = raw.patch("/v1/secret/data/d", content=json.dumps({"options": {"cas": 1}, "data": {"y": {"w": "3"}, "x": None}}),
                  headers={"Content-Type": "application/merge-patch+json"})
    assert r.status_code == 200 and r.json()["data"]["version"] == 2
    assert kv(client).read_secret_version("d", raise_on_deleted_version=True)["data"]["data"] == {"y": {"w": "3", "z": "2"}}


def test_case_36_patch_needs_merge_patch_content_type(env):
    _, client, raw = env
    kv(client).create_or_update_secret("d", {"x": "1"})
    r = raw.patch("/v1/secret/data/d", json={"options": {"cas": 1}, "data": {"x": "2"}})
    assert r.status_code == 415
    assert r.json() == {"errors": ["PATCH requires Content-Type of application/merge-patch+json, provided application/json"]}


def test_case_37_patch_missing_key_is_empty_404(env):
    _, _, raw = env
    r = raw.patch("/v1/secret/data/nope", content=b'{"data":{"a":1}}', headers={"Content-Type": "application/merge-patch+json"})
    assert r.status_code == 404 and r.content == b"" and r.headers["content-type"] == "application/json"


def test_case_38_patch_deleted_current_gives_flat_metadata(env):
    _, client, raw = env
    kv(client).create_or_update_secret("d", {"x": "1"})
    raw.delete("/v1/secret/data/d")
    r = raw.patch("/v1/secret/data/d", content=b'{"data":{"a":1}}', headers={"Content-Type": "application/merge-patch+json"})
    assert r.status_code == 404
    assert sorted(r.json()["data"]) == ["created_time", "custom_metadata", "deletion_time", "destroyed", "version"]


def test_case_39_hvac_patch(env):
    sim, client, _ = env
    kv(client).create_or_update_secret("p", {"a": "1"})
    kv(client).patch("p", {"b": "2"})
    assert sim.read_data("p") == {"a": "1", "b": "2"}
    assert sim.version_of("p") == 2
    client.secrets.kv.v2.delete_latest_version_of_secret("p")
    with pytest.raises(hx.InvalidPath, match=re.escape('No value found at "p"; patch only works on existing data.')):
        kv(client).patch("p", {"c": "3"})


def test_case_40_v1_style_path_on_v2_mount(env):
    _, _, raw = env
    r = raw.get("/v1/secret/a")
    assert r.status_code == 404 and r.json()["data"] is None and "errors" not in r.json()
    assert "Invalid path for a versioned K/V secrets engine" in r.json()["warnings"][0]
    assert "'vault kv get'" in r.json()["warnings"][0]


def test_case_41_trailing_slash(env):
    _, _, raw = env
    assert raw.get("/v1/secret/data/a/").status_code == 404
    r = raw.post("/v1/secret/data/a/", json={"data": {}})
    assert r.status_code == 400 and r.json() == {"errors": ["cannot write to a path ending in '/'"]}


def test_case_42_delete_version_after(env):
    _, client, raw = env
    assert raw.post("/v1/secret/config", json={"delete_version_after": "1h"}).status_code == 204
    data = kv(client).create_or_update_secret("t", {"x": 1})["data"]
    created = data["created_time"]
    assert data["deletion_time"] > created
    assert int(data["deletion_time"][11:13]) == (int(created[11:13]) + 1) % 24
    assert raw.get("/v1/secret/data/t").status_code == 200


def test_case_43_bad_token(env):
    sim, _, raw = env
    r = raw.get("/v1/secret/data/a", headers={"X-Vault-Token": "BAD"})
    assert r.status_code == 403
    assert r.json() == {"errors": ["2 errors occurred:\n\t* permission denied\n\t* invalid token\n\n"]}
    with pytest.raises(hx.Forbidden):
        hvac.Client(url=str(raw.base_url), token="BAD").secrets.kv.v2.read_secret_version("a", raise_on_deleted_version=True)


def test_case_44_token_without_permission(env):
    sim, _, raw = env
    token = sim.create_token(["none"])
    r = raw.get("/v1/secret/data/a", headers={"X-Vault-Token": token})
    assert r.status_code == 403 and r.json() == {"errors": ["1 error occurred:\n\t* permission denied\n\n"]}


def test_case_45_lookup_self(env):
    sim, client, raw = env
    data = client.auth.token.lookup_self()["data"]
    assert data["id"] == sim.root_token and isinstance(data["ttl"], int)
    assert isinstance(data["policies"], list) and data["type"] == "service"
    assert client.is_authenticated() is True
    assert hvac.Client(url=str(raw.base_url), token="BAD").is_authenticated() is False


def test_case_46_renew_self(env):
    sim, client, raw = env
    token = sim.create_token(["rotator"], ttl=60)
    auth = hvac.Client(url=str(raw.base_url), token=token).auth.token.renew_self(increment="1h")
    assert auth["data"] is None and auth["auth"]["renewable"] is True
    assert auth["auth"]["client_token"] == token and auth["auth"]["lease_duration"] > 0
    r = raw.post("/v1/auth/token/renew-self", json={"increment": "1h"})
    assert r.status_code == 400 and r.json() == {"errors": ["lease is not renewable"]}


def test_case_47_approle_login(env):
    sim, _, raw = env
    role_id, secret_id = sim.add_approle("psk-rotator", ["rotator"])
    client = hvac.Client(url=str(raw.base_url), token="stale-token")
    resp = client.auth.approle.login(role_id, secret_id)
    auth = resp["auth"]
    for key in ("accessor", "policies", "token_policies", "lease_duration", "renewable", "entity_id"):
        assert key in auth
    assert isinstance(auth["client_token"], str) and auth["metadata"]["role_name"] == "psk-rotator"
    assert (auth["token_type"], auth["orphan"], auth["mfa_requirement"], auth["num_uses"]) == ("service", True, None, 0)
    assert resp["data"] is None
    client.secrets.kv.v2.create_or_update_secret("cloudflare/magic-ipsec/x", {"a": 1})


def test_case_48_approle_errors(env):
    sim, _, raw = env
    role_id, _ = sim.add_approle("r", ["rotator"])
    r = raw.post("/v1/auth/approle/login", json={"role_id": role_id, "secret_id": "wrong"})
    assert r.status_code == 400 and r.json() == {"errors": ["invalid role or secret ID"]}
    r = raw.post("/v1/auth/approle/login", json={"secret_id": "x"})
    assert r.status_code == 400 and r.json() == {"errors": ["missing role_id"]}


def test_case_49_kubernetes_login(env):
    sim, _, raw = env
    jwt = sim.add_kubernetes_role("psk-rotator", ["rotator"], service_account="rot", namespace="ops")
    client = hvac.Client(url=str(raw.base_url))
    meta = client.auth.kubernetes.login("psk-rotator", jwt)["auth"]["metadata"]
    assert sorted(meta) == ["role", "service_account_name", "service_account_namespace",
                            "service_account_secret_name", "service_account_uid"]
    r = raw.post("/v1/auth/kubernetes/login", json={"role": "nope", "jwt": jwt})
    assert r.status_code == 400 and r.json() == {"errors": ['invalid role name "nope"']}
    r = raw.post("/v1/auth/kubernetes/login", json={"role": "psk-rotator", "jwt": "bad.jwt.value"})
    assert r.status_code == 403


def test_case_50_health_active(env):
    _, client, raw = env
    body = raw.get("/v1/sys/health").json()
    assert (body["initialized"], body["sealed"], body["standby"]) == (True, False, False)
    assert isinstance(body["server_time_utc"], int) and isinstance(body["version"], str)
    r = raw.head("/v1/sys/health")
    assert r.status_code == 200 and r.content == b""


def test_case_51_sealed(env):
    sim, client, raw = env
    sim.seal()
    r = raw.get("/v1/sys/health")
    assert r.status_code == 503 and r.json()["sealed"] is True and r.json()["standby"] is True
    assert "cluster_name" not in r.json()
    assert raw.get("/v1/sys/health?sealedcode=200").status_code == 200
    for call in (lambda: raw.get("/v1/secret/data/a"), lambda: raw.get("/v1/auth/token/lookup-self"),
                 lambda: raw.post("/v1/auth/approle/login", json={"role_id": "x"})):
        r = call()
        assert r.status_code == 503 and r.json() == {"errors": ["Vault is sealed"]}
    with pytest.raises(hx.VaultDown):
        kv(client).read_secret_version("a", raise_on_deleted_version=True)
    assert raw.get("/v1/sys/seal-status").json()["sealed"] is True


@pytest.mark.parametrize(("mode", "query", "status"), [
    ("standby", "", 429), ("standby", "?standbyok=true", 200), ("perfstandby", "", 473),
    ("drsecondary", "", 472), ("active", "?activecode=abc", 400),
])
def test_case_52_health_modes(env, mode, query, status):
    sim, _, raw = env
    sim.mode = mode
    assert raw.get("/v1/sys/health" + query).status_code == status


def test_case_52_uninitialized(env):
    sim, _, raw = env
    sim.initialized = False
    assert raw.get("/v1/sys/health").status_code == 501


def test_case_53_hvac_health_return_types(env):
    sim, client, _ = env
    assert client.sys.read_health_status().status_code == 200
    assert isinstance(client.sys.read_health_status(method="GET"), dict)
    sim.mode = "standby"
    assert client.sys.read_health_status(method="GET").status_code == 429
    sim.mode = "active"
    sim.seal()
    assert client.sys.read_health_status().status_code == 503
    assert client.sys.read_health_status(method="GET").status_code == 503


def test_case_54_mounts(env):
    _, client, raw = env
    body = raw.get("/v1/sys/mounts").json()
    assert body["data"]["secret/"]["type"] == "kv" and body["data"]["secret/"]["options"]["version"] == "2"
    assert body["secret/"] == body["data"]["secret/"]
    assert client.sys.retrieve_mount_option("secret", "version") == "2"


@pytest.mark.parametrize("status", [400, 403, 404, 429, 500, 503])
def test_case_55_error_bodies_populate_hvac_errors(env, status):
    sim, client, raw = env
    kv(client).create_or_update_secret("e", {"x": 1})
    if status == 400:
        call = lambda: kv(client).create_or_update_secret("e", {"x": 1}, cas=99)
    elif status == 404:
        call = lambda: kv(client).read_secret_version("missing", raise_on_deleted_version=True)
    else:
        sim.fail_next("kv.read", status=status)
        call = lambda: kv(client).read_secret_version("e", raise_on_deleted_version=True)
    with pytest.raises(hx.VaultError) as exc:
        call()
    assert exc.value.errors is not None


def test_case_56_cache_control_and_empty_204(env):
    _, client, raw = env
    for r in (raw.post("/v1/secret/data/z", json={"data": {"a": 1}}), raw.get("/v1/secret/data/z"),
              raw.get("/v1/secret/data/nope"), raw.delete("/v1/secret/data/z")):
        assert r.headers["cache-control"] == "no-store"
    assert r.status_code == 204 and r.content == b""


def test_case_57_namespace_and_request_headers_accepted(env):
    _, _, raw = env
    r = raw.post("/v1/secret/data/n", json={"data": {"a": 1}},
                 headers={"X-Vault-Namespace": "ns1/", "X-Vault-Request": "true"})
    # Namespaces are Enterprise-only; the simulator accepts the header and keeps a namespace's
    # mounts apart (the root namespace's `secret` does not exist inside ns1/ -> 403 for ACL-less paths).
    assert r.status_code in (200, 403, 404)
    r = raw.post("/v1/secret/data/n", json={"data": {"a": 1}}, headers={"X-Vault-Request": "true"})
    assert r.status_code == 200


def test_case_57_namespace_scopes_storage(env):
    sim, _, raw = env
    sim.add_mount("secret", namespace="ns1")
    ns = {"X-Vault-Namespace": "ns1/"}
    assert raw.post("/v1/secret/data/n", json={"data": {"in": "ns1"}}, headers=ns).status_code == 200
    assert raw.get("/v1/secret/data/n").status_code == 404
    assert raw.get("/v1/secret/data/n", headers=ns).json()["data"]["data"] == {"in": "ns1"}


def test_case_58_unknown_method(env):
    _, _, raw = env
    r = raw.request("COPY", "/v1/secret/data/a")
    assert r.status_code == 405 and r.json() == {"errors": []}


# -- fault injection through the real client ------------------------------------------------------

def test_fault_write_refused_nothing_stored(env):
    sim, client, _ = env
    sim.refuse_writes(403)
    with pytest.raises(hx.Forbidden):
        kv(client).create_or_update_secret("f", {"x": 1})
    assert sim.read_data("f") is None
    sim.refuse_writes(None)
    assert kv(client).create_or_update_secret("f", {"x": 1})["data"]["version"] == 1


def test_fault_write_succeeds_but_response_lost(env):
    sim, client, _ = env
    sim.drop_next("kv.write")
    with pytest.raises(Exception) as exc:
        kv(client).create_or_update_secret("f", {"x": 1})
    assert "Connection" in type(exc.value).__name__ or "connection" in str(exc.value).lower()
    assert sim.read_data("f") == {"x": 1}


def test_fault_next_n_requests_5xx_then_recovers(env):
    sim, client, _ = env
    kv(client).create_or_update_secret("f", {"x": 1})
    sim.fail_next("kv.read", count=2, status=500)
    for _ in range(2):
        with pytest.raises(hx.InternalServerError):
            kv(client).read_secret_version("f", raise_on_deleted_version=True)
    assert kv(client).read_secret_version("f", raise_on_deleted_version=True)["data"]["data"] == {"x": 1}


def test_fault_html_error_page_leaves_hvac_errors_empty(env):
    sim, client, _ = env
    sim.fail_next("kv.read", status=502, html=True)
    with pytest.raises(hx.BadGateway) as exc:
        kv(client).read_secret_version("f", raise_on_deleted_version=True)
    assert exc.value.errors is None


def test_fault_latency_is_added(env):
    sim, client, _ = env
    sim.set_latency(0.2, route="kv.read")
    kv(client).create_or_update_secret("f", {"x": 1})
    start = time.monotonic()
    kv(client).read_secret_version("f", raise_on_deleted_version=True)
    assert time.monotonic() - start >= 0.2


def test_fault_control_over_http(env):
    sim, client, raw = env
    r = raw.post("/_sim/control", json={"op": "seal"})
    assert r.status_code == 200
    with pytest.raises(hx.VaultDown):
        kv(client).read_secret_version("f", raise_on_deleted_version=True)
    raw.post("/_sim/control", json={"op": "unseal"})
    raw.post("/_sim/control", json={"op": "fail_next", "route": "kv.write", "status": 503})
    with pytest.raises(hx.VaultDown):
        kv(client).create_or_update_secret("f", {"x": 1})
    state = raw.get("/_sim/state").json()["result"]
    assert state["request_counts"]["kv.write"] == 1 and state["sealed"] is False
    assert raw.post("/_sim/control", json={"op": "nope"}).status_code == 400


def test_token_expiry_makes_token_invalid(env):
    sim, _, raw = env
    token = sim.create_token(["rotator"], ttl=60)
    sim.tokens[token].expires = time.time() - 1
    r = raw.get("/v1/auth/token/lookup-self", headers={"X-Vault-Token": token})
    assert r.status_code == 403 and "invalid token" in r.json()["errors"][0]


def test_rotator_policy_is_least_privilege(env):
    sim, _, raw = env
    token = sim.create_token(["rotator"])
    h = {"X-Vault-Token": token}
    assert raw.post("/v1/secret/data/cloudflare/magic-ipsec/a/t", json={"data": {"x": 1}}, headers=h).status_code == 200
    assert raw.post("/v1/secret/data/other", json={"data": {"x": 1}}, headers=h).status_code == 403
    assert raw.get("/v1/sys/internal/ui/mounts/secret", headers=h).json()["data"]["options"]["version"] == "2"
    assert raw.get("/v1/sys/mounts", headers=h).status_code == 403


def test_kv_v1_mount_reports_version_1(env):
    sim, _, raw = env
    sim.add_mount("legacy", kv_version="1")
    assert raw.get("/v1/sys/internal/ui/mounts/legacy").json()["data"]["options"]["version"] == "1"


def test_vault_sim_rejects_bad_fault_kind():
    sim = VaultSim()
    with pytest.raises(ValueError):
        sim.fail_next("kv.read", count=0)
