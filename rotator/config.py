"""Typed, validated settings from one TOML file plus the standard environment variables.

Every error names the key and the problem. Secrets (tokens, keys) are held as ``Secret`` so the
effective config can be printed (``rotator config check``) without showing them.
"""

from __future__ import annotations

import fnmatch
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rotator.errors import ConfigError
from rotator.psk import PRESETS, PskPolicy
from rotator.rotation.lease import check_lease_ttl
from rotator.schedule import Policy, Window, parse_cron
from rotator.secret import Secret

DURATION_RE = re.compile(r"^(\d+)(s|m|h|d|w)$")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
HEX32 = re.compile(r"^[0-9a-f]{32}$")


def parse_duration(value: Any, key: str) -> float:
    """``30d``, ``12h``, ``90s`` or a number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    if isinstance(value, str):
        m = DURATION_RE.match(value.strip())
        if m:
            return float(int(m.group(1)) * DURATION_UNITS[m.group(2)])
    raise ConfigError(f"{key}: {value!r} is not a duration", "write it like 30d, 12h, 15m or 90s")


@dataclass(frozen=True)
class Selection:
    policy: str
    ids: tuple[str, ...] = ()
    names: tuple[str, ...] = ()  # globs
    exclude: tuple[str, ...] = ()  # globs on name or exact ids
    all: bool = False

    def matches(self, tunnel_id: str, name: str) -> bool:
        if any(tunnel_id == x or fnmatch.fnmatchcase(name, x) for x in self.exclude):
            return False
        if self.all:
            return True
        return tunnel_id in self.ids or any(fnmatch.fnmatchcase(name, g) for g in self.names)


@dataclass(frozen=True)
class Account:
    id: str
    selections: tuple[Selection, ...]

    def policy_for(self, tunnel_id: str, name: str) -> str | None:
        for sel in self.selections:
            if sel.matches(tunnel_id, name):
                return sel.policy
        return None


@dataclass(frozen=True)
class VaultAuth:
    method: str = "token"
    mount: str = ""
    role_id: str = ""
    secret_id: Secret | None = None
    role: str = ""
    jwt_file: str = "/var/run/secrets/kubernetes.io/serviceaccount/token"


@dataclass(frozen=True)
class Settings:
    vault_addr: str
    vault_token: Secret | None
    vault_namespace: str
    vault_cacert: str
    vault_mount: str
    vault_prefix: str
    vault_concurrency: int
    vault_timeout: float
    vault_auth: VaultAuth
    cloudflare_base_url: str
    cloudflare_token: Secret | None
    cloudflare_email: str
    cloudflare_key: Secret | None
    batch_size: int
    cloudflare_timeout: float
    retry_attempts: int
    retry_timeout: float
    rate_limit_ceiling: float
    lease_ttl: float
    admin_listen: str
    admin_token: Secret | None
    policies: dict[str, Policy]
    accounts: tuple[Account, ...]
    source: str

    def masked(self) -> dict[str, Any]:
        """The effective config with every secret masked, for ``rotator config check``."""
        def mask(value: Secret | None) -> str:
            return "<set>" if value is not None else "<unset>"

        return {
            "source": self.source,
            "vault": {"addr": self.vault_addr, "token": mask(self.vault_token), "namespace": self.vault_namespace,
                      "cacert": self.vault_cacert, "mount": self.vault_mount, "prefix": self.vault_prefix,
                      "concurrency": self.vault_concurrency, "auth": self.vault_auth.method},
            "cloudflare": {"base_url": self.cloudflare_base_url, "api_token": mask(self.cloudflare_token),
                           "email": self.cloudflare_email or "<unset>", "api_key": mask(self.cloudflare_key),
                           "batch_size": self.batch_size, "retry_attempts": self.retry_attempts,
                           "rate_limit_ceiling": self.rate_limit_ceiling},
            "rotation": {"lease_ttl": self.lease_ttl},
            "admin": {"listen": self.admin_listen, "token": mask(self.admin_token)},
            "policies": {n: {"every": p.every, "cron": p.cron, "timezone": p.timezone, "max_age": p.max_age,
                             "jitter": p.jitter, "window": None if p.window is None else {
                                 "days": [DAYS[d] for d in p.window.days],
                                 "start": f"{p.window.start_minute // 60:02d}:{p.window.start_minute % 60:02d}",
                                 "end": f"{p.window.end_minute // 60:02d}:{p.window.end_minute % 60:02d}",
                                 "timezone": p.window.timezone},
                             "psk_length": p.psk.length, "psk_entropy_bits": round(p.psk.entropy_bits)}
                         for n, p in self.policies.items()},
            "accounts": [{"id": a.id, "selections": [
                {"policy": s.policy, "all": s.all, "ids": list(s.ids), "names": list(s.names),
                 "exclude": list(s.exclude)} for s in a.selections]} for a in self.accounts],
        }


class _Table:
    """A TOML table that remembers its dotted path, so errors name the exact key."""

    def __init__(self, data: Mapping[str, Any], path: str) -> None:
        self.data, self.path = data, path

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, kind: type | tuple[type, ...], default: Any) -> Any:
        if name not in self.data:
            return default
        value = self.data[name]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float, (int, float))):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise ConfigError(f"{self.key(name)}: expected {names}, got {type(value).__name__}", "fix the config file")
        return value

    def table(self, name: str) -> _Table:
        return _Table(self.get(name, dict, {}), self.key(name))

    def reject_unknown(self, allowed: set[str]) -> None:
        unknown = sorted(set(self.data) - allowed)
        if unknown:
            raise ConfigError(f"{self.key(unknown[0])}: unknown setting",
                              f"allowed here: {', '.join(sorted(allowed))}")


def _clock(value: str, key: str) -> int:
    m = re.match(r"^([01]\d|2[0-4]):([0-5]\d)$", value)
    if not m or (m.group(1) == "24" and m.group(2) != "00"):
        raise ConfigError(f"{key}: {value!r} is not a time of day", "write it as HH:MM, e.g. 02:00")
    return int(m.group(1)) * 60 + int(m.group(2))


def _timezone(value: str, key: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{key}: unknown timezone {value!r}", "use an IANA name such as Europe/Berlin") from None
    return value


def _policy(name: str, t: _Table) -> Policy:
    t.reject_unknown({"every", "cron", "timezone", "window", "max_age", "jitter", "retry_backoff",
                      "retry_backoff_max", "psk_length", "psk_charset", "psk_alphabet", "psk_forbidden_first"})
    every = parse_duration(t.data["every"], t.key("every")) if "every" in t.data else None
    cron = t.get("cron", str, None)
    if (every is None) == (cron is None):
        raise ConfigError(f"{t.path}: set exactly one of 'every' or 'cron'", "e.g. every = \"30d\"")
    if every is not None and every < 10:
        raise ConfigError(f"{t.key('every')}: must be at least 10s", "rotate less often")
    tz = _timezone(t.get("timezone", str, "UTC"), t.key("timezone"))
    if cron is not None:

        try:
            parse_cron(cron)
        except ValueError as exc:
            raise ConfigError(f"{t.key('cron')}: {exc}", "use 5 fields: minute hour day-of-month month day-of-week") \
                from None
    window = None
    if "window" in t.data:
        w = t.table("window")
        w.reject_unknown({"days", "start", "end", "timezone"})
        days = w.get("days", list, list(DAYS))
        bad = [d for d in days if str(d).lower()[:3] not in DAYS]
        if bad or not days:
            raise ConfigError(f"{w.key('days')}: {bad or days!r} not weekday names", "use mon, tue, ..., sun")
        start = _clock(w.get("start", str, "00:00"), w.key("start"))
        end = _clock(w.get("end", str, "24:00"), w.key("end"))
        if start == end:
            raise ConfigError(f"{w.path}: start and end are equal", "give the window a length")
        window = Window(tuple(sorted({DAYS.index(str(d).lower()[:3]) for d in days})), start, end,
                        _timezone(w.get("timezone", str, tz), w.key("timezone")))
    max_age = parse_duration(t.data["max_age"], t.key("max_age")) if "max_age" in t.data else None
    charset = t.get("psk_charset", str, "alnum")
    if charset not in PRESETS:
        raise ConfigError(f"{t.key('psk_charset')}: unknown preset {charset!r}", f"use one of {', '.join(PRESETS)}")
    alphabet, forbidden = PRESETS[charset]
    psk = PskPolicy(t.get("psk_length", int, 32), t.get("psk_alphabet", str, alphabet),
                    t.get("psk_forbidden_first", str, forbidden))
    try:
        psk.validated()
    except ConfigError as exc:
        raise ConfigError(f"{t.path}: {exc.message}", exc.hint) from None
    return Policy(
        name, every, cron, tz, window, max_age,
        parse_duration(t.data.get("jitter", 0), t.key("jitter")),
        parse_duration(t.data.get("retry_backoff", 300), t.key("retry_backoff")),
        parse_duration(t.data.get("retry_backoff_max", "6h"), t.key("retry_backoff_max")), psk,
    )


def _selection(t: _Table, policies: Mapping[str, Policy]) -> Selection:
    t.reject_unknown({"policy", "all", "ids", "names", "exclude"})
    policy = t.get("policy", str, "default")
    if policy not in policies:
        raise ConfigError(f"{t.key('policy')}: no policy named {policy!r}",
                          f"define [policies.{policy}] or use one of {', '.join(policies) or 'none'}")
    sel = Selection(policy, tuple(t.get("ids", list, [])), tuple(t.get("names", list, [])),
                    tuple(t.get("exclude", list, [])), t.get("all", bool, False))
    if not (sel.all or sel.ids or sel.names):
        raise ConfigError(f"{t.path}: selects no tunnels", "set all = true, ids = [...] or names = [\"glob*\"]")
    return sel


def load(path: str | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Load and validate. ``path`` None and no ROTATOR_CONFIG: environment only (one-shot use)."""
    env = os.environ if env is None else env
    path = path or env.get("ROTATOR_CONFIG") or None
    raw: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist", "check --config or ROTATOR_CONFIG") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}", "fix the syntax") from None
        except OSError as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc.strerror}", "check its permissions") from None
    root = _Table(raw, "")
    root.reject_unknown({"vault", "cloudflare", "rotation", "admin", "policies", "accounts"})
    v, c, r, a = root.table("vault"), root.table("cloudflare"), root.table("rotation"), root.table("admin")
    v.reject_unknown({"addr", "mount", "prefix", "namespace", "cacert", "concurrency", "timeout", "auth"})
    c.reject_unknown({"base_url", "batch_size", "timeout", "retry_attempts", "retry_timeout", "rate_limit_ceiling"})
    r.reject_unknown({"lease_ttl"})
    a.reject_unknown({"listen", "token_file"})

    auth_t = v.table("auth")
    auth_t.reject_unknown({"method", "mount", "role_id", "secret_id_file", "role", "jwt_file"})
    method = auth_t.get("method", str, "token")
    if method not in ("token", "approle", "kubernetes"):
        raise ConfigError(f"vault.auth.method: unknown method {method!r}", "use token, approle or kubernetes")
    secret_id = env.get("VAULT_SECRET_ID")
    if auth_t.get("secret_id_file", str, ""):
        secret_id = _read_secret_file(auth_t.data["secret_id_file"], "vault.auth.secret_id_file")
    auth = VaultAuth(method, auth_t.get("mount", str, method if method != "token" else ""),
                     auth_t.get("role_id", str, env.get("VAULT_ROLE_ID", "")), Secret(secret_id) if secret_id else None,
                     auth_t.get("role", str, ""),
                     auth_t.get("jwt_file", str, "/var/run/secrets/kubernetes.io/serviceaccount/token"))
    if method == "approle" and (not auth.role_id or auth.secret_id is None):
        raise ConfigError("vault.auth: approle needs role_id and a secret id",
                          "set vault.auth.role_id and vault.auth.secret_id_file (or VAULT_ROLE_ID/VAULT_SECRET_ID)")
    if method == "kubernetes" and not auth.role:
        raise ConfigError("vault.auth.role: kubernetes auth needs a role", "set vault.auth.role")

    vault_addr = env.get("VAULT_ADDR") or v.get("addr", str, "")
    vault_token = env.get("VAULT_TOKEN")
    if not vault_addr:
        raise ConfigError("Vault address is not set", "set VAULT_ADDR (or vault.addr in the config file)")
    if not re.match(r"^https?://", vault_addr):
        raise ConfigError(f"VAULT_ADDR {vault_addr!r} is not an http(s) URL", "e.g. https://vault.example.com:8200")
    if method == "token" and not vault_token:
        raise ConfigError("VAULT_TOKEN is not set", "export VAULT_TOKEN, or configure vault.auth for approle/kubernetes")

    cf_token, cf_email = env.get("CLOUDFLARE_API_TOKEN"), env.get("CLOUDFLARE_EMAIL")
    cf_key = env.get("CLOUDFLARE_API_KEY")
    if not cf_token and not (cf_email and cf_key):
        raise ConfigError("no Cloudflare credential is set",
                          "export CLOUDFLARE_API_TOKEN (or CLOUDFLARE_EMAIL and CLOUDFLARE_API_KEY)")

    admin_token = env.get("ROTATOR_ADMIN_TOKEN")
    if a.get("token_file", str, ""):
        admin_token = _read_secret_file(a.data["token_file"], "admin.token_file")

    policies_t = root.table("policies")
    policies = {name: _policy(name, policies_t.table(name)) for name in policies_t.data}
    if "default" not in policies:
        policies["default"] = Policy("default", every=30 * 86400.0, max_age=35 * 86400.0, jitter=3600.0)

    accounts = []
    seen: set[str] = set()
    for i, acc_raw in enumerate(root.get("accounts", list, [])):
        if not isinstance(acc_raw, dict):
            raise ConfigError(f"accounts[{i}]: expected a table", "write [[accounts]] blocks")
        t = _Table(acc_raw, f"accounts[{i}]")
        t.reject_unknown({"id", "select"})
        acc_id = t.get("id", str, "")
        if not HEX32.match(acc_id):
            raise ConfigError(f"{t.key('id')}: {acc_id!r} is not a Cloudflare account id",
                              "use the 32-hex-character id from the dashboard URL")
        if acc_id in seen:
            raise ConfigError(f"{t.key('id')}: account {acc_id} is listed twice", "merge the two blocks")
        seen.add(acc_id)
        sels_raw = t.get("select", list, [{"all": True, "policy": "default"}])
        sels = tuple(_selection(_Table(s, f"{t.key('select')}[{j}]"), policies) for j, s in enumerate(sels_raw))
        accounts.append(Account(acc_id, sels))

    batch_size = c.get("batch_size", int, 100)
    if not 1 <= batch_size <= 1000:
        raise ConfigError(f"cloudflare.batch_size: {batch_size} is outside 1..1000", "the default is 100")
    concurrency = v.get("concurrency", int, 16)
    if not 1 <= concurrency <= 256:
        raise ConfigError(f"vault.concurrency: {concurrency} is outside 1..256", "the default is 16")
    lease_ttl = parse_duration(r.data.get("lease_ttl", 120), "rotation.lease_ttl")
    retry_timeout = parse_duration(c.data.get("retry_timeout", 60), "cloudflare.retry_timeout")
    ceiling = parse_duration(c.data.get("rate_limit_ceiling", 330), "cloudflare.rate_limit_ceiling")
    cloudflare_timeout = parse_duration(c.data.get("timeout", 30), "cloudflare.timeout")
    # Every call's total deadline must fit twice in the lease (device timeouts join when devices land).
    check_lease_ttl(lease_ttl, {"cloudflare.timeout": cloudflare_timeout})
    listen = a.get("listen", str, "127.0.0.1:9477")
    if not re.match(r"^[^:]+:\d{1,5}$", listen):
        raise ConfigError(f"admin.listen: {listen!r} is not HOST:PORT", "e.g. 127.0.0.1:9477")
    return Settings(
        vault_addr=vault_addr.rstrip("/"), vault_token=Secret(vault_token) if vault_token else None,
        vault_namespace=env.get("VAULT_NAMESPACE") or v.get("namespace", str, ""),
        vault_cacert=env.get("VAULT_CACERT") or v.get("cacert", str, ""),
        vault_mount=v.get("mount", str, "secret").strip("/"),
        vault_prefix=v.get("prefix", str, "cloudflare/magic-ipsec").strip("/"),
        vault_concurrency=concurrency, vault_timeout=parse_duration(v.data.get("timeout", 15), "vault.timeout"),
        vault_auth=auth,
        cloudflare_base_url=(env.get("CLOUDFLARE_BASE_URL") or c.get("base_url", str, "")
                             or "https://api.cloudflare.com/client/v4").rstrip("/"),
        cloudflare_token=Secret(cf_token) if cf_token else None, cloudflare_email=cf_email or "",
        cloudflare_key=Secret(cf_key) if cf_key and not cf_token else None,
        batch_size=batch_size, cloudflare_timeout=cloudflare_timeout,
        retry_attempts=c.get("retry_attempts", int, 5), retry_timeout=retry_timeout, rate_limit_ceiling=ceiling,
        lease_ttl=lease_ttl, admin_listen=listen, admin_token=Secret(admin_token) if admin_token else None,
        policies=policies, accounts=tuple(accounts), source=path or "environment only",
    )


def _read_secret_file(path: str, key: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            value = fh.read().strip()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path} ({exc.strerror})", "check the path and its permissions") from None
    if not value:
        raise ConfigError(f"{key}: {path} is empty", "write the secret into the file")
    return value
