"""Cloudflare Magic IPsec client over an injected ``httpx.Client``.

Two calls matter: list the tunnels of an account, and set PSKs in bulk (``validate_only`` or for
real). Retries only on transport errors, 429 (honouring ``Retry-After``, also past 60 s, up to a
ceiling) and 5xx, through stamina. Every failure leaves as a ``CloudflareError`` with status,
Cloudflare error code, a hint and ``ambiguous`` (the call may have taken effect).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import stamina

from rotator.errors import CloudflareError
from rotator.model import PskSetResult, TunnelInfo
from rotator.secret import Secret

DEFAULT_BASE_URL = "https://api.cloudflare.com/client/v4"
_RATELIMIT_RE = re.compile(r";r=(\d+)")

HINTS: dict[int, str] = {
    9106: "set CLOUDFLARE_API_TOKEN (or CLOUDFLARE_EMAIL and CLOUDFLARE_API_KEY)",
    6003: "the credential is malformed: check CLOUDFLARE_API_TOKEN for quotes or whitespace",
    10000: "check CLOUDFLARE_API_TOKEN: it must be valid and have Magic WAN Write (or Magic Transit Write) "
           "on this account",
    9109: "check CLOUDFLARE_API_TOKEN: it is invalid, expired or revoked",
    9103: "check CLOUDFLARE_EMAIL and CLOUDFLARE_API_KEY",
    7003: "the account id must be the 32-hex-character Cloudflare account id",
    7000: "check CLOUDFLARE_BASE_URL",
    971: "the API rate limit (1,200 requests per 5 minutes per user) is spent: wait, or raise "
         "cloudflare.rate_limit_ceiling",
    1032: "the tunnel does not exist in this account",
}


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 5
    timeout: float = 60.0
    wait_initial: float = 0.5
    wait_max: float = 8.0
    wait_jitter: float = 0.5
    rate_limit_ceiling: float = 330.0  # longest Retry-After we wait out; a full 5-minute block fits


Observer = Callable[[str, str], None]  # (endpoint, status or error kind)


class _Retryable(Exception):
    """Internal: one attempt failed in a way worth retrying; carries the final error to raise."""

    def __init__(self, error: CloudflareError, wait: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.wait = wait


def _auth_headers(api_token: str | None, email: str | None, api_key: str | None) -> dict[str, str]:
    if api_token:
        return {"Authorization": f"Bearer {api_token}"}
    if email and api_key:
        return {"X-Auth-Email": email, "X-Auth-Key": api_key}
    raise CloudflareError("no Cloudflare credential configured",
                          "set CLOUDFLARE_API_TOKEN (or CLOUDFLARE_EMAIL and CLOUDFLARE_API_KEY)")


class CloudflareClient:
    def __init__(
        self, http: httpx.Client, *, base_url: str = DEFAULT_BASE_URL, api_token: str | None = None,
        email: str | None = None, api_key: str | None = None, retry: RetryPolicy | None = None,
        observe: Observer | None = None, on_ratelimit: Callable[[int], None] | None = None,
    ) -> None:
        self._http = http
        self._base = base_url.rstrip("/")
        self._headers = _auth_headers(api_token, email, api_key)
        self._retry = retry or RetryPolicy()
        self._observe = observe or (lambda endpoint, status: None)
        self._on_ratelimit = on_ratelimit or (lambda remaining: None)

    def __repr__(self) -> str:
        return f"CloudflareClient(base_url={self._base!r}, credential=**redacted**)"

    # -- API ----------------------------------------------------------------------------------
    def list_tunnels(self, account_id: str) -> list[TunnelInfo]:
        result = self._call("list", "GET", f"/accounts/{account_id}/magic/ipsec_tunnels", mutating=False)
        items = result.get("ipsec_tunnels") if isinstance(result, dict) else None
        if items is None:
            items = []
        if not isinstance(items, list):
            raise CloudflareError("Cloudflare answered the tunnel list with an unexpected body",
                                  "check CLOUDFLARE_BASE_URL points at the Cloudflare API v4")
        tunnels = []
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("id"), str):
                raise CloudflareError("Cloudflare listed a tunnel without an id", "check CLOUDFLARE_BASE_URL")
            meta = item.get("psk_metadata") or {}
            tunnels.append(TunnelInfo(item["id"], str(item.get("name") or item["id"]),
                                      meta.get("last_generated_on") if isinstance(meta, dict) else None))
        return tunnels

    def set_psks(self, account_id: str, psks: Mapping[str, Secret], *, validate_only: bool,
                 deadline: float | None = None) -> PskSetResult:
        """POST the bulk PSK set; returns which tunnels were applied and which refused (with reasons).

        ``deadline`` (UNIX time): no attempt starts after it, and no retry waits past it. The engine
        sets it from the account lease, so a retried apply can never land after another rotator
        has taken the account over.
        """
        body = {"psks": [{"id": tid, "psk": psk.reveal()} for tid, psk in psks.items()]}
        endpoint = "psk_validate" if validate_only else "psk_apply"
        result = self._call(endpoint, "POST", f"/accounts/{account_id}/magic/ipsec_tunnels/psk",
                            params={"validate_only": "true" if validate_only else "false"}, json=body,
                            mutating=not validate_only, deadline=deadline)
        if not isinstance(result, dict):
            raise CloudflareError("Cloudflare answered the PSK set with an unexpected body",
                                  "check CLOUDFLARE_BASE_URL", ambiguous=not validate_only)
        applied = result.get("successfully_applied_psks") or {}
        unapplied = result.get("unapplied_psks") or {}
        if not isinstance(applied, dict) or not isinstance(unapplied, dict):
            raise CloudflareError("Cloudflare answered the PSK set with an unexpected body",
                                  "check CLOUDFLARE_BASE_URL", ambiguous=not validate_only)
        sent = set(psks)
        out = PskSetResult(applied={t for t in applied if t in sent},
                           unapplied={t: str(r) for t, r in unapplied.items() if t in sent})
        # Guard against a response echoing a different key than the one we sent.
        for tid, entry in applied.items():
            if tid in sent and isinstance(entry, dict) and "psk" in entry and entry["psk"] != psks[tid].reveal():
                out.applied.discard(tid)
                out.unapplied[tid] = "Cloudflare echoed a different PSK than the one sent"
        return out

    # -- transport ----------------------------------------------------------------------------
    def _call(self, endpoint: str, method: str, path: str, *, mutating: bool, deadline: float | None = None,
              **kwargs: Any) -> Any:
        ambiguous = False
        policy = self._retry

        def hook(exc: Exception) -> bool | float:
            if not isinstance(exc, _Retryable):
                return False
            if deadline is not None and time.time() + (exc.wait or 0.0) > deadline:
                exc.error.hint = "retrying would outlive this rotator's account lease; the next run retries"
                return False
            if exc.wait is not None:
                if exc.wait > policy.rate_limit_ceiling:
                    return False
                return exc.wait
            return True

        try:
            for attempt in stamina.retry_context(
                on=hook, attempts=policy.attempts, timeout=policy.timeout + policy.rate_limit_ceiling,
                wait_initial=policy.wait_initial, wait_max=policy.wait_max, wait_jitter=policy.wait_jitter,
            ):
                with attempt:
                    if deadline is not None and time.time() > deadline:
                        raise CloudflareError(f"{endpoint} not sent: the account lease would expire first",
                                              "the next run retries", ambiguous=ambiguous)
                    try:
                        return self._once(endpoint, method, path, mutating=mutating, **kwargs)
                    except _Retryable as exc:
                        ambiguous = ambiguous or exc.error.ambiguous
                        exc.error.ambiguous = ambiguous
                        raise
                    except CloudflareError as exc:
                        exc.ambiguous = exc.ambiguous or ambiguous
                        raise
        except _Retryable as exc:
            raise exc.error from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _once(self, endpoint: str, method: str, path: str, *, mutating: bool, **kwargs: Any) -> Any:
        try:
            resp = self._http.request(method, self._base + path, headers=self._headers, **kwargs)
        except httpx.TransportError as exc:
            sent = not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
            self._observe(endpoint, "error")
            error = CloudflareError(
                f"no answer from Cloudflare ({type(exc).__name__})",
                "check CLOUDFLARE_BASE_URL and the network path to it",
                retryable=True, ambiguous=mutating and sent,
            )
            raise _Retryable(error) from exc
        self._observe(endpoint, str(resp.status_code))
        remaining = _RATELIMIT_RE.search(resp.headers.get("ratelimit", ""))
        if remaining:
            self._on_ratelimit(int(remaining.group(1)))
        body = _json_or_none(resp)
        if resp.status_code == 429:
            wait = _retry_after(resp)
            error = _status_error(resp, body, retryable=True, ambiguous=False)
            if wait > self._retry.rate_limit_ceiling:
                error.hint = (f"Cloudflare asks to wait {wait:.0f}s, over the ceiling of "
                              f"{self._retry.rate_limit_ceiling:.0f}s; {HINTS[971]}")
            raise _Retryable(error, wait=wait)
        if resp.status_code >= 500:
            raise _Retryable(_status_error(resp, body, retryable=True, ambiguous=mutating))
        if resp.status_code >= 400:
            raise _status_error(resp, body, retryable=False, ambiguous=False)
        if not isinstance(body, dict) or "result" not in body:
            raise CloudflareError(f"Cloudflare answered {resp.status_code} with a body that is not the API envelope",
                                  "check CLOUDFLARE_BASE_URL points at the Cloudflare API v4", status=resp.status_code,
                                  ambiguous=mutating)
        if body.get("success") is False:
            raise _status_error(resp, body, retryable=False, ambiguous=mutating)
        return body["result"]


def _json_or_none(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return None


def _retry_after(resp: httpx.Response) -> float:
    try:
        return max(0.0, float(resp.headers.get("retry-after", "1")))
    except ValueError:
        return 1.0


def _status_error(resp: httpx.Response, body: Any, *, retryable: bool, ambiguous: bool) -> CloudflareError:
    errors = body.get("errors") if isinstance(body, dict) else None
    first = errors[0] if isinstance(errors, list) and errors and isinstance(errors[0], dict) else {}
    code = first.get("code") if isinstance(first.get("code"), int) else None
    message = str(first.get("message") or resp.reason_phrase or "error")[:200]
    if not isinstance(body, dict):
        message = f"non-JSON {resp.headers.get('content-type', 'body')}"
    hint = HINTS.get(code or 0) or ("Cloudflare had a server-side problem: retry later" if resp.status_code >= 500
                                    else "see the Cloudflare error code")
    label = f"{resp.status_code}" + (f" code {code}" if code else "")
    return CloudflareError(f"Cloudflare refused the call ({label}: {message})", hint, status=resp.status_code,
                           code=code, retryable=retryable, ambiguous=ambiguous)
