"""Conformance cases of docs/specs/cloudflare-magic-ipsec.md section 9, through the official SDK."""

from __future__ import annotations

import time

import cloudflare
import httpx
import pytest

A = "023e105f4ecef8ad9ca31a8372d0c353"
T1 = "c4a7362d577a6c3019a474fd6f485821"
T2 = "0a1b2c3d4e5f60718293a4b5c6d7e8f9"
GOOD = "G" * 40
RO = "R" * 40
UNKNOWN_T = "f" * 32


@pytest.fixture
def env(cf_sim):
    sim, base = cf_sim
    sim.add_account(A)
    sim.add_tunnel(A, name="IPsec_1", tunnel_id=T1)
    sim.add_tunnel(A, name="IPsec_2", tunnel_id=T2)
    sim.add_token(GOOD)
    sim.add_token(RO, write=False)
    sdk = cloudflare.Cloudflare(api_token=GOOD, base_url=base)
    raw = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {GOOD}"})
    yield sim, sdk, raw, base
    raw.close()
    sdk.close()


def tunnels(sdk):
    return sdk.magic_transit.ipsec_tunnels


def test_case_1_list(env):
    sim, sdk, raw, _ = env
    body = raw.get(f"/accounts/{A}/magic/ipsec_tunnels").json()
    assert (body["success"], body["errors"], body["messages"]) == (True, [], [])
    assert "result_info" not in body
    for t in body["result"]["ipsec_tunnels"]:
        assert {"id", "name", "cloudflare_endpoint", "interface_address"} <= set(t)
        assert "last_generated_on" in t["psk_metadata"]
    assert "psk" not in raw.get(f"/accounts/{A}/magic/ipsec_tunnels").text.replace("psk_metadata", "")
    assert {t.id for t in tunnels(sdk).list(account_id=A).ipsec_tunnels} == {T1, T2}


def test_case_2_health_check_target_shape(env):
    _, _, raw, _ = env
    new = raw.get(f"/accounts/{A}/magic/ipsec_tunnels", headers={"x-magic-new-hc-target": "true"}).json()
    assert set(new["result"]["ipsec_tunnels"][0]["health_check"]["target"]) == {"effective", "saved"}
    for hdr in ({}, {"x-magic-new-hc-target": "false"}):
        old = raw.get(f"/accounts/{A}/magic/ipsec_tunnels", headers=hdr).json()
        assert isinstance(old["result"]["ipsec_tunnels"][0]["health_check"]["target"], str)


def test_case_3_get(env):
    _, sdk, _, _ = env
    assert tunnels(sdk).get(T1, account_id=A).ipsec_tunnel.id == T1


def test_case_4_get_unknown(env):
    _, sdk, raw, _ = env
    r = raw.get(f"/accounts/{A}/magic/ipsec_tunnels/{UNKNOWN_T}")
    assert r.status_code == 404 and r.json()["success"] is False
    assert 1032 in [e["code"] for e in r.json()["errors"]]
    with pytest.raises(cloudflare.NotFoundError):
        tunnels(sdk).get(UNKNOWN_T, account_id=A)


def test_case_5_psk_set(env):
    sim, sdk, _, _ = env
    before = tunnels(sdk).get(T1, account_id=A).ipsec_tunnel.psk_metadata.last_generated_on
    time.sleep(0.001)  # timestamps carry microseconds; make a later one distinguishable
    psk = "NewPsk0123456789abcdefABCDEFghij"
    result = tunnels(sdk).psk_set(account_id=A, psks=[{"id": T1, "psk": psk}])
    applied = result.successfully_applied_psks[T1]
    assert isinstance(applied.ipsec_id, str) and applied.ipsec_tunnel_id == T1 and applied.psk == psk
    assert applied.psk_metadata.last_generated_on is not None
    assert not result.unapplied_psks
    after = tunnels(sdk).get(T1, account_id=A).ipsec_tunnel.psk_metadata.last_generated_on
    assert after > before and sim.psk_of(A, T1) == psk


def test_case_6_validate_only_persists_nothing(env):
    sim, sdk, _, _ = env
    before = tunnels(sdk).get(T1, account_id=A).ipsec_tunnel.psk_metadata.last_generated_on
    old = sim.psk_of(A, T1)
    result = tunnels(sdk).psk_set(account_id=A, psks=[{"id": T1, "psk": "V" * 32}], validate_only=True)
    assert T1 in result.successfully_applied_psks
    assert tunnels(sdk).get(T1, account_id=A).ipsec_tunnel.psk_metadata.last_generated_on == before
    assert sim.psk_of(A, T1) == old and sim.applied_history() == []


def test_case_7_partial_success(env):
    _, sdk, _, _ = env
    result = tunnels(sdk).psk_set(account_id=A, psks=[{"id": T1, "psk": "a" * 32}, {"id": UNKNOWN_T, "psk": "b" * 32}])
    assert T1 in result.successfully_applied_psks
    assert isinstance(result.unapplied_psks[UNKNOWN_T], str)


def test_case_8_psk_generate(env):
    sim, sdk, raw, _ = env
    first = tunnels(sdk).psk_generate(T1, account_id=A)
    assert first.ipsec_tunnel_id == T1 and len(first.psk) == 32 and first.psk.isalnum()
    assert first.psk_metadata.last_generated_on is not None
    second = raw.post(f"/accounts/{A}/magic/ipsec_tunnels/{T1}/psk_generate", json={}).json()["result"]
    assert second["psk"] != first.psk and sim.psk_of(A, T1) == second["psk"]


def test_case_9_psk_generate_validate_only(env):
    sim, sdk, _, _ = env
    old = sim.psk_of(A, T1)
    before = tunnels(sdk).get(T1, account_id=A).ipsec_tunnel.psk_metadata.last_generated_on
    tunnels(sdk).psk_generate(T1, account_id=A, extra_query={"validate_only": True})
    assert sim.psk_of(A, T1) == old
    assert tunnels(sdk).get(T1, account_id=A).ipsec_tunnel.psk_metadata.last_generated_on == before


def test_case_10_no_auth(env):
    sim, _, _, base = env
    r = httpx.get(f"{base}/accounts/{A}/magic/ipsec_tunnels")
    assert r.status_code == 400
    assert r.json() == {"success": False, "errors": [{"code": 9106, "message": "Missing X-Auth-Key, X-Auth-Email or Authorization headers"}]}
    sdk = cloudflare.Cloudflare(api_token=GOOD, base_url=base, default_headers={"Authorization": ""})
    sdk._client.headers.pop("Authorization", None)
    before = sim.request_counts().get("cf.list", 0)
    with pytest.raises(cloudflare.BadRequestError):
        sdk.magic_transit.ipsec_tunnels.list(account_id=A, extra_headers={"Authorization": cloudflare.Omit()})
    assert sim.request_counts()["cf.list"] - before == 1


def test_case_11_malformed_bearer(env):
    _, _, _, base = env
    r = httpx.get(f"{base}/accounts/{A}/magic/ipsec_tunnels", headers={"Authorization": "Bearer not a token!"})
    body = r.json()
    assert r.status_code == 400 and body["errors"][0]["code"] == 6003
    assert body["errors"][0]["error_chain"][0] == {"code": 6111, "message": "Invalid format for Authorization header"}
    assert body["messages"] == [] and body["result"] is None


def test_case_12_malformed_legacy_key(env):
    _, _, _, base = env
    r = httpx.get(f"{base}/accounts/{A}/magic/ipsec_tunnels", headers={"X-Auth-Email": "a@b.c", "X-Auth-Key": "bad"})
    assert r.status_code == 400 and r.json()["errors"][0]["error_chain"][0]["code"] == 6103


def test_case_12_legacy_pair_accepted_and_unknown_refused(env):
    sim, _, _, base = env
    key = "0123456789abcdef0123456789abcdef"
    sim.add_legacy_key("ops@example.com", key)
    sdk = cloudflare.Cloudflare(api_email="ops@example.com", api_key=key, base_url=base)
    assert len(sdk.magic_transit.ipsec_tunnels.list(account_id=A).ipsec_tunnels) == 2
    bad = cloudflare.Cloudflare(api_email="ops@example.com", api_key="f" * 32, base_url=base)
    with pytest.raises(cloudflare.PermissionDeniedError) as exc:
        bad.magic_transit.ipsec_tunnels.list(account_id=A)
    assert exc.value.errors[0].code == 9103


def test_case_13_unknown_token(env):
    sim, _, _, base = env
    sdk = cloudflare.Cloudflare(api_token="u" * 40, base_url=base)
    r = httpx.get(f"{base}/accounts/{A}/magic/ipsec_tunnels", headers={"Authorization": "Bearer " + "u" * 40})
    assert r.status_code == 403
    assert r.json() == {"success": False, "errors": [{"code": 10000, "message": "Authentication error"}],
                        "messages": [], "result": None}
    before = sim.request_counts()["cf.list"]
    with pytest.raises(cloudflare.PermissionDeniedError):
        sdk.magic_transit.ipsec_tunnels.list(account_id=A)
    assert sim.request_counts()["cf.list"] - before == 1


def test_case_14_read_only_token(env):
    _, _, _, base = env
    sdk = cloudflare.Cloudflare(api_token=RO, base_url=base)
    assert len(tunnels(sdk).list(account_id=A).ipsec_tunnels) == 2
    tunnels(sdk).get(T1, account_id=A)
    for call in (lambda: tunnels(sdk).psk_set(account_id=A, psks=[{"id": T1, "psk": "x" * 32}]),
                 lambda: tunnels(sdk).psk_generate(T1, account_id=A)):
        with pytest.raises(cloudflare.PermissionDeniedError) as exc:
            call()
        assert exc.value.errors[0].code == 10000


def test_case_15_not_an_account_id(env):
    _, _, raw, _ = env
    r = raw.get("/accounts/not-an-id/magic/ipsec_tunnels")
    assert r.status_code == 400
    codes = [e["code"] for e in r.json()["errors"]]
    assert codes[0] == 7003
    assert r.json()["errors"][0]["message"] == ("Could not route to /accounts/not-an-id/magic/ipsec_tunnels, "
                                                 "perhaps your object identifier is invalid?")


def test_case_16_account_not_covered_by_token(env):
    sim, _, _, base = env
    other = sim.add_account()
    scoped = sim.add_token(accounts={A})
    sdk = cloudflare.Cloudflare(api_token=scoped, base_url=base)
    with pytest.raises(cloudflare.PermissionDeniedError) as exc:
        tunnels(sdk).list(account_id=other)
    assert exc.value.errors[0].code == 10000


def test_case_17_rate_limit(env):
    sim, _, raw, _ = env
    sim.set_rate_limit(5, 300)
    for i in range(5):
        r = raw.get(f"/accounts/{A}/magic/ipsec_tunnels")
        assert r.status_code == 200
        assert r.headers["ratelimit"].startswith(f'"default";r={4 - i};t=')
        assert r.headers["ratelimit-policy"] == '"default";q=5;w=300'
    for _ in range(2):
        r = raw.get(f"/accounts/{A}/magic/ipsec_tunnels")
        assert r.status_code == 429 and 0 < int(r.headers["retry-after"]) <= 300
        assert r.json() == {"success": False, "errors": [{"code": 971, "message": "Please wait and consider throttling your request speed"}],
                            "messages": [], "result": None}


def test_case_17_budget_returns_after_window(env):
    sim, _, raw, _ = env
    sim.set_rate_limit(2, 0.3)
    raw.get(f"/accounts/{A}/magic/ipsec_tunnels")
    raw.get(f"/accounts/{A}/magic/ipsec_tunnels")
    assert raw.get(f"/accounts/{A}/magic/ipsec_tunnels").status_code == 429
    deadline = time.monotonic() + 5
    while raw.get(f"/accounts/{A}/magic/ipsec_tunnels").status_code == 429:
        assert time.monotonic() < deadline


def test_case_18_sdk_retries_429_with_retry_after(env):
    sim, sdk, _, _ = env
    sim.fail_next("cf.list", count=3, status=429, retry_after=1)
    start = time.monotonic()
    with pytest.raises(cloudflare.RateLimitError):
        tunnels(sdk).list(account_id=A)
    assert time.monotonic() - start >= 2.0
    log = sim.requests_of("cf.list")
    assert [h.get("x-stainless-retry-count") for _, _, h in log] == ["0", "1", "2"]


def test_case_19_sdk_retries_503(env):
    sim, sdk, _, _ = env
    sim.fail_next("cf.list", count=3, status=503)
    with pytest.raises(cloudflare.InternalServerError):
        tunnels(sdk).list(account_id=A)
    stamps = [t for t, _, _ in sim.requests_of("cf.list")]
    assert len(stamps) == 3 and 0.3 <= stamps[1] - stamps[0] <= 0.6 and 0.6 <= stamps[2] - stamps[1] <= 1.2


def test_case_20_409_retried_other_4xx_not(env):
    sim, sdk, _, _ = env
    sim.fail_next("cf.list", count=3, status=409)
    with pytest.raises(cloudflare.ConflictError):
        tunnels(sdk).list(account_id=A)
    assert sim.request_counts()["cf.list"] == 3
    for status, exc_type in ((400, cloudflare.BadRequestError), (422, cloudflare.UnprocessableEntityError)):
        before = sim.request_counts()["cf.list"]
        sim.fail_next("cf.list", status=status)
        with pytest.raises(exc_type):
            tunnels(sdk).list(account_id=A)
        assert sim.request_counts()["cf.list"] - before == 1


def test_case_21_html_502(env):
    sim, sdk, _, _ = env
    sim.fail_next("cf.list", count=1, status=502, html=True)
    with pytest.raises(cloudflare.InternalServerError) as exc:
        tunnels(sdk.with_options(max_retries=0)).list(account_id=A)
    assert isinstance(exc.value.body, str) and "<html>" in exc.value.body
    sim.fail_next("cf.list", count=1, status=502, html=True)
    assert len(tunnels(sdk).list(account_id=A).ipsec_tunnels) == 2  # retried to success


def test_case_22_ignores_sdk_headers(env):
    _, _, raw, _ = env
    r = raw.get(f"/accounts/{A}/magic/ipsec_tunnels", headers={"api-version": "2026-11-26", "User-Agent": "x",
                                                              "X-Stainless-Lang": "python"})
    assert r.status_code == 200


def test_case_23_base_path_and_unknown_routes(env):
    _, _, raw, base = env
    assert raw.get(f"/accounts/{A}/magic/ipsec_tunnels/").status_code == 404
    assert raw.get(f"/accounts/{A}/magic/gre_tunnels").json()["errors"][0]["code"] == 7000
    wrong_base = base.replace("/client/v4", "/v3")
    assert httpx.get(f"{wrong_base}/accounts/{A}/magic/ipsec_tunnels", headers={"Authorization": f"Bearer {GOOD}"}).status_code == 404


def test_case_24_json_content_type_everywhere(env):
    _, _, raw, _ = env
    for r in (raw.get(f"/accounts/{A}/magic/ipsec_tunnels"), raw.get(f"/accounts/{A}/magic/ipsec_tunnels/{UNKNOWN_T}"),
              raw.get("/accounts/bad/magic/ipsec_tunnels")):
        assert r.headers["content-type"] == "application/json"


# -- fault injection -------------------------------------------------------------------------------

def test_fault_refused_by_validate_and_apply(env):
    sim, sdk, _, _ = env
    sim.refuse_tunnels([T1], reason="validation says no", stage="validate")
    sim.refuse_tunnels([T2], reason="apply says no", stage="apply")
    body = [{"id": T1, "psk": "a" * 32}, {"id": T2, "psk": "b" * 32}]
    v = tunnels(sdk).psk_set(account_id=A, psks=body, validate_only=True)
    assert v.unapplied_psks == {T1: "validation says no"} and T2 in v.successfully_applied_psks
    a = tunnels(sdk).psk_set(account_id=A, psks=body)
    assert a.unapplied_psks == {T1: "validation says no", T2: "apply says no"}
    assert sim.psk_of(A, T1) != "a" * 32 and sim.psk_of(A, T2) != "b" * 32


def test_fault_apply_takes_effect_but_response_lost(env):
    sim, sdk, _, _ = env
    sim.drop_next("cf.psk_apply")
    with pytest.raises(cloudflare.APIConnectionError):
        tunnels(sdk.with_options(max_retries=0)).psk_set(account_id=A, psks=[{"id": T1, "psk": "L" * 32}])
    assert sim.psk_of(A, T1) == "L" * 32


def test_fault_apply_response_arrives_late(env):
    sim, sdk, _, _ = env
    sim.late_next("cf.psk_apply", delay=1.0)
    with pytest.raises(cloudflare.APITimeoutError):
        tunnels(sdk.with_options(max_retries=0, timeout=0.3)).psk_set(account_id=A, psks=[{"id": T1, "psk": "Z" * 32}])
    assert sim.psk_of(A, T1) == "Z" * 32


def test_fault_5xx_json_on_apply_changes_nothing(env):
    sim, sdk, _, _ = env
    old = sim.psk_of(A, T1)
    sim.fail_next("cf.psk_apply", status=500)
    with pytest.raises(cloudflare.InternalServerError):
        tunnels(sdk.with_options(max_retries=0)).psk_set(account_id=A, psks=[{"id": T1, "psk": "Q" * 32}])
    assert sim.psk_of(A, T1) == old


def test_fault_control_over_http(env):
    sim, sdk, _, base = env
    control = base.replace("/client/v4", "") + "/_sim/control"
    assert httpx.post(control, json={"op": "refuse_tunnels", "tunnel_ids": [T1], "stage": "validate"}).status_code == 200
    assert httpx.post(control, json={"op": "set_latency", "seconds": 0.01}).status_code == 200
    v = tunnels(sdk).psk_set(account_id=A, psks=[{"id": T1, "psk": "a" * 32}], validate_only=True)
    assert T1 in v.unapplied_psks
    state = httpx.get(base.replace("/client/v4", "") + "/_sim/state").json()["result"]
    assert state["request_counts"]["cf.psk_validate"] == 1 and T1 in state["accounts"][A]


def test_history_records_every_applied_psk(env):
    sim, sdk, _, _ = env
    tunnels(sdk).psk_set(account_id=A, psks=[{"id": T1, "psk": "h" * 32}, {"id": T2, "psk": "i" * 32}])
    tunnels(sdk).psk_generate(T1, account_id=A)
    hist = sim.applied_history()
    assert [(h.tunnel, h.via) for h in hist] == [(T1, "psk_set"), (T2, "psk_set"), (T1, "psk_generate")]


def test_malformed_psk_set_body(env):
    _, _, raw, _ = env
    r = raw.post(f"/accounts/{A}/magic/ipsec_tunnels/psk", json={"nope": 1})
    assert r.status_code == 400 and r.json()["success"] is False
