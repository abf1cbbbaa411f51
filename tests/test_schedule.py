"""Schedule rules as pure functions with a fixed clock."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from rotator.schedule import Policy, Window, backoff, in_window, next_cron, next_due, parse_cron, spread

DAY = 86400.0


def ts(y, mo, d, h=0, mi=0, tz="UTC"):
    return datetime(y, mo, d, h, mi, tzinfo=ZoneInfo(tz)).timestamp()


def test_every_is_due_after_the_interval():
    p = Policy("p", every=30 * DAY)
    last = ts(2026, 1, 1)
    assert next_due(p, "t", last, now=last + 29 * DAY) == last + 30 * DAY
    assert next_due(p, "t", last, now=last + 31 * DAY) <= last + 31 * DAY


def test_never_rotated_is_due_now():
    now = ts(2026, 3, 3, 12)
    assert next_due(Policy("p", every=DAY), "t", None, now) == now


def test_overdue_after_an_outage_is_due_now_not_skipped():
    p = Policy("p", every=7 * DAY)
    last = ts(2026, 1, 1)
    now = last + 40 * DAY
    assert next_due(p, "t", last, now) <= now


def test_cron_in_a_timezone():
    p = Policy("p", cron="0 3 * * 6", timezone="Europe/Berlin")  # Saturdays 03:00 Berlin
    last = ts(2026, 6, 1)  # a Monday
    due = datetime.fromtimestamp(next_due(p, "t", last, last), ZoneInfo("Europe/Berlin"))
    assert (due.weekday(), due.hour, due.minute, due.day) == (5, 3, 0, 6)


def test_cron_fields():
    c = parse_cron("*/15 1-2 1,15 * *")
    after = ts(2026, 1, 1, 1, 50)
    assert next_cron(c, after, "UTC") == ts(2026, 1, 1, 2, 0)
    assert next_cron(c, ts(2026, 1, 1, 2, 45), "UTC") == ts(2026, 1, 15, 1, 0)
    with pytest.raises(ValueError):
        parse_cron("61 * * * *")
    with pytest.raises(ValueError):
        parse_cron("* * *")


def test_window_blocks_rotation_outside_it():
    window = Window(days=(5,), start_minute=120, end_minute=300, timezone="Europe/Berlin")  # Sat 02:00-05:00
    p = Policy("p", every=DAY, window=window)
    last = ts(2026, 6, 1)  # Monday
    now = ts(2026, 6, 3, 12)  # Wednesday: overdue but outside the window
    due = next_due(p, "t", last, now)
    assert due > now
    local = datetime.fromtimestamp(due, ZoneInfo("Europe/Berlin"))
    assert (local.weekday(), local.hour) == (5, 2)
    assert in_window(window, due) and not in_window(window, now)
    inside = ts(2026, 6, 6, 3, 30, "Europe/Berlin")
    assert next_due(p, "t", last, inside) == inside


def test_overnight_window():
    window = Window(days=(4,), start_minute=22 * 60, end_minute=2 * 60, timezone="UTC")  # Fri 22:00-Sat 02:00
    assert in_window(window, ts(2026, 6, 5, 23))
    assert in_window(window, ts(2026, 6, 6, 1))
    assert not in_window(window, ts(2026, 6, 6, 3))


def test_jitter_spreads_a_fleet_and_is_stable():
    offsets = [spread(f"tunnel-{i}", 3600) for i in range(200)]
    assert all(0 <= o < 3600 for o in offsets)
    assert len({int(o // 360) for o in offsets}) == 10  # every tenth of the hour is used
    assert spread("tunnel-1", 3600) == offsets[1]


def test_max_age_caps_a_cron_schedule():
    p = Policy("p", cron="0 0 1 1 *", max_age=10 * DAY)  # yearly cron, but keys live 10 days at most
    last = ts(2026, 2, 1)
    assert next_due(p, "t", last, last) == last + 10 * DAY


def test_failures_back_off_exponentially_with_a_cap():
    p = Policy("p", every=DAY, retry_backoff=60, retry_backoff_max=600)
    assert [backoff(p, n) for n in range(6)] == [0, 60, 120, 240, 480, 600]
    now = ts(2026, 1, 10)
    assert next_due(p, "t", None, now, failures=3, last_failure=now) == now + 240


def test_timestamps_are_utc_aware():
    assert datetime.fromtimestamp(ts(2026, 1, 1), UTC).hour == 0
