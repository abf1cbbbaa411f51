"""The Cloudflare client against the simulator: retries, Retry-After and its ceiling, bad answers, auth."""

from __future__ import annotations

import time

import httpx
import pytest

from rotator.adapters.cloudflare import CloudflareClient, RetryPolicy
from rotator.errors import CloudflareError, ConfigError
from rotator.secret import Secret
from tests.fakes import VirtualClock

A = "023e105f4ecef8ad9ca31a8372d0c353"


@pytest.fixture
def env(cf_sim):
    sim, base = cf_sim
    sim.add_account(A)
    tunnels = [sim.add_tunnel(A) for _ in range(3)]
    token = sim.add_token()
    http = httpx.Client(timeout=5)
    seen: list[tuple[str, str]] = []
    budget: list[int] = []

    def client(clock: VirtualClock | None = None, **retry):
        """``clock``: every wait of the client (backoff, Retry-After, rate window) runs on it."""
        timing = {"clock": clock, "monotonic": clock, "sleep": clock.sleep} if clock else {}
        return CloudflareClient(http, base_url=base, api_token=token, retry=RetryPolicy(**retry),
                                observe=lambda e, s: seen.append((e, s)), on_ratelimit=budget.append, **timing)

    yield sim, client, tunnels, seen, budget
    http.close()


def test_retry_after_is_honoured(env):
    sim, client, _, seen, _ = env
    sim.fail_next("cf.list", count=1, status=429, retry_after=2)
    clock = VirtualClock()
    assert len(client(clock).list_tunnels(A)) == 3
    assert clock.slept == [2.0]
    assert seen == [("list", "429"), ("list", "200")]


def test_backoff_waits_grow_exponentially_on_the_clients_sleep(env):
    sim, client, _, seen, _ = env
    sim.fail_next("cf.list", count=2, status=503)
    clock = VirtualClock()
    assert len(client(clock, wait_initial=3, wait_jitter=0).list_tunnels(A)) == 3
    assert clock.slept == [3.0, 6.0]
    assert seen == [("list", "503"), ("list", "503"), ("list", "200")]


def test_retry_after_past_the_ceiling_fails_fast_with_a_hint(env):
    sim, client, _, seen, _ = env
    sim.fail_next("cf.list", count=1, status=429, retry_after=400)
    clock = VirtualClock()
    with pytest.raises(CloudflareError) as exc:
        client(clock, rate_limit_ceiling=10).list_tunnels(A)
    assert clock.slept == [] and seen == [("list", "429")]
    assert exc.value.status == 429 and exc.value.code == 971
    assert "over the ceiling" in str(exc.value) and "rate_limit_ceiling" in str(exc.value)


def test_rate_budget_is_reported(env):
    _, client, _, _, budget = env
    client().list_tunnels(A)
    assert budget == [1199]


def test_4xx_is_not_retried(env):
    sim, client, _, seen, _ = env
    sim.fail_next("cf.psk_apply", count=1, status=400)
    with pytest.raises(CloudflareError) as exc:
        client().set_psks(A, {"e" * 32: Secret("k" * 32)}, validate_only=False)
    assert exc.value.status == 400 and not exc.value.retryable and not exc.value.ambiguous
    assert seen == [("psk_apply", "400")]


def test_5xx_then_4xx_on_apply_stays_ambiguous(env):
    """An earlier attempt may have applied: a later clean refusal must not make it look unapplied."""
    sim, client, tunnels, _, _ = env
    sim.fail_next("cf.psk_apply", count=1, status=502, html=True)
    sim.fail_next("cf.psk_apply", count=1, status=400)
    with pytest.raises(CloudflareError) as exc:
        client(wait_initial=0.01, wait_jitter=0).set_psks(A, {tunnels[0]: Secret("k" * 32)}, validate_only=False)
    assert exc.value.status == 400 and exc.value.ambiguous


def test_validate_only_failures_are_never_ambiguous(env):
    sim, client, tunnels, _, _ = env
    sim.fail_next("cf.psk_validate", count=2, status=503)
    with pytest.raises(CloudflareError) as exc:
        client(attempts=2, wait_initial=0.01, wait_jitter=0).set_psks(A, {tunnels[0]: Secret("k" * 32)},
                                                                       validate_only=True)
    assert exc.value.status == 503 and not exc.value.ambiguous


def test_unreachable_base_url(env):
    with httpx.Client(timeout=1) as http:
        c = CloudflareClient(http, base_url="http://127.0.0.1:9/client/v4", api_token="t" * 40,
                             retry=RetryPolicy(attempts=2, wait_initial=0.01, wait_jitter=0))
        with pytest.raises(CloudflareError) as exc:
            c.list_tunnels(A)
    assert "no answer from Cloudflare" in str(exc.value) and not exc.value.ambiguous


def test_repr_hides_the_credential(env):
    _, client, _, _, _ = env
    c = client()
    assert "Bearer" not in repr(c) and "redacted" in repr(c)


def test_legacy_credentials(cf_sim):
    sim, base = cf_sim
    sim.add_account(A)
    sim.add_tunnel(A)
    key = "9f3c27d1e84b6a05c2d7e19b3a48f6c0"
    sim.add_legacy_key("ops@example.com", key)
    with httpx.Client() as http:
        assert len(CloudflareClient(http, base_url=base, email="ops@example.com", api_key=key).list_tunnels(A)) == 1
    with pytest.raises(CloudflareError):
        CloudflareClient(httpx.Client(), base_url=base)


def test_no_attempt_starts_after_the_deadline(env):
    sim, client, tunnels, seen, _ = env
    with pytest.raises(CloudflareError) as exc:
        client().set_psks(A, {tunnels[0]: Secret("k" * 32)}, validate_only=False, deadline=time.time() - 1)
    assert "lease would expire" in str(exc.value) and seen == []
    assert sim.psk_of(A, tunnels[0]) != "k" * 32


# -- contradictory answers (issue 9.1) ---------------------------------------------------------

@pytest.mark.parametrize("kind", ["echo_other_key", "both_maps"])
def test_contradictory_apply_is_ambiguous_never_unapplied(env, kind):
    sim, client, tunnels, _, _ = env
    sim.contradict([tunnels[0]], kind=kind, stage="apply")
    key = Secret("k" * 32)
    result = client().set_psks(A, {tunnels[0]: key, tunnels[1]: Secret("m" * 32)}, validate_only=False)
    assert tunnels[0] in result.ambiguous and tunnels[0] not in result.unapplied
    assert tunnels[0] not in result.applied and result.applied == {tunnels[1]}
    # The contradiction hides a key that really is in force: it must stay pending, never be unstaged.
    assert sim.psk_of(A, tunnels[0]) == key.reveal()


def test_validate_echoing_another_key_is_not_accepted(env):
    sim, client, tunnels, _, _ = env
    before = sim.psk_of(A, tunnels[0])
    sim.contradict([tunnels[0]], kind="echo_other_key", stage="validate")
    result = client().set_psks(A, {tunnels[0]: Secret("k" * 32)}, validate_only=True)
    assert tunnels[0] in result.ambiguous and not result.applied and not result.unapplied
    assert sim.psk_of(A, tunnels[0]) == before


def test_contradictions_through_the_control_api(env, cf_sim):
    sim, client, tunnels, _, _ = env
    base = cf_sim[1].removesuffix(sim.base_path)
    with httpx.Client(base_url=base) as raw:
        assert raw.post("/_sim/control", json={"op": "contradict", "tunnel_ids": [tunnels[2]],
                                               "kind": "both_maps"}).status_code == 200
        assert raw.post("/_sim/control", json={"op": "contradict", "tunnel_ids": [tunnels[2]],
                                               "kind": "nonsense"}).status_code == 400
    result = client().set_psks(A, {tunnels[2]: Secret("k" * 32)}, validate_only=False)
    assert set(result.ambiguous) == {tunnels[2]}
    sim.clear_contradictions()
    assert client().set_psks(A, {tunnels[2]: Secret("n" * 32)}, validate_only=False).applied == {tunnels[2]}


def test_apply_result_carries_generated_on_and_ipsec_ids(env):
    sim, client, tunnels, _, _ = env
    result = client().set_psks(A, {tunnels[0]: Secret("k" * 32)}, validate_only=False)
    listed = {t.id: t for t in client().list_tunnels(A)}
    assert result.generated_on[tunnels[0]] == listed[tunnels[0]].last_generated_on
    assert result.ipsec_ids[tunnels[0]] == sim.accounts[A][tunnels[0]].ipsec_id


def test_refusal_reasons_are_redacted_against_the_batch(env):
    sim, client, tunnels, _, _ = env
    key = "q" * 32
    sim.refuse_tunnels([tunnels[0]], reason=f"psk {key} is too weak", stage="validate")
    result = client().set_psks(A, {tunnels[0]: Secret(key)}, validate_only=True)
    assert key not in result.unapplied[tunnels[0]] and "**redacted**" in result.unapplied[tunnels[0]]


# -- identifiers (issue 9.2) --------------------------------------------------------------------

ODD_IDS = ["../" + "b" * 32 + "/" + "c" * 32, "../_leases/" + A, "sub/dir", "..", "ABCDEF" + "0" * 26]


def test_odd_tunnel_ids_are_listed_with_a_problem(env):
    sim, client, tunnels, _, _ = env
    for odd in ODD_IDS:
        sim.add_tunnel(A, tunnel_id=odd)
    listed = {t.id: t for t in client().list_tunnels(A)}
    for odd in ODD_IDS:
        assert listed[odd].problem and "32 lowercase hex" in listed[odd].problem
    assert all(listed[t].problem is None for t in tunnels)


def test_odd_ids_are_never_sent(env):
    sim, client, tunnels, seen, _ = env
    with pytest.raises(CloudflareError) as exc:
        client().set_psks(A, {tunnels[0]: Secret("k" * 32), "sub/dir": Secret("l" * 32)}, validate_only=False)
    assert "not 32 lowercase hex" in str(exc.value) and seen == []
    with pytest.raises(ConfigError):
        client().list_tunnels("../" + A)
    assert seen == [] and sim.request_counts() == {}


def test_listing_carries_endpoints(env):
    sim, client, tunnels, _, _ = env
    sim.set_endpoints(A, tunnels[0], customer_endpoint="10.99.0.2", cloudflare_endpoint="10.99.0.1")
    listed = {t.id: t for t in client().list_tunnels(A)}
    assert (listed[tunnels[0]].customer_endpoint, listed[tunnels[0]].cloudflare_endpoint) == \
        ("10.99.0.2", "10.99.0.1")
    assert listed[tunnels[1]].customer_endpoint and listed[tunnels[1]].cloudflare_endpoint


# -- total deadline (issue 9.4) -----------------------------------------------------------------

@pytest.mark.parametrize("route,mutating", [("cf.list", False), ("cf.psk_apply", True)])
def test_a_trickling_answer_ends_at_the_total_deadline(env, cf_sim, route, mutating):
    sim, _, tunnels, _, _ = env
    token = sim.add_token()
    sim.trickle_next(route, interval=0.05)  # a byte every 50 ms: each read makes progress
    timeout = 1.0
    with httpx.Client(timeout=timeout) as http:
        c = CloudflareClient(http, base_url=cf_sim[1], api_token=token, retry=RetryPolicy(attempts=1))
        start = time.monotonic()
        with pytest.raises(CloudflareError) as exc:
            if mutating:
                c.set_psks(A, {tunnels[0]: Secret("k" * 32)}, validate_only=False)
            else:
                c.list_tunnels(A)
        elapsed = time.monotonic() - start
    assert elapsed < timeout + 0.5, f"a {timeout}s call took {elapsed:.2f}s"
    assert "no whole answer within 1s" in str(exc.value) and exc.value.ambiguous is mutating


def test_retries_never_run_past_the_engines_deadline(env):
    sim, client, tunnels, seen, _ = env
    sim.late_next("cf.psk_apply", delay=2, count=10)  # longer than a call: every attempt times out
    c = client(attempts=10, wait_initial=0.05, wait_jitter=0)
    c.call_timeout = 0.5
    deadline = time.time() + 1.2
    with pytest.raises(CloudflareError) as exc:
        c.set_psks(A, {tunnels[0]: Secret("k" * 32)}, validate_only=False, deadline=deadline)
    # An attempt may start just before the deadline and then runs for at most one call timeout.
    assert time.time() < deadline + c.call_timeout + 0.5
    assert exc.value.ambiguous and 2 <= len(seen) <= 4


# -- garbage (issue 9.5) ------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["html", "not_json", "deep", "types"])
def test_garbage_lists_are_one_line_errors(env, variant):
    sim, client, _, _, _ = env
    sim.garbage_next("cf.list", variant=variant)
    with pytest.raises(CloudflareError) as exc:
        client().list_tunnels(A)
    assert "\n" not in str(exc.value) and "CLOUDFLARE_BASE_URL" in str(exc.value)


@pytest.mark.parametrize("variant", ["html", "not_json", "deep", "types"])
def test_garbage_after_an_apply_is_ambiguous(env, variant):
    sim, client, tunnels, _, _ = env
    sim.garbage_next("cf.psk_apply", variant=variant)
    with pytest.raises(CloudflareError) as exc:
        client().set_psks(A, {tunnels[0]: Secret("k" * 32)}, validate_only=False)
    assert exc.value.ambiguous and "\n" not in str(exc.value)


def test_garbage_after_validate_is_not_ambiguous(env):
    sim, client, tunnels, _, _ = env
    sim.garbage_next("cf.psk_validate", variant="types")
    with pytest.raises(CloudflareError) as exc:
        client().set_psks(A, {tunnels[0]: Secret("k" * 32)}, validate_only=True)
    assert not exc.value.ambiguous


# -- rate budget (issue 13.8) -------------------------------------------------------------------

def test_reserve_is_kept_free_and_budget_exposed(env):
    sim, client, tunnels, seen, _ = env
    sim.set_rate_limit(10, 300)
    c = client(rate_limit_ceiling=5)
    assert c.rate_budget is None
    sent = 0
    with pytest.raises(CloudflareError) as exc:
        for _ in range(20):  # bounded: the budget ends it long before
            c.list_tunnels(A)
            sent += 1
    # 20 % of 10 stays free: 8 calls, never a 429, and the 9th is not sent at all.
    assert sent == 8 and "kept in reserve" in str(exc.value) and exc.value.retryable
    assert not [s for _, s in seen if s == "429"] and sim.request_counts()["cf.list"] == 8
    budget = c.rate_budget
    assert budget is not None and (budget.limit, budget.remaining, budget.reserve, budget.usable) == (10, 2, 2, 0)


def test_a_validate_apply_pair_never_starts_into_a_429(env):
    sim, client, tunnels, seen, _ = env
    sim.set_rate_limit(4, 300)
    c = client(rate_limit_ceiling=5)
    c.rate_reserve = 0.0
    c.list_tunnels(A)                                                        # 3 left
    c.set_psks(A, {tunnels[0]: Secret("k" * 32)}, validate_only=True)        # needs 2: 2 left
    c.set_psks(A, {tunnels[0]: Secret("k" * 32)}, validate_only=False)       # 1 left
    with pytest.raises(CloudflareError) as exc:
        c.set_psks(A, {tunnels[1]: Secret("l" * 32)}, validate_only=True)    # the pair would hit a 429
    assert "psk_validate not sent" in str(exc.value) and not exc.value.ambiguous
    assert sim.request_counts().get("cf.psk_validate") == 1
    assert not [s for _, s in seen if s == "429"]


def test_pacing_waits_for_the_next_window_instead_of_a_429(env):
    sim, client, _, seen, _ = env
    sim.set_rate_limit(2, 2)
    c = client(rate_limit_ceiling=5)
    c.rate_reserve = 0.0
    for _ in range(4):
        c.list_tunnels(A)
    assert [s for _, s in seen] == ["200"] * 4


def test_pacing_never_waits_past_the_deadline(env):
    sim, client, tunnels, _, _ = env
    sim.set_rate_limit(2, 30)
    clock = VirtualClock()
    c = client(clock, rate_limit_ceiling=60)
    c.rate_reserve = 0.0
    c.list_tunnels(A)
    with pytest.raises(CloudflareError) as exc:
        c.set_psks(A, {tunnels[0]: Secret("k" * 32)}, validate_only=True, deadline=clock() + 5)
    assert clock.slept == [] and "not sent" in str(exc.value)


# -- simulator features through the real client ----------------------------------------------

def test_out_of_band_change_moves_last_generated_on(env):
    sim, client, tunnels, _, _ = env
    before = {t.id: t.last_generated_on for t in client().list_tunnels(A)}
    key = sim.change_psk_out_of_band(A, tunnels[0])
    after = {t.id: t.last_generated_on for t in client().list_tunnels(A)}
    assert sim.psk_of(A, tunnels[0]) == key and after[tunnels[0]] > before[tunnels[0]]
    assert after[tunnels[1]] == before[tunnels[1]]


def test_edge_hook_sees_real_applies_only(env):
    sim, client, tunnels, _, _ = env
    calls: list[tuple[str, str, str]] = []
    sim.set_edge_hook(lambda acc, tid, psk: calls.append((acc, tid, psk)))
    client().set_psks(A, {tunnels[0]: Secret("k" * 32)}, validate_only=True)
    assert calls == []
    client().set_psks(A, {tunnels[0]: Secret("k" * 32)}, validate_only=False)
    assert calls == [(A, tunnels[0], "k" * 32)]
    sim.set_edge_hook(None)
    client().set_psks(A, {tunnels[0]: Secret("z" * 32)}, validate_only=False)
    assert len(calls) == 1 and sim.psk_of(A, tunnels[0]) == "z" * 32


def test_rate_reserve_from_config(sims, tmp_path):
    from rotator import config
    from rotator.wiring import build_runtime
    from tests.helpers import write_config

    settings = config.load(write_config(tmp_path, "[cloudflare]\nrate_reserve = 0.35\n"), env=sims.env())
    rt = build_runtime(settings)
    try:
        assert rt.cloudflare.rate_reserve == 0.35
        assert config.load(None, env=sims.env()).cloudflare.rate_reserve == 0.2
    finally:
        rt.close()
    for bad in ("1.5", "-0.1", '"20%"'):
        with pytest.raises(ConfigError) as exc:
            config.load(write_config(tmp_path, f"[cloudflare]\nrate_reserve = {bad}\n"), env=sims.env())
        assert "cloudflare.rate_reserve" in str(exc.value) and "\n" not in str(exc.value)


def test_backoff_never_waits_past_the_deadline(env):
    sim, client, tunnels, seen, _ = env
    sim.fail_next("cf.psk_apply", count=5, status=503)
    clock = VirtualClock()
    with pytest.raises(CloudflareError) as exc:
        client(clock, attempts=5, wait_initial=3, wait_jitter=0).set_psks(
            A, {tunnels[0]: Secret("k" * 32)}, validate_only=False, deadline=clock() + 1.5)
    # The first backoff (3 s) would end past the deadline: no wait, no second attempt.
    assert clock.slept == [] and len(seen) == 1
    assert "outlive" in str(exc.value) and exc.value.ambiguous
