"""``[report]``: the daemon writes the audit report on its cron (APScheduler), one file per account,
period and format, atomically; the section's bad values are one-line config errors."""

from __future__ import annotations

import json
import os
import time

import pytest

from rotator import config
from rotator.errors import ConfigError
from rotator.service import report as rpt
from rotator.service.daemon import build_daemon
from tests.helpers import OUTPUTS, assert_invariant, record, wait_for, write_config
from tests.test_daemon import ADMIN, daemon_config


def test_the_daemon_schedules_and_writes_the_report_of_the_accounts_it_leads(sims, tmp_path) -> None:
    acc = next(iter(sims.tunnels_by_account))
    out = tmp_path / "evidence"
    extra = f'[report]\ndirectory = "{out}"\ncron = "0 6 1 * *"\noutput = ["json", "csv"]\nperiod = "60d"\n'
    d = build_daemon(daemon_config(sims, tmp_path, extra=extra), tick_seconds=3600)
    d.start(serve_admin=False)
    try:
        wait_for(lambda: all((record(sims, acc, t) or {}).get("verified_by") for t in sims.tunnels_by_account[acc]),
                 what="the first rotation of every tunnel")
        assert d._scheduler is not None and d._scheduler.get_job("report") is not None
        fires = d._report_at
        assert fires is not None and time.strftime("%d %H:%M", time.gmtime(fires)) == "01 06:00"
        assert d.report_if_due() == []  # not yet
        d.clock = lambda: fires + 1.0
        paths = d.report_if_due()
        assert d._report_at is not None and d._report_at > fires + 27 * 86400  # the next first of a month
    finally:
        d.stop()
    names = sorted(os.path.basename(p) for p in paths)
    assert len(names) == 2 and all(n.startswith(f"psk-report-{acc}-") for n in names)
    assert [n.rsplit(".", 1)[1] for n in names] == ["csv", "json"]
    assert sorted(os.listdir(out)) == names  # no temporary file left behind
    made = json.loads((out / names[1]).read_text())
    OUTPUTS.extend([(out / n).read_text() for n in names])
    assert rpt.intact(made)
    assert made["fleet"]["rotations"] == 6 and made["fleet"]["rotations_by_proof"] == {"none": 6}
    start, end = (rpt.vault_time(made["period"][k]) for k in ("from", "to"))
    assert start is not None and end is not None and end - start == 60 * 86400
    assert names[1] == rpt.file_stem(acc, start, end) + ".json"
    assert_invariant(sims, acc, strict=True)


def test_a_replica_that_does_not_lead_writes_nothing(sims, tmp_path) -> None:
    extra = f'[report]\ndirectory = "{tmp_path / "r"}"\ncron = "0 6 * * *"\n'
    d = build_daemon(daemon_config(sims, tmp_path, extra=extra), tick_seconds=3600)
    assert d.write_reports() == []
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(("section", "message"), [
    ('cron = "0 6 * * *"\n', "report.directory: not set"),
    ('directory = "/tmp/x"\ncron = "0 0 31 2 *"\n', "report.cron: '0 0 31 2 *' is not a cron that fires"),
    ('directory = "/tmp/x"\ncron = "0 6 * * *"\noutput = ["pdf"]\n', "report.output: ['pdf'] not among json"),
    ('directory = "/tmp/x"\ncron = "0 6 * * *"\nperiod = "10m"\n', "report.period: 600s is shorter than an hour"),
    ('directory = "/tmp/x"\ncron = "0 6 * * *"\nformat = "json"\n', "report"),
])
def test_bad_report_settings_are_one_line_errors(sims, tmp_path, section: str, message: str) -> None:
    path = write_config(tmp_path, f"[report]\n{section}")
    with pytest.raises(ConfigError) as err:
        config.load(path, env={**sims.env(), "ROTATOR_ADMIN_TOKEN": ADMIN})
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_failed_write_leaves_the_old_file_and_no_part(tmp_path, monkeypatch) -> None:
    target = tmp_path / "r.json"
    target.write_text("old")

    def refuse(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError):
        rpt.write_atomic(str(target), "new")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["r.json"]
