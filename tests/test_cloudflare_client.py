"""The Cloudflare client against the simulator: retries, Retry-After and its ceiling, bad answers, auth."""

from __future__ import annotations

import time

import httpx
import pytest

from rotator.adapters.cloudflare import CloudflareClient, RetryPolicy
from rotator.errors import CloudflareError
from rotator.secret import Secret

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

    def client(**retry):
        return CloudflareClient(http, base_url=base, api_token=token, retry=RetryPolicy(**retry),
                                observe=lambda e, s: seen.append((e, s)), on_ratelimit=budget.append)

    yield sim, client, tunnels, seen, budget
    http.close()


def test_retry_after_is_honoured(env):
    sim, client, _, seen, _ = env
    sim.fail_next("cf.list", count=1, status=429, retry_after=2)
    start = time.monotonic()
    assert len(client().list_tunnels(A)) == 3
    assert time.monotonic() - start >= 2.0
    assert seen == [("list", "429"), ("list", "200")]


def test_retry_after_past_the_ceiling_fails_fast_with_a_hint(env):
    sim, client, _, seen, _ = env
    sim.set_rate_limit(1, 300)
    c = client(rate_limit_ceiling=10)
    c.list_tunnels(A)
    start = time.monotonic()
    with pytest.raises(CloudflareError) as exc:
        c.list_tunnels(A)
    assert time.monotonic() - start < 2
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
        client().set_psks(A, {"x" * 32: Secret("k" * 32)}, validate_only=False)
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


def test_garbage_answer_is_a_one_line_error(env):
    sim, client, _, _, _ = env
    original = sim.handle

    def garbage(req, route):
        from rotator.sim.base import Response

        return Response(200, b"<html>captive portal</html>", [(b"content-type", b"text/html")])

    sim.handle = garbage
    with pytest.raises(CloudflareError) as exc:
        client().list_tunnels(A)
    sim.handle = original
    assert "not the API envelope" in str(exc.value) and "CLOUDFLARE_BASE_URL" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_unreachable_base_url(env):
    with httpx.Client(timeout=1) as http:
        c = CloudflareClient(http, base_url="http://127.0.0.1:9/client/v4", api_token="t" * 40,
                             retry=RetryPolicy(attempts=2, wait_initial=0.01, wait_jitter=0))
        with pytest.raises(CloudflareError) as exc:
            c.list_tunnels(A)
    assert "no answer from Cloudflare" in str(exc.value) and not exc.value.ambiguous


def test_echoed_key_mismatch_is_not_counted_as_applied(env):
    sim, client, tunnels, _, _ = env
    original = sim._psk_set

    def lying(account_id, tunnels_map, req, validate):
        result = original(account_id, tunnels_map, req, validate)
        for entry in result["successfully_applied_psks"].values():
            entry["psk"] = "something-else"
        return result

    sim._psk_set = lying
    result = client().set_psks(A, {tunnels[0]: Secret("k" * 32)}, validate_only=True)
    assert tunnels[0] in result.unapplied and not result.applied


def test_repr_hides_the_credential(env):
    _, client, _, _, _ = env
    c = client()
    assert "Bearer" not in repr(c) and "redacted" in repr(c)


def test_legacy_credentials(cf_sim):
    sim, base = cf_sim
    sim.add_account(A)
    sim.add_tunnel(A)
    key = "0123456789abcdef0123456789abcdef"
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
