"""Who is due when: pure functions of a policy, a tunnel's last rotation and a clock.

The schedule keeps no state of its own. A tunnel's next rotation follows from when its ``psk``
became current (Vault's ``rotated_at``, else Cloudflare's ``last_generated_on``), so a restart or
an outage never skips a rotation: an overdue tunnel is simply due now.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from rotator.psk import PskPolicy

_NAMES = {"jan": 1, "feb": 2, "mar": 3, "apr": 4, "may": 5, "jun": 6, "jul": 7, "aug": 8, "sep": 9,
          "oct": 10, "nov": 11, "dec": 12, "sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
_BOUNDS = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
_HORIZON_DAYS = 4 * 366


@dataclass(frozen=True)
class Window:
    days: tuple[int, ...]  # 0 = Monday
    start_minute: int
    end_minute: int
    timezone: str


@dataclass(frozen=True)
class Policy:
    name: str
    every: float | None = None
    cron: str | None = None
    timezone: str = "UTC"
    window: Window | None = None
    max_age: float | None = None
    jitter: float = 0.0
    retry_backoff: float = 300.0
    retry_backoff_max: float = 6 * 3600.0
    psk: PskPolicy = field(default_factory=PskPolicy)


@dataclass(frozen=True)
class Cron:
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    dom_any: bool
    dow_any: bool

    def day_matches(self, d: datetime) -> bool:
        if d.month not in self.months:
            return False
        dom = d.day in self.days
        dow = (d.isoweekday() % 7) in self.weekdays
        if self.dom_any or self.dow_any:
            return dom and dow
        return dom or dow  # classic cron: either field may match when both are restricted


def parse_cron(expr: str) -> Cron:
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"{expr!r} has {len(fields)} fields, not 5")
    sets = []
    for text, (lo, hi) in zip(fields, _BOUNDS, strict=True):
        values: set[int] = set()
        for part in text.lower().split(","):
            base, _, step_text = part.partition("/")
            step = int(step_text) if step_text.isdigit() and int(step_text) > 0 else (1 if not step_text else -1)
            if step < 0:
                raise ValueError(f"bad step in {part!r}")
            if base == "*":
                start, end = lo, hi
            else:
                a, _, b = base.partition("-")
                start = _value(a, lo, hi)
                end = _value(b, lo, hi) if b else (hi if step_text else start)
            if start > end:
                raise ValueError(f"range {part!r} runs backwards")
            values.update(range(start, end + 1, step))
        sets.append(values)
    weekdays = {d % 7 for d in sets[4]}
    return Cron(frozenset(sets[0]), frozenset(sets[1]), frozenset(sets[2]), frozenset(sets[3]), frozenset(weekdays),
                fields[2] == "*", fields[4] == "*")


def _value(text: str, lo: int, hi: int) -> int:
    value = _NAMES[text] if text in _NAMES else int(text) if text.isdigit() else None
    if value is None or not lo <= value <= hi:
        raise ValueError(f"{text!r} is outside {lo}..{hi}")
    return value


def next_cron(cron: Cron, after: float, tz: str) -> float:
    """The first fire time strictly after ``after`` (a UNIX time), evaluated in ``tz``."""
    zone = ZoneInfo(tz)
    start = datetime.fromtimestamp(after, zone).replace(second=0, microsecond=0) + timedelta(minutes=1)
    day = start.replace(hour=0, minute=0)
    for offset in range(_HORIZON_DAYS):
        d = day + timedelta(days=offset)
        if not cron.day_matches(d):
            continue
        for hour in sorted(cron.hours):
            for minute in sorted(cron.minutes):
                candidate = datetime(d.year, d.month, d.day, hour, minute, tzinfo=zone)
                if candidate >= start:
                    return candidate.timestamp()
    raise ValueError("cron expression never fires")


def in_window(window: Window, ts: float) -> bool:
    local = datetime.fromtimestamp(ts, ZoneInfo(window.timezone))
    minute = local.hour * 60 + local.minute
    if window.start_minute < window.end_minute:
        return local.weekday() in window.days and window.start_minute <= minute < window.end_minute
    # Overnight window: it belongs to the day it opens on.
    yesterday = (local.weekday() - 1) % 7
    return (local.weekday() in window.days and minute >= window.start_minute) or \
        (yesterday in window.days and minute < window.end_minute)


def next_window_open(window: Window, ts: float) -> float:
    """``ts`` itself if inside the window, else the next opening."""
    if in_window(window, ts):
        return ts
    zone = ZoneInfo(window.timezone)
    local = datetime.fromtimestamp(ts, zone)
    for offset in range(8):
        d = local + timedelta(days=offset)
        if d.weekday() not in window.days:
            continue
        opening = datetime(d.year, d.month, d.day, window.start_minute // 60, window.start_minute % 60, tzinfo=zone)
        if opening.timestamp() > ts:
            return opening.timestamp()
    raise ValueError("window never opens")


def spread(tunnel_id: str, jitter: float) -> float:
    """A stable per-tunnel offset in [0, jitter), so a fleet does not rotate in one burst."""
    if jitter <= 0:
        return 0.0
    digest = hashlib.sha256(tunnel_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * jitter


def backoff(policy: Policy, failures: int) -> float:
    """Wait after ``failures`` consecutive failed attempts: exponential, capped."""
    if failures <= 0:
        return 0.0
    return float(min(policy.retry_backoff * 2 ** (failures - 1), policy.retry_backoff_max))


def next_due(policy: Policy, tunnel_id: str, last_rotated: float | None, now: float,
             failures: int = 0, last_failure: float | None = None) -> float:
    """When this tunnel is next due (a time <= now means due now). Never rotated: due now."""
    if last_rotated is None:
        due = now
    else:
        if policy.every is not None:
            due = last_rotated + policy.every
        else:
            assert policy.cron is not None
            due = next_cron(parse_cron(policy.cron), last_rotated, policy.timezone)
        due += spread(tunnel_id, policy.jitter)
        if policy.max_age is not None:
            due = min(due, last_rotated + policy.max_age)
    if failures and last_failure is not None:
        due = max(due, last_failure + backoff(policy, failures))
    if policy.window is not None:
        due = next_window_open(policy.window, max(due, now) if due <= now else due)
    return due


def parse_time(text: str | None) -> float | None:
    """An RFC 3339 time as a UNIX time, or None."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC).timestamp()
    except ValueError:
        return None


DURATION_UNITS = (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def format_duration(seconds: float) -> str:
    """A duration as a config file writes it (``20d``, ``120s``, ``15m``), never ``1.728e+06s``: seconds
    under ten minutes (as timeouts and lease TTLs are written), else the largest unit that divides it
    exactly; a fraction of a second keeps its decimals (``1.5s``)."""
    if seconds != int(seconds) or seconds <= 0:
        return f"{round(seconds, 3):.3f}".rstrip("0").rstrip(".") + "s"
    whole = int(seconds)
    if whole < 600:
        return f"{whole}s"
    for unit, size in DURATION_UNITS:
        if whole % size == 0:
            return f"{whole // size}{unit}"
    return f"{whole}s"
