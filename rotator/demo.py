"""``rotator demo``: the daemon against the built-in simulators, on a fast schedule."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import threading

from rotator import config as config_mod
from rotator.errors import ConfigError, RotatorError
from rotator.httpserver import stop_on_signals
from rotator.service.daemon import build_daemon
from rotator.service.logging import Redactor, configure


def run_demo(listen: str) -> int:
    """The daemon against the built-in simulators, on a fast schedule."""
    stop = stop_on_signals()
    workdir = tempfile.mkdtemp(prefix="psk-rotator-demo-")
    try:
        return _demo(listen, stop, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # the admin token and config go with it


def _demo(listen: str, stop: threading.Event, workdir: str) -> int:
    from rotator.sim import Simulators  # only the demo needs the simulators

    sims = Simulators(accounts=2, tunnels=4).start()
    token_file = os.path.join(workdir, "admin-token")
    with open(token_file, "w", encoding="utf-8") as fh:
        fh.write(secrets.token_urlsafe(24))
    os.chmod(token_file, 0o600)
    accounts = "".join(f'[[accounts]]\nid = "{acc}"\n' for acc in sims.tunnels_by_account)
    cfg = os.path.join(workdir, "rotator.toml")
    with open(cfg, "w", encoding="utf-8") as fh:
        fh.write(f'[admin]\nlisten = "{listen}"\ntoken_file = "{token_file}"\n[rotation]\nlease_ttl = "30s"\n'
                 # the simulators answer at once; a lease must outlive two call deadlines
                 '[cloudflare]\ntimeout = "10s"\n'
                 f'[policies.default]\nevery = "20s"\njitter = "10s"\nmax_age = "60s"\nretry_backoff = "5s"\n'
                 f'retry_backoff_max = "30s"\n{accounts}')
    redactor = Redactor()
    for value in (sims.vault_token, sims.cloudflare_api_token):
        redactor.add(value)
    configure(redactor)  # stderr: the demo's stdout carries its instructions
    try:
        settings = config_mod.load(cfg, env=sims.env())
        daemon = build_daemon(settings, redactor, tick_seconds=5.0)
    except RotatorError:
        sims.stop()
        raise
    try:
        daemon.start()
    except ConfigError as exc:
        daemon.stop()
        sims.stop()
        raise ConfigError(exc.message, "pass --listen HOST:PORT with a free port") from None
    acc = next(iter(sims.tunnels_by_account))
    url = daemon.admin_url
    print(json.dumps({"event": "demo_ready", "admin_url": url, "metrics_url": f"{url}/metrics",
                      "accounts": list(sims.tunnels_by_account), "simulators": {
                          "vault": sims.vault_addr, "cloudflare": sims.cloudflare_base_url}}), flush=True)
    print(f"""
psk-rotator demo: the daemon rotates {sum(map(len, sims.tunnels_by_account.values()))} simulated tunnels in
{len(sims.tunnels_by_account)} accounts every 20-30 s (the first rotation within 10 s).
  Admin API : {url}
  Metrics   : {url}/metrics      e.g. curl -s {url}/metrics | grep psk_rotator_rotations_total
  Rotate now: curl -s -X POST -H "Authorization: Bearer $(cat {token_file})" \\
                -d '{{"account": "{acc}", "all": true}}' {url}/v1/rotations
  Status    : curl -s -H "Authorization: Bearer $(cat {token_file})" {url}/v1/status
Ctrl-C stops it.
""", flush=True)
    stop.wait()
    daemon.stop()
    sims.stop()
    return 0
