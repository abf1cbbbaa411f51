"""Typed, validated settings from one TOML file plus the standard environment variables.

Every error names the key and the problem. Secrets (tokens, keys) are held as ``Secret`` so the
effective config can be printed (``rotator config check``) without showing them.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rotator.errors import ConfigError
from rotator.psk import PRESETS, PskPolicy
from rotator.rotation.lease import check_lease_ttl
from rotator.schedule import Policy, Window, format_duration, next_cron, parse_cron
from rotator.secret import Secret

if TYPE_CHECKING:
    from rotator.adapters.devices import DeviceSpec

DURATION_RE = re.compile(r"^(\d+)(s|m|h|d|w)$")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
HEX32 = re.compile(r"^[0-9a-f]{32}$")
ENV_ONLY = "environment only"  # Settings.source when no file was read


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
class VaultSettings:
    addr: str
    token: Secret | None
    namespace: str = ""
    cacert: str = ""
    mount: str = "secret"
    prefix: str = "cloudflare/magic-ipsec"
    concurrency: int = 16
    timeout: float = 15.0
    auth: VaultAuth = VaultAuth()


@dataclass(frozen=True)
class CloudflareSettings:
    base_url: str
    token: Secret | None
    email: str = ""
    key: Secret | None = None
    batch_size: int = 100
    timeout: float = 30.0
    retry_attempts: int = 5
    retry_timeout: float = 60.0
    rate_limit_ceiling: float = 330.0
    rate_reserve: float = 0.2  # share of Cloudflare's rate budget left to other tools


@dataclass(frozen=True)
class RotationSettings:
    lease_ttl: float = 120.0
    on_drift: str = "rotate"  # a key changed outside the rotator: "rotate" re-keys it from Vault, "report" only reports


@dataclass(frozen=True)
class AdminSettings:
    listen: str = "127.0.0.1:9477"
    token: Secret | None = None
    queue: int = 16  # on-demand runs that may wait; more are refused with 429
    # Where other hosts reach this daemon's admin API; recorded in its leases so a one-shot command
    # that meets one hands its request here (issue 20). "" : derived from listen (a wildcard: loopback).
    advertise_url: str = ""


@dataclass(frozen=True)
class ReportSettings:
    """``[report]``: the daemon writes the audit report (service/report.py) on a schedule."""

    directory: str
    cron: str
    output: tuple[str, ...] = ("json", "html")
    period: float = 30 * 86400.0  # each report covers this long, ending when it is written


REPORT_FORMATS = ("json", "csv", "html")


@dataclass(frozen=True)
class Settings:
    """The validated configuration, one part per section of the file."""

    vault: VaultSettings
    cloudflare: CloudflareSettings
    rotation: RotationSettings
    admin: AdminSettings
    policies: dict[str, Policy]
    accounts: tuple[Account, ...]
    source: str
    devices: tuple[DeviceSpec, ...] = ()  # [[devices]]: the far ends (rotator/adapters/devices)
    report: ReportSettings | None = None  # [report]: scheduled audit reports

    @property
    def secrets(self) -> tuple[Secret, ...]:
        """Every credential, for the log redactor."""
        from rotator.adapters.devices import secrets_of  # the device kinds import this module's parsers

        values = (self.vault.token, self.vault.auth.secret_id, self.cloudflare.token, self.cloudflare.key,
                  self.admin.token)
        return tuple(v for v in values if v is not None) + tuple(secrets_of(self.devices))

    def masked(self) -> dict[str, Any]:
        """The effective config with every secret masked, for ``rotator config check``."""
        def mask(value: Secret | None) -> str:
            return "<set>" if value is not None else "<unset>"

        v, c, a = self.vault, self.cloudflare, self.admin
        return {
            "source": self.source,
            "vault": {"addr": v.addr, "token": mask(v.token), "namespace": v.namespace, "cacert": v.cacert,
                      "mount": v.mount, "prefix": v.prefix, "concurrency": v.concurrency, "timeout": v.timeout,
                      "auth": v.auth.method, "auth_mount": v.auth.mount, "auth_role_id": v.auth.role_id,
                      "auth_secret_id": mask(v.auth.secret_id), "auth_role": v.auth.role,
                      "auth_jwt_file": v.auth.jwt_file},
            "cloudflare": {"base_url": c.base_url, "api_token": mask(c.token), "email": c.email or "<unset>",
                           "api_key": mask(c.key), "batch_size": c.batch_size, "timeout": c.timeout,
                           "retry_attempts": c.retry_attempts, "retry_timeout": c.retry_timeout,
                           "rate_limit_ceiling": c.rate_limit_ceiling, "rate_reserve": c.rate_reserve},
            "rotation": {"lease_ttl": self.rotation.lease_ttl, "on_drift": self.rotation.on_drift},
            "admin": {"listen": a.listen, "token": mask(a.token), "queue": a.queue,
                      "advertise_url": a.advertise_url or "<derived from listen>"},
            "policies": {n: _policy_view(p) for n, p in self.policies.items()},
            "accounts": [{"id": acc.id, "selections": [
                {"policy": s.policy, "all": s.all, "ids": list(s.ids), "names": list(s.names),
                 "exclude": list(s.exclude)} for s in acc.selections]} for acc in self.accounts],
            "devices": [d.masked() for d in self.devices],
            "report": None if self.report is None else {
                "directory": self.report.directory, "cron": self.report.cron, "output": list(self.report.output),
                "period": self.report.period},
        }


def _policy_view(p: Policy) -> dict[str, Any]:
    window = None if p.window is None else {
        "days": [DAYS[d] for d in p.window.days],
        "start": f"{p.window.start_minute // 60:02d}:{p.window.start_minute % 60:02d}",
        "end": f"{p.window.end_minute // 60:02d}:{p.window.end_minute % 60:02d}",
        "timezone": p.window.timezone}
    return {"every": p.every, "cron": p.cron, "timezone": p.timezone, "max_age": p.max_age, "jitter": p.jitter,
            "window": window, "retry_backoff": p.retry_backoff, "retry_backoff_max": p.retry_backoff_max,
            "psk_length": p.psk.length, "psk_alphabet": p.psk.alphabet, "psk_forbidden_first": p.psk.forbidden_first,
            "psk_entropy_bits": round(p.psk.entropy_bits)}


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
            parsed = parse_cron(cron)
        except ValueError as exc:
            raise ConfigError(f"{t.key('cron')}: {exc}", "use 5 fields: minute hour day-of-month month day-of-week") \
                from None
        try:
            next_cron(parsed, 0.0, tz)
        except ValueError:
            raise ConfigError(f"{t.key('cron')}: {cron!r} never fires (no such date)",
                              "pick a day that exists, e.g. \"0 3 28 2 *\"") from None
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
    jitter = parse_duration(t.data.get("jitter", 0), t.key("jitter"))
    if every is not None and max_age is not None and max_age < every:
        raise ConfigError(f"{t.key('max_age')}: {format_duration(max_age)} is shorter than every "
                          f"({format_duration(every)})",
                          "max_age is the oldest a key may get: make it at least 'every'")
    if every is not None and jitter > every:
        raise ConfigError(f"{t.key('jitter')}: {format_duration(jitter)} is longer than the interval every "
                          f"({format_duration(every)})",
                          "keep jitter below 'every', e.g. a tenth of it")
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
        name, every, cron, tz, window, max_age, jitter,
        parse_duration(t.data.get("retry_backoff", 300), t.key("retry_backoff")),
        parse_duration(t.data.get("retry_backoff_max", "6h"), t.key("retry_backoff_max")), psk,
    )


def _selection(t: _Table, policies: Mapping[str, Policy]) -> Selection:
    t.reject_unknown({"policy", "all", "ids", "names", "exclude"})
    policy = t.get("policy", str, "default")
    if policy not in policies:
        raise ConfigError(f"{t.key('policy')}: no policy named {policy!r}",
                          f"define [policies.{policy}] or use one of {', '.join(policies) or 'none'}")
    sel = Selection(policy, _strings(t, "ids"), _strings(t, "names"), _strings(t, "exclude"),
                    t.get("all", bool, False))
    if not (sel.all or sel.ids or sel.names):
        raise ConfigError(f"{t.path}: selects no tunnels", "set all = true, ids = [...] or names = [\"glob*\"]")
    return sel


def _strings(t: _Table, name: str) -> tuple[str, ...]:
    values = t.get(name, list, [])
    for j, value in enumerate(values):
        if not isinstance(value, str):
            raise ConfigError(f"{t.key(name)}[{j}]: expected a string, got {type(value).__name__} {value!r}",
                              "quote it: tunnel ids and name globs are strings")
    return tuple(values)


def split_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` -> (host, port); ConfigError naming admin.listen otherwise."""
    m = re.match(r"^\[([0-9A-Fa-f:.]+)\]:(\d{1,5})$", listen) or re.match(r"^([^:\[\]]+):(\d{1,5})$", listen)
    hint = "e.g. 127.0.0.1:9477, or [::1]:9477 for IPv6"
    if not m:
        raise ConfigError(f"admin.listen: {listen!r} is not HOST:PORT", hint)
    host, port = m.group(1), int(m.group(2))
    if port > 65535:
        raise ConfigError(f"admin.listen: port {port} is out of range (0-65535)", hint)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if listen.startswith("[") or not re.match(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$", host) or \
                re.match(r"^[\d.]+$", host):
            raise ConfigError(f"admin.listen: {host!r} is not an IP address or host name", hint) from None
    return host, port


def check_for_daemon(settings: Settings) -> None:
    """What ``rotator run`` needs beyond what every command needs."""
    if not settings.accounts:
        raise ConfigError("accounts: no [[accounts]] configured for 'run'",
                          "list the accounts to manage in the config file")
    if settings.admin.token is None:
        raise ConfigError("admin token is not set: 'run' protects its admin API with it",
                          "set ROTATOR_ADMIN_TOKEN or admin.token_file")


def load(path: str | None = None, env: Mapping[str, str] | None = None, *, cloudflare: bool = True) -> Settings:
    """Load and validate. ``path`` None and no ROTATOR_CONFIG: environment only (one-shot use).
    ``cloudflare`` False: a command that reads only Vault (``rotator report``) needs no Cloudflare credentials."""
    env = os.environ if env is None else env
    path = path or env.get("ROTATOR_CONFIG") or None
    root = _Table(_read(path) if path else {}, "")
    root.reject_unknown({"vault", "cloudflare", "rotation", "admin", "policies", "accounts", "devices", "report"})
    v, c = root.table("vault"), root.table("cloudflare")
    auth = _vault_auth(v.table("auth"), env)
    _require_environment(v, auth, env, cloudflare=cloudflare)
    policies_t = root.table("policies")
    policies = {name: _policy(name, policies_t.table(name)) for name in policies_t.data}
    if "default" not in policies:
        policies["default"] = Policy("default", every=30 * 86400.0, max_age=35 * 86400.0, jitter=3600.0)
    from rotator.adapters.devices import check_key_rules, parse_devices  # the kinds import this module's parsers

    accounts = _accounts(root, policies)
    devices = parse_devices(root.data.get("devices", []), [a.id for a in accounts])
    check_key_rules(devices, accounts, policies)  # docs/design.md section 10: no key a device refuses
    settings = Settings(_vault(v, auth, env), _cloudflare(c, env), _rotation(root.table("rotation")),
                        _admin(root.table("admin"), env), policies, accounts, source=path or ENV_ONLY, devices=devices,
                        report=_report(root.table("report")) if "report" in root.data else None)
    # Every call's total deadline must fit twice in the lease: Cloudflare's and each device's.
    check_lease_ttl(settings.rotation.lease_ttl, {"cloudflare.timeout": settings.cloudflare.timeout,
                                                  **{f"{d.path}.timeout": d.timeout for d in devices}})
    return settings


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist", "check --config or ROTATOR_CONFIG") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start})", "save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}", "fix the syntax") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}", "check its permissions") from None


def _require_environment(v: _Table, auth: VaultAuth, env: Mapping[str, str], *, cloudflare: bool = True) -> None:
    """Every missing variable in one message, not one per try."""
    missing = []
    if not (env.get("VAULT_ADDR") or v.get("addr", str, "")):
        missing.append("VAULT_ADDR (or vault.addr)")
    if auth.method == "token" and not env.get("VAULT_TOKEN"):
        missing.append("VAULT_TOKEN (or vault.auth for approle/kubernetes)")
    if cloudflare and not env.get("CLOUDFLARE_API_TOKEN") \
            and not (env.get("CLOUDFLARE_EMAIL") and env.get("CLOUDFLARE_API_KEY")):
        missing.append("CLOUDFLARE_API_TOKEN (or CLOUDFLARE_EMAIL and CLOUDFLARE_API_KEY)")
    if missing:
        raise ConfigError(f"not set: {'; '.join(missing)}", "export them (see 'rotator --help')")


def _vault_auth(t: _Table, env: Mapping[str, str]) -> VaultAuth:
    t.reject_unknown({"method", "mount", "role_id", "secret_id_file", "role", "jwt_file"})
    method = t.get("method", str, "token")
    if method not in ("token", "approle", "kubernetes"):
        raise ConfigError(f"vault.auth.method: unknown method {method!r}", "use token, approle or kubernetes")
    secret_id = env.get("VAULT_SECRET_ID")
    if t.get("secret_id_file", str, ""):
        secret_id = _read_secret_file(t.data["secret_id_file"], "vault.auth.secret_id_file")
    auth = VaultAuth(method, t.get("mount", str, method if method != "token" else ""),
                     t.get("role_id", str, env.get("VAULT_ROLE_ID", "")), Secret(secret_id) if secret_id else None,
                     t.get("role", str, ""), t.get("jwt_file", str, VaultAuth.jwt_file))
    if method == "approle" and (not auth.role_id or auth.secret_id is None):
        raise ConfigError("vault.auth: approle needs role_id and a secret id",
                          "set vault.auth.role_id and vault.auth.secret_id_file (or VAULT_ROLE_ID/VAULT_SECRET_ID)")
    if method == "kubernetes" and not auth.role:
        raise ConfigError("vault.auth.role: kubernetes auth needs a role", "set vault.auth.role")
    return auth


def _vault(v: _Table, auth: VaultAuth, env: Mapping[str, str]) -> VaultSettings:
    v.reject_unknown({"addr", "mount", "prefix", "namespace", "cacert", "concurrency", "timeout", "auth"})
    addr = env.get("VAULT_ADDR") or v.get("addr", str, "")
    if not re.match(r"^https?://", addr):
        raise ConfigError(f"VAULT_ADDR {addr!r} is not an http(s) URL", "e.g. https://vault.example.com:8200")
    concurrency = v.get("concurrency", int, 16)
    if not 1 <= concurrency <= 256:
        raise ConfigError(f"vault.concurrency: {concurrency} is outside 1..256", "the default is 16")
    token = env.get("VAULT_TOKEN")
    return VaultSettings(
        addr.rstrip("/"), Secret(token) if token else None, env.get("VAULT_NAMESPACE") or v.get("namespace", str, ""),
        env.get("VAULT_CACERT") or v.get("cacert", str, ""), v.get("mount", str, "secret").strip("/"),
        v.get("prefix", str, "cloudflare/magic-ipsec").strip("/"), concurrency,
        _positive(v.data.get("timeout", 15), "vault.timeout"), auth)


def _cloudflare(c: _Table, env: Mapping[str, str]) -> CloudflareSettings:
    c.reject_unknown({"base_url", "batch_size", "timeout", "retry_attempts", "retry_timeout", "rate_limit_ceiling",
                      "rate_reserve"})
    batch_size = c.get("batch_size", int, 100)
    if not 1 <= batch_size <= 1000:
        raise ConfigError(f"cloudflare.batch_size: {batch_size} is outside 1..1000", "the default is 100")
    retry_attempts = c.get("retry_attempts", int, 5)
    if not 1 <= retry_attempts <= 100:
        raise ConfigError(f"cloudflare.retry_attempts: {retry_attempts} is outside 1..100",
                          "it counts every try, the first included; the default is 5")
    rate_reserve = float(c.get("rate_reserve", (int, float), 0.2))
    if not 0 <= rate_reserve < 1:
        raise ConfigError(f"cloudflare.rate_reserve: {rate_reserve} is outside 0 (none) to below 1",
                          "the default 0.2 leaves 20 % of the token's rate budget to other tools")
    token, key = env.get("CLOUDFLARE_API_TOKEN"), env.get("CLOUDFLARE_API_KEY")
    return CloudflareSettings(
        (env.get("CLOUDFLARE_BASE_URL") or c.get("base_url", str, "") or "https://api.cloudflare.com/client/v4")
        .rstrip("/"),
        Secret(token) if token else None, env.get("CLOUDFLARE_EMAIL") or "",
        Secret(key) if key and not token else None, batch_size,
        _positive(c.data.get("timeout", 30), "cloudflare.timeout"), retry_attempts,
        parse_duration(c.data.get("retry_timeout", 60), "cloudflare.retry_timeout"),
        parse_duration(c.data.get("rate_limit_ceiling", 330), "cloudflare.rate_limit_ceiling"), rate_reserve)


def _rotation(r: _Table) -> RotationSettings:
    r.reject_unknown({"lease_ttl", "on_drift"})
    lease_ttl = parse_duration(r.data.get("lease_ttl", 120), "rotation.lease_ttl")
    on_drift = r.get("on_drift", str, "rotate")
    if on_drift not in ("rotate", "report"):
        raise ConfigError(f"rotation.on_drift: {on_drift!r} is neither \"rotate\" nor \"report\"",
                          "rotate re-keys a drifted tunnel from Vault; report only reports it")
    return RotationSettings(lease_ttl, on_drift)


def _report(t: _Table) -> ReportSettings:
    t.reject_unknown({"directory", "cron", "output", "period"})
    directory = t.get("directory", str, "")
    if not directory:
        raise ConfigError(f"{t.key('directory')}: not set", "name the directory the reports are written to")
    cron = t.get("cron", str, "")
    try:
        next_cron(parse_cron(cron), 0.0, "UTC")
    except ValueError as exc:
        raise ConfigError(f"{t.key('cron')}: {cron!r} is not a cron that fires ({exc})",
                          "use 5 fields: minute hour day-of-month month day-of-week, e.g. \"0 6 1 * *\"") from None
    output = t.get("output", list, ["json", "html"])
    bad = [o for o in output if o not in REPORT_FORMATS]
    if bad or not output:
        raise ConfigError(f"{t.key('output')}: {bad or output!r} not among {', '.join(REPORT_FORMATS)}",
                          "e.g. output = [\"json\", \"html\"]")
    period = parse_duration(t.data.get("period", "30d"), t.key("period"))
    if period < 3600:
        raise ConfigError(f"{t.key('period')}: {period:g}s is shorter than an hour", "e.g. period = \"30d\"")
    return ReportSettings(directory, cron, tuple(dict.fromkeys(output)), period)


def _admin(a: _Table, env: Mapping[str, str]) -> AdminSettings:
    a.reject_unknown({"listen", "token_file", "queue", "advertise_url"})
    listen = a.get("listen", str, "127.0.0.1:9477")
    split_listen(listen)
    queue = a.get("queue", int, 16)
    if not 1 <= queue <= 1000:
        raise ConfigError(f"admin.queue: {queue} is outside 1..1000", "the default is 16")
    token = env.get("ROTATOR_ADMIN_TOKEN")
    if a.get("token_file", str, ""):
        token = _read_secret_file(a.data["token_file"], "admin.token_file")
    advertise = env.get("ROTATOR_ADMIN_ADVERTISE_URL") or a.get("advertise_url", str, "")
    if advertise:
        check_admin_url(advertise, "admin.advertise_url")
    return AdminSettings(listen, Secret(token) if token else None, queue, advertise.rstrip("/"))


def check_admin_url(url: str, key: str) -> str:
    """An admin API base URL: http(s)://HOST[:PORT], nothing else (no user, path or query)."""
    from urllib.parse import urlsplit

    hint = "write it like http://10.0.0.5:9477 (the daemon's admin API as this host reaches it)"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # raises ValueError for a bad port
    except ValueError:
        raise ConfigError(f"{key}: {url!r} is not a URL", hint) from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password \
            or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{key}: {url!r} is not an http(s)://HOST:PORT address", hint)
    return url.rstrip("/")


def _accounts(root: _Table, policies: Mapping[str, Policy]) -> tuple[Account, ...]:
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
        for j, sel in enumerate(sels_raw):
            if not isinstance(sel, dict):
                raise ConfigError(f"{t.key('select')}[{j}]: expected a table", "write [[accounts.select]] blocks")
        sels = tuple(_selection(_Table(s, f"{t.key('select')}[{j}]"), policies) for j, s in enumerate(sels_raw))
        accounts.append(Account(acc_id, sels))
    return tuple(accounts)


def _positive(value: Any, key: str) -> float:
    seconds = parse_duration(value, key)
    if seconds <= 0:
        raise ConfigError(f"{key}: must be longer than 0s", "a call with no time to finish always fails")
    return seconds


def _read_secret_file(path: str, key: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            value = fh.read().strip()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path} ({exc.strerror})", "check the path and its permissions") from None
    if not value:
        raise ConfigError(f"{key}: {path} is empty", "write the secret into the file")
    return value
