"""Cloudflare tunnel health over GraphQL Analytics: the ``Health`` port (rotation/ports.py).

One query per call: ``magicTransitTunnelHealthChecksAdaptiveGroups`` of one account, filtered to
the tunnels asked about and to the time since the apply, ``avg { tunnelState }`` by
``tunnelName`` (spec section 11: 0 down, 0.5 degraded, 1 healthy; keyed by name, not id). The
verdict is on what happened *after* ``since``: a tunnel whose checks all passed is healthy, one
that failed every check is down, anything between is degraded; no sample is ``no_data``. Where
several groups come back for one tunnel (e.g. per edge colo), the worst counts.

Same boundary rules as the REST client: a total deadline per request (the caller's
``deadline``, a ``time.monotonic()`` value, as for devices), anything that is not the documented
shape is a ``CloudflareError``, texts from outside are cut to one line.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import httpx

from rotator import wire
from rotator.adapters.cloudflare import (
    DEFAULT_BASE_URL,
    DeadlinePassed,
    auth_headers,
    check_account_id,
    exchange,
)
from rotator.errors import CloudflareError
from rotator.rotation.ports import HealthState
from rotator.secret import redact

DATASET = "magicTransitTunnelHealthChecksAdaptiveGroups"
MAX_WINDOW = 7 * 24 * 3600.0  # GraphQL allows at most one week per query
QUERY = (
    "query TunnelHealth($accountTag: string!, $filter: " + DATASET + "Filter_InputObject!) {\n"
    "  viewer {\n"
    "    accounts(filter: {accountTag: $accountTag}) {\n"
    "      " + DATASET + "(limit: 10000, filter: $filter) {\n"
    "        avg { tunnelState }\n"
    "        dimensions { tunnelName edgeColoName }\n"
    "      }\n"
    "    }\n"
    "  }\n"
    "}\n"
)
HINT = "check CLOUDFLARE_BASE_URL and that CLOUDFLARE_API_TOKEN has Account Analytics Read"


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())[:200]


def state_of(avg: float) -> HealthState:
    if avg >= 1.0:
        return HealthState.HEALTHY
    if avg <= 0.0:
        return HealthState.DOWN
    return HealthState.DEGRADED


_RANK = {HealthState.DOWN: 0, HealthState.DEGRADED: 1, HealthState.HEALTHY: 2, HealthState.NO_DATA: 3}


class CloudflareHealth:
    """The Health port over an injected ``httpx.Client``."""

    def __init__(self, http: httpx.Client, *, base_url: str = DEFAULT_BASE_URL, api_token: str | None = None,
                 email: str | None = None, api_key: str | None = None, attempts: int = 3,
                 clock: Any = time.time) -> None:
        self._http = http
        self._url = base_url.rstrip("/") + "/graphql"
        self._headers = auth_headers(api_token, email, api_key)
        self._credentials = tuple(v for v in (api_token, api_key) if v)
        self._attempts = max(1, attempts)
        self._clock = clock

    def __repr__(self) -> str:
        return f"CloudflareHealth(url={self._url!r}, credential=**redacted**)"

    def tunnel_health(self, account_id: str, tunnel_names: Sequence[str], *, since: float,
                      deadline: float) -> dict[str, HealthState]:
        check_account_id(account_id)
        names = list(dict.fromkeys(tunnel_names))
        if not names:
            return {}
        until = self._clock()
        since = max(since, until - MAX_WINDOW)
        body = {"query": QUERY, "variables": {"accountTag": account_id, "filter": {
            "datetime_geq": _rfc3339(since), "datetime_lt": _rfc3339(until + 1), "tunnelName_in": names}}}
        groups = self._post(body, deadline)
        out = dict.fromkeys(names, HealthState.NO_DATA)
        for group in groups:
            name, avg = _group(group)
            if name in out:
                state = state_of(avg)
                if _RANK[state] < _RANK[out[name]]:
                    out[name] = state
        return out

    def _post(self, body: dict[str, Any], deadline: float) -> list[Any]:
        """POST the query within ``deadline``; transport errors and 5xx are tried again while time is left."""
        last: CloudflareError | None = None
        for _ in range(self._attempts):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                answer = exchange(self._http, "POST", self._url, self._headers, left, json=body)
            except (httpx.RequestError, DeadlinePassed, ValueError) as exc:
                last = CloudflareError(f"no answer from Cloudflare's GraphQL API ({type(exc).__name__})", HINT,
                                       retryable=True)
                continue
            if answer.status >= 500 or answer.status == 429:
                last = CloudflareError(f"Cloudflare's GraphQL API answered {answer.status}", HINT,
                                       status=answer.status, retryable=True)
                continue
            try:
                return _groups(answer.status, answer.body)
            except CloudflareError as exc:
                exc.message = redact(exc.message, self._credentials)
                exc.args = (exc.message,)
                raise
        raise last or CloudflareError("no time left to ask Cloudflare for tunnel health", HINT, retryable=True)


def _garbage(detail: str) -> CloudflareError:
    return CloudflareError(f"Cloudflare's GraphQL API answered with an unexpected body ({detail})", HINT)


def _groups(status: int, raw: bytes) -> list[Any]:
    try:
        body = wire.loads(raw)
    except ValueError:  # wire.NotJson: malformed or nested too deeply
        raise _garbage("not JSON") from None
    if not isinstance(body, dict):
        raise _garbage("not an object")
    errors = body.get("errors")
    if errors:
        first = errors[0] if isinstance(errors, list) and isinstance(errors[0], dict) else {}
        raise CloudflareError(f"Cloudflare's GraphQL API refused the health query "
                              f"({_one_line(first.get('message') or errors)})", HINT, status=status)
    if status >= 400:
        raise CloudflareError(f"Cloudflare's GraphQL API answered {status}", HINT, status=status)
    data = body.get("data")
    viewer = data.get("viewer") if isinstance(data, dict) else None
    accounts = viewer.get("accounts") if isinstance(viewer, dict) else None
    if not isinstance(accounts, list) or len(accounts) > 1 or not all(isinstance(a, dict) for a in accounts):
        raise _garbage("no viewer.accounts list")
    if not accounts:
        return []
    groups = accounts[0].get(DATASET)
    if not isinstance(groups, list):
        raise _garbage(f"{DATASET} is not a list")
    return groups


def _group(group: Any) -> tuple[str, float]:
    avg = group.get("avg") if isinstance(group, dict) else None
    dims = group.get("dimensions") if isinstance(group, dict) else None
    state = avg.get("tunnelState") if isinstance(avg, dict) else None
    name = dims.get("tunnelName") if isinstance(dims, dict) else None
    if not isinstance(name, str) or not isinstance(state, int | float) or isinstance(state, bool) \
            or not 0 <= state <= 1:
        raise _garbage("a group without tunnelName and a tunnelState between 0 and 1")
    return name, float(state)
