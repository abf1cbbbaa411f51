"""Cloudflare Magic IPsec client over an injected ``httpx.Client``.

Two calls matter: list the tunnels of an account, and set PSKs in bulk (``validate_only`` or for
real). Retries only on transport errors, 429 (honouring ``Retry-After``, also past 60 s, up to a
ceiling) and 5xx, through stamina. Every failure leaves as a ``CloudflareError`` with status,
Cloudflare error code, a hint and ``ambiguous`` (the call may have taken effect).

The boundary is hostile by assumption: ids that are not 32 lowercase hex never leave as usable
ids, an answer that is not what the spec says is an error, a contradictory answer about a tunnel
makes that tunnel's outcome unknown (``PskSetResult.ambiguous``), reason texts are redacted
against the keys of the batch, every request has a total deadline (connect, send, headers and a
slow-trickling body together), and calls are paced so that a share of the token's rate budget
(``rate_reserve``) stays free for the other tools that use the same token.
"""

from __future__ import annotations

import math
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import stamina

from rotator import wire
from rotator.errors import CloudflareError, ConfigError
from rotator.model import PskSetResult, TunnelInfo
from rotator.secret import Secret, redact

DEFAULT_BASE_URL = "https://api.cloudflare.com/client/v4"
HEX32 = re.compile(r"[0-9a-f]{32}")
MAX_BODY = 16 * 1024 * 1024  # an answer larger than this is not the API's
_RL_FIELD = re.compile(r"(?:^|;)\s*([a-z])=(\d+)")

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


def valid_id(value: object) -> bool:
    """A Cloudflare account or tunnel id as the spec gives it: 32 lowercase hex digits."""
    return isinstance(value, str) and HEX32.fullmatch(value) is not None


def check_account_id(account_id: str) -> None:
    if not valid_id(account_id):
        raise ConfigError(f"account id {account_id[:40]!r} is not 32 lowercase hex digits",
                          "use the Cloudflare account id from the dashboard URL")



@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 5
    timeout: float = 60.0
    wait_initial: float = 0.5
    wait_max: float = 8.0
    wait_jitter: float = 0.5
    rate_limit_ceiling: float = 330.0  # longest Retry-After we wait out; a full 5-minute block fits


@dataclass(frozen=True, slots=True)
class RateBudget:
    """The token's rate budget as Cloudflare last reported it (``Ratelimit`` / ``Ratelimit-Policy``).

    ``remaining`` counts down locally between answers; ``reserve`` is the share this client
    leaves to other tools; ``usable`` is what it may still spend in this window.
    """

    limit: int | None
    remaining: int
    window: float | None
    resets_in: float
    reserve: int

    @property
    def usable(self) -> int:
        return max(0, self.remaining - self.reserve)


Observer = Callable[[str, str], None]  # (endpoint, status or error kind)


class _Retryable(Exception):
    """Internal: one attempt failed in a way worth retrying; carries the final error to raise."""

    def __init__(self, error: CloudflareError, wait: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.wait = wait  # what Cloudflare asked for (Retry-After), if anything
        self.wait_for = 0.0  # the wait before the next attempt, once the retry is decided


class DeadlinePassed(Exception):
    """The request's total deadline passed before a whole answer arrived."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: httpx.Headers
    body: bytes
    reason: str


class _Exchange:
    """One request run on its own thread, so the caller can stop waiting at a total deadline
    whatever the socket does (a slow connect, a trickling body: each read makes progress, so no
    per-read timeout ever fires)."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.cancelled = False
        self.answer: Answer | None = None
        self.error: BaseException | None = None


def exchange(http: httpx.Client, method: str, url: str, headers: Mapping[str, str], total: float,
             **kwargs: Any) -> Answer:
    """Send one request and read its whole answer within ``total`` seconds, or raise
    ``DeadlinePassed`` (or httpx's error). The request runs on its own thread, so the caller
    stops waiting at the deadline whatever the socket does; that thread then closes the
    connection at its next chunk (or its own per-read timeout, ``total``)."""
    ex = _Exchange()

    def work() -> None:
        try:
            timeout = httpx.Timeout(total, connect=min(total, http.timeout.connect or total))
            with http.stream(method, url, headers=headers, timeout=timeout, **kwargs) as resp:
                chunks: list[bytes] = []
                size = 0
                for chunk in resp.iter_bytes():
                    if ex.cancelled:
                        return  # the caller gave up: close the connection now
                    size += len(chunk)
                    if size > MAX_BODY:
                        raise ValueError("answer larger than 16 MiB")
                    chunks.append(chunk)
                ex.answer = Answer(resp.status_code, resp.headers, b"".join(chunks), resp.reason_phrase)
        except BaseException as exc:  # handed to the caller's thread
            ex.error = exc
        finally:
            ex.done.set()

    threading.Thread(target=work, name="cloudflare-call", daemon=True).start()
    if not ex.done.wait(max(0.0, total)):
        ex.cancelled = True
        raise DeadlinePassed
    if ex.error is not None:
        raise ex.error
    assert ex.answer is not None
    return ex.answer


def auth_headers(api_token: str | None, email: str | None, api_key: str | None) -> dict[str, str]:
    if api_token:
        return {"Authorization": f"Bearer {api_token}"}
    if email and api_key:
        return {"X-Auth-Email": email, "X-Auth-Key": api_key}
    raise CloudflareError("no Cloudflare credential configured",
                          "set CLOUDFLARE_API_TOKEN (or CLOUDFLARE_EMAIL and CLOUDFLARE_API_KEY)")


class CloudflareClient:
    """``call_timeout``: total deadline of one request (default: the http client's read timeout).
    ``rate_reserve``: the share of the rate budget never spent (0.2 = 20 %).
    ``clock`` (UNIX time, for deadlines), ``monotonic`` (for the rate window) and ``sleep`` (every wait:
    backoff, Retry-After, a fresh rate window) are injectable, so tests run the waits on a virtual clock."""

    def __init__(
        self, http: httpx.Client, *, base_url: str = DEFAULT_BASE_URL, api_token: str | None = None,
        email: str | None = None, api_key: str | None = None, retry: RetryPolicy | None = None,
        observe: Observer | None = None, on_ratelimit: Callable[[int], None] | None = None,
        call_timeout: float | None = None, rate_reserve: float = 0.2,
        clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not 0 <= rate_reserve < 1:
            raise ConfigError("cloudflare.rate_reserve must be at least 0 and below 1", "e.g. 0.2 for 20 %")
        self._http = http
        self._base = base_url.rstrip("/")
        self._headers = auth_headers(api_token, email, api_key)
        self._credentials = tuple(v for v in (api_token, api_key) if v)  # redacted from texts, like keys
        self._retry = retry or RetryPolicy()
        self._observe = observe or (lambda endpoint, status: None)
        self._on_ratelimit = on_ratelimit or (lambda remaining: None)
        self.call_timeout = float(call_timeout or http.timeout.read or 60.0)
        self.rate_reserve = rate_reserve
        self._rl_lock = threading.Lock()
        self._rl_limit: int | None = None
        self._rl_window: float | None = None
        self._rl_remaining: int | None = None
        self._rl_reset_at = 0.0  # monotonic() when the window resets
        self._clock, self._monotonic, self._sleep = clock, monotonic, sleep

    def __repr__(self) -> str:
        return f"CloudflareClient(base_url={self._base!r}, credential=**redacted**)"

    # -- API ----------------------------------------------------------------------------------
    def list_tunnels(self, account_id: str) -> list[TunnelInfo]:
        """The account's tunnels. One whose id is not 32 lowercase hex comes back with ``problem``
        set: it is reported, never rotated, and its id never becomes part of a Vault path."""
        check_account_id(account_id)
        result = self._call("list", "GET", f"/accounts/{account_id}/magic/ipsec_tunnels", mutating=False)
        if not isinstance(result, dict):
            raise _garbage("the tunnel list", "result is not an object")
        items = result.get("ipsec_tunnels")
        if items is None:
            items = []
        if not isinstance(items, list):
            raise _garbage("the tunnel list", "ipsec_tunnels is not a list")
        return [_tunnel_info(item) for item in items]

    def set_psks(self, account_id: str, psks: Mapping[str, Secret], *, validate_only: bool,
                 deadline: float | None = None) -> PskSetResult:
        """POST the bulk PSK set; returns which tunnels were applied, refused (with reasons), or
        answered for in a contradictory way (``ambiguous``: the key may be in force; keep it pending).

        ``deadline`` (UNIX time): no attempt starts after it, and no retry waits past it. The engine
        sets it from the account lease, so a retried apply can never land after another rotator
        has taken the account over. Each attempt ends within ``call_timeout``.
        """
        check_account_id(account_id)
        bad = [tid for tid in psks if not valid_id(tid)]
        if bad:
            raise CloudflareError(f"refusing to send PSKs for {len(bad)} tunnel id(s) that are not 32 lowercase hex "
                                  f"(first: {bad[0][:40]!r})", "a listing with such ids is reported, not rotated")
        keys = [p.reveal() for p in psks.values()]
        body = {"psks": [{"id": tid, "psk": psk.reveal()} for tid, psk in psks.items()]}
        endpoint = "psk_validate" if validate_only else "psk_apply"
        result = self._call(endpoint, "POST", f"/accounts/{account_id}/magic/ipsec_tunnels/psk",
                            params={"validate_only": "true" if validate_only else "false"}, json=body,
                            mutating=not validate_only, deadline=deadline, keys=keys,
                            need=2 if validate_only else 1, reserve=validate_only)
        return _psk_set_result(result, psks, keys, ambiguous=not validate_only)

    @property
    def rate_budget(self) -> RateBudget | None:
        """What is left of the token's rate budget, or None before the first answer told us."""
        with self._rl_lock:
            if self._rl_remaining is None:
                return None
            self._roll_window(self._monotonic())
            return RateBudget(self._rl_limit, self._rl_remaining, self._rl_window,
                              max(0.0, self._rl_reset_at - self._monotonic()), self._reserve_count())

    # -- rate budget --------------------------------------------------------------------------
    def _reserve_count(self) -> int:
        return math.ceil((self._rl_limit or 0) * self.rate_reserve)

    def _roll_window(self, now: float) -> None:
        if self._rl_remaining is not None and now >= self._rl_reset_at and self._rl_limit is not None:
            self._rl_remaining = self._rl_limit
            self._rl_reset_at = now + (self._rl_window or 0.0)

    def _spend(self, endpoint: str, need: int, reserve: bool, deadline: float | None, ambiguous: bool) -> None:
        """Take one call from the budget, first waiting for the next window if ``need`` calls would
        eat into the reserve (``reserve=False``: only into a 429). Never waits past the deadline or
        the ceiling; then the call is not sent (retryable, and never ambiguous on its own)."""
        for _ in range(2):  # at most one wait for a fresh window
            with self._rl_lock:
                now = self._monotonic()
                if self._rl_remaining is None:
                    return  # unknown until Cloudflare's first answer
                self._roll_window(now)
                keep = self._reserve_count() if reserve else 0
                if self._rl_remaining - need >= keep:
                    self._rl_remaining -= 1
                    return
                wait = max(0.0, self._rl_reset_at - now)
                remaining, limit = self._rl_remaining, self._rl_limit
            too_late = deadline is not None and self._clock() + wait > deadline
            if wait > self._retry.rate_limit_ceiling or too_late:
                self._observe(endpoint, "budget")
                raise CloudflareError(
                    f"{endpoint} not sent: {remaining} of {limit} calls left in this rate window and "
                    f"{keep} kept in reserve for other tools (cloudflare.rate_reserve)",
                    f"the window resets in {math.ceil(wait)}s; the next run retries", retryable=True,
                    ambiguous=ambiguous)
            self._sleep(wait)
            with self._rl_lock:
                if self._rl_reset_at <= self._monotonic() and self._rl_limit is not None:
                    self._rl_remaining = self._rl_limit  # a new window, until an answer says otherwise
                    self._rl_reset_at = self._monotonic() + (self._rl_window or 0.0)

    def _note_ratelimit(self, headers: httpx.Headers) -> None:
        current = dict(_RL_FIELD.findall(headers.get("ratelimit", "")))
        if "r" not in current:
            return
        policy = dict(_RL_FIELD.findall(headers.get("ratelimit-policy", "")))
        remaining = int(current["r"])
        with self._rl_lock:
            self._rl_remaining = remaining
            if "t" in current:
                self._rl_reset_at = self._monotonic() + int(current["t"])
            if "q" in policy:
                self._rl_limit = int(policy["q"])
            if "w" in policy:
                self._rl_window = float(policy["w"])
        self._on_ratelimit(remaining)

    # -- transport ----------------------------------------------------------------------------
    def _call(self, endpoint: str, method: str, path: str, *, mutating: bool, deadline: float | None = None,
              keys: Iterable[str] = (), need: int = 1, reserve: bool = True, **kwargs: Any) -> Any:
        ambiguous = False
        policy = self._retry
        keys = (*keys, *self._credentials)

        retries = 0
        backoff = 0.0  # the wait before the next attempt, taken through self._sleep when it starts

        def hook(exc: Exception) -> bool | float:
            """How long to wait before the next attempt: Retry-After, else jittered exponential
            backoff; never a wait that ends past the engine's deadline. stamina decides whether to
            retry (attempts, timeout); the wait itself runs on the injected sleep (stamina's own is
            zero), and rides on the exception for stamina's retry hooks (``wait_for``)."""
            nonlocal retries, backoff
            if not isinstance(exc, _Retryable):
                return False
            retries += 1
            if exc.wait is not None and exc.wait > policy.rate_limit_ceiling:
                return False
            wait = exc.wait if exc.wait is not None else \
                min(policy.wait_max, policy.wait_initial * 2 ** (retries - 1)) + random.uniform(0, policy.wait_jitter)
            if deadline is not None and self._clock() + wait > deadline:
                exc.error.hint = "retrying would outlive this rotator's account lease; the next run retries"
                return False
            backoff = exc.wait_for = wait
            return 0.0

        try:
            for attempt in stamina.retry_context(
                on=hook, attempts=policy.attempts, timeout=policy.timeout + policy.rate_limit_ceiling,
                wait_initial=policy.wait_initial, wait_max=policy.wait_max, wait_jitter=policy.wait_jitter,
            ):
                with attempt:
                    if backoff:
                        self._sleep(backoff)
                        backoff = 0.0
                    if deadline is not None and self._clock() > deadline:
                        raise CloudflareError(f"{endpoint} not sent: the account lease would expire first",
                                              "the next run retries", ambiguous=ambiguous)
                    self._spend(endpoint, need, reserve, deadline, ambiguous)
                    try:
                        return self._once(endpoint, method, path, mutating=mutating, keys=keys, **kwargs)
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

    def _once(self, endpoint: str, method: str, path: str, *, mutating: bool, keys: tuple[str, ...],
              **kwargs: Any) -> Any:
        try:
            resp = exchange(self._http, method, self._base + path, self._headers, self.call_timeout, **kwargs)
        except (httpx.RequestError, DeadlinePassed, ValueError) as exc:
            sent = not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
            kind = f"no whole answer within {self.call_timeout:g}s" if isinstance(exc, DeadlinePassed) \
                else type(exc).__name__
            self._observe(endpoint, "error")
            error = CloudflareError(
                f"no answer from Cloudflare ({kind})",
                "check CLOUDFLARE_BASE_URL and the network path to it",
                retryable=True, ambiguous=mutating and sent,
            )
            raise _Retryable(error) from exc
        self._observe(endpoint, str(resp.status))
        self._note_ratelimit(resp.headers)
        body = _json_or_none(resp)
        if resp.status == 429:
            wait = _retry_after(resp)
            error = _status_error(resp, body, keys, retryable=True, ambiguous=False)
            if wait > self._retry.rate_limit_ceiling:
                error.hint = (f"Cloudflare asks to wait {wait:.0f}s, over the ceiling of "
                              f"{self._retry.rate_limit_ceiling:.0f}s; {HINTS[971]}")
            raise _Retryable(error, wait=wait)
        if resp.status >= 500:
            raise _Retryable(_status_error(resp, body, keys, retryable=True, ambiguous=mutating))
        if resp.status >= 400:
            raise _status_error(resp, body, keys, retryable=False, ambiguous=False)
        if not isinstance(body, dict) or "result" not in body:
            raise CloudflareError(f"Cloudflare answered {resp.status} with a body that is not the API envelope",
                                  "check CLOUDFLARE_BASE_URL points at the Cloudflare API v4 (a proxy or login "
                                  "page may be in the way)", status=resp.status, ambiguous=mutating)
        if body.get("success") is False:
            raise _status_error(resp, body, keys, retryable=False, ambiguous=mutating)
        return body["result"]


# -- answers ----------------------------------------------------------------------------------

def _garbage(what: str, detail: str, ambiguous: bool = False) -> CloudflareError:
    return CloudflareError(f"Cloudflare answered {what} with an unexpected body ({detail})",
                           "check CLOUDFLARE_BASE_URL points at the Cloudflare API v4", ambiguous=ambiguous)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _tunnel_info(item: Any) -> TunnelInfo:
    if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not item["id"]:
        raise _garbage("the tunnel list", "a tunnel without an id")
    tid = item["id"]
    name = _text(item.get("name")) or tid
    meta = item.get("psk_metadata")
    generated = _text(meta.get("last_generated_on")) if isinstance(meta, dict) else None
    problem = None
    if not valid_id(tid):
        problem = f"Cloudflare listed a tunnel id that is not 32 lowercase hex ({tid[:40]!r}); not rotated"
    return TunnelInfo(tid, name, generated, _text(item.get("customer_endpoint")),
                      _text(item.get("cloudflare_endpoint")), problem)


def _psk_set_result(result: Any, psks: Mapping[str, Secret], keys: list[str], *, ambiguous: bool) -> PskSetResult:
    """Sort the bulk set's answer per tunnel; anything self-contradictory is ``ambiguous``."""
    if not isinstance(result, dict):
        raise _garbage("the PSK set", "result is not an object", ambiguous)
    applied = result.get("successfully_applied_psks") or {}
    unapplied = result.get("unapplied_psks") or {}
    if not isinstance(applied, dict) or not isinstance(unapplied, dict):
        raise _garbage("the PSK set", "the applied/unapplied maps are not objects", ambiguous)
    out = PskSetResult()
    for tid, secret in psks.items():
        entry: dict[str, Any] = applied[tid] if isinstance(applied.get(tid), dict) else {}
        in_applied, in_unapplied = tid in applied, tid in unapplied
        if in_applied and in_unapplied:
            out.ambiguous[tid] = "Cloudflare reported this tunnel both applied and unapplied"
        elif in_applied and not isinstance(applied[tid], dict):
            out.ambiguous[tid] = "Cloudflare's answer for this tunnel is not an object"
        elif in_applied and "psk" in entry and entry["psk"] != secret.reveal():
            out.ambiguous[tid] = "Cloudflare echoed a different PSK than the one sent"
        elif in_applied:
            out.applied.add(tid)
            meta = entry.get("psk_metadata")
            generated = _text(meta.get("last_generated_on")) if isinstance(meta, dict) else None
            if generated:
                out.generated_on[tid] = generated
            if _text(entry.get("ipsec_id")):
                out.ipsec_ids[tid] = entry["ipsec_id"]
        elif in_unapplied:
            reason = unapplied[tid]
            out.unapplied[tid] = redact(reason if isinstance(reason, str) else repr(reason), keys)[:300]
    return out


def _json_or_none(resp: Answer) -> Any:
    try:
        return wire.loads(resp.body)
    except ValueError:  # wire.NotJson: malformed or nested too deeply
        return None


def _retry_after(resp: Answer) -> float:
    try:
        wait = float(resp.headers.get("retry-after", "1"))
    except ValueError:
        return 1.0
    return max(0.0, wait) if math.isfinite(wait) else 1.0


def _status_error(resp: Answer, body: Any, keys: tuple[str, ...], *, retryable: bool,
                  ambiguous: bool) -> CloudflareError:
    errors = body.get("errors") if isinstance(body, dict) else None
    first = errors[0] if isinstance(errors, list) and errors and isinstance(errors[0], dict) else {}
    code = first.get("code") if isinstance(first.get("code"), int) else None
    message = redact(str(first.get("message") or resp.reason or "error"), keys)[:200].replace("\n", " ")
    if not isinstance(body, dict):
        message = f"non-JSON {resp.headers.get('content-type', 'body')}"
    hint = HINTS.get(code or 0) or ("Cloudflare had a server-side problem: retry later" if resp.status >= 500
                                    else "see the Cloudflare error code")
    label = f"{resp.status}" + (f" code {code}" if code else "")
    return CloudflareError(f"Cloudflare refused the call ({label}: {message})", hint, status=resp.status,
                           code=code, retryable=retryable, ambiguous=ambiguous)
