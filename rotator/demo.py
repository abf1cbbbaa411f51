"""``rotator demo``: the daemon against the built-in simulators, on a fast schedule, with a far end.

The first account's tunnels go through a simulated device (the ``webhook`` kind, rotator/sim/device.py):
each key is delivered to it before Cloudflare applies it, and verified there after. The second
account's tunnels are rotated at Cloudflare and in Vault only. The third account's tunnels end on
AWS Site-to-Site VPN connections (the ``aws_vpn`` kind against the EC2 fake, rotator/sim/aws.py: two
tunnels per connection, each replaced for a few seconds, one tunnel of a connection at a time).

``rotator demo --ike`` replaces the simulated device with real IKE peers (rotator/sim/ike): two
strongSwan charons in network namespaces, the Cloudflare simulator's edge loading every applied key,
and the ``strongswan`` device kind driving the site charon (deliver, forced re-authentication).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
import threading
from typing import Any

from rotator import config as config_mod
from rotator.errors import ConfigError, RotatorError
from rotator.httpserver import stop_on_signals
from rotator.service.daemon import build_daemon
from rotator.service.logging import Redactor, configure

IKE_TUNNELS = 4
IKE_DEVICE_CONCURRENCY = 4  # charon's vici backlog refuses many more simultaneous connects


def run_demo(listen: str, ike: bool = False) -> int:
    """The daemon against the built-in simulators, on a fast schedule."""
    from rotator.sim.ike import unavailable  # no strongSwan import: the lab's modules load lazily

    lab_missing = unavailable()
    if ike and lab_missing:
        raise ConfigError(f"rotator demo --ike cannot start: {lab_missing}",
                          "run it as root on a machine with strongSwan, or run rotator demo without --ike")
    stop = stop_on_signals()
    workdir = tempfile.mkdtemp(prefix="psk-rotator-demo-")
    try:
        with contextlib.ExitStack() as cleanup:
            return _demo(listen, stop, workdir, cleanup, ike=ike, hint=not ike and lab_missing is None)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # the admin token, config and device key go with it


def _private_file(path: str, text: str) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path


def _demo(listen: str, stop: threading.Event, workdir: str, cleanup: contextlib.ExitStack, *, ike: bool,
          hint: bool) -> int:
    from rotator.sim import Simulators  # only the demo needs the simulators

    token_file = _private_file(os.path.join(workdir, "admin-token"), secrets.token_urlsafe(24))
    if ike:
        sims, device_block, far_end, watch = _ike_far_end(workdir, cleanup)
    else:
        sims = Simulators(accounts=3, tunnels=4, aws=True, aws_account=2, aws_replacement=AWS_REPLACEMENT)
        cleanup.callback(sims.stop)
        sims.start()
        device_block, far_end, watch = _simulated_far_end(sims, workdir, cleanup)
        aws_block, aws_watch = _aws_far_end(sims)
        device_block, watch = device_block + aws_block, watch + "\n" + aws_watch
    accounts = "".join(f'[[accounts]]\nid = "{acc}"\n' for acc in sims.tunnels_by_account)
    reports = os.path.join(workdir, "reports")
    cfg = os.path.join(workdir, "rotator.toml")
    with open(cfg, "w", encoding="utf-8") as fh:
        fh.write(f'[admin]\nlisten = "{listen}"\ntoken_file = "{token_file}"\n[rotation]\nlease_ttl = "60s"\n'
                 # the simulators answer at once; a lease must outlive two call deadlines
                 '[cloudflare]\ntimeout = "10s"\n'
                 f'[policies.default]\nevery = "20s"\njitter = "10s"\nmax_age = "60s"\nretry_backoff = "5s"\n'
                 # keys every kind takes, AWS's rules included (8-64 of A-Z a-z 0-9 . _, not 0 first)
                 f'retry_backoff_max = "30s"\npsk_charset = "aws"\n'
                 f'[report]\ndirectory = "{reports}"\ncron = "*/5 * * * *"\noutput = ["json", "html"]\nperiod = "1h"\n'
                 f'{accounts}{device_block}')
    redactor = Redactor()
    aws_secret = [sims.aws_sim.secret_key] if sims.aws_sim is not None else []
    for value in (sims.vault_token, sims.cloudflare_api_token, *aws_secret):
        redactor.add(value)
    configure(redactor)  # stderr: the demo's stdout carries its instructions
    settings = config_mod.load(cfg, env=sims.env())
    daemon = build_daemon(settings, redactor, tick_seconds=5.0)
    cleanup.callback(daemon.stop)
    try:
        daemon.start()
    except ConfigError as exc:
        raise ConfigError(exc.message, "pass --listen HOST:PORT with a free port") from None
    acc = next(iter(sims.tunnels_by_account))
    url = daemon.admin_url
    ready: dict[str, Any] = {"event": "demo_ready", "admin_url": url, "metrics_url": f"{url}/metrics",
                             "accounts": list(sims.tunnels_by_account), "far_end": far_end, "simulators": {
                                 "vault": sims.vault_addr, "cloudflare": sims.cloudflare_base_url}}
    if sims.aws_sim is not None:
        ready["aws"] = _aws_end(sims)
    print(json.dumps(ready), flush=True)
    n = sum(map(len, sims.tunnels_by_account.values()))
    print(f"""
psk-rotator demo: the daemon rotates {n} simulated tunnels in {len(sims.tunnels_by_account)} account(s) every \
20-30 s (the first rotation within 10 s).
{watch}
  Admin API : {url}
  Metrics   : {url}/metrics      e.g. curl -s {url}/metrics | grep psk_rotator_rotations_total
  Rotate now: curl -s -X POST -H "Authorization: Bearer $(cat {token_file})" \\
                -d '{{"account": "{acc}", "all": true}}' {url}/v1/rotations
  Status    : curl -s -H "Authorization: Bearer $(cat {token_file})" {url}/v1/status
  Evidence  : audit reports (rotator report) in {reports}, the first once every tunnel has rotated, then every 5 \
minutes""", flush=True)
    if hint:
        print("Hint: root and strongSwan are here: rotator demo --ike runs the demo against real IKE peers.",
              flush=True)
    print("Ctrl-C stops it.", flush=True)
    threading.Thread(target=_first_report, args=(daemon, sims, stop), name="demo-report", daemon=True).start()
    stop.wait()
    return 0


def _first_report(daemon: Any, sims: Any, stop: threading.Event) -> None:
    """Once every tunnel has a verified rotation in Vault, write the accounts' audit reports and say where."""
    tunnels = [(acc, t) for acc, ids in sims.tunnels_by_account.items() for t in ids]
    for _ in range(120):  # bounded: about a minute
        if all((sims.vault.read_data(f"cloudflare/magic-ipsec/{acc}/{t}") or {}).get("verified_by")
               for acc, t in tunnels):
            break
        if stop.wait(0.5):
            return
    else:
        return
    paths = daemon.write_reports()
    if paths and not stop.is_set():
        print(f"Audit evidence: {' '.join(paths)} (check one with: rotator report --check FILE.json)", flush=True)


AWS_REPLACEMENT = 3.0  # seconds the EC2 fake takes to replace a tunnel endpoint (AWS: minutes)


def _aws_far_end(sims: Any) -> tuple[str, str]:
    """The third account's tunnels on AWS Site-to-Site VPN (the EC2 fake): the aws_vpn kind finds
    them by customer endpoint, through boto3 with the fake's credentials in the standard variables."""
    os.environ.update({k: v for k, v in sims.env().items() if k.startswith("AWS_")})  # boto3's own chain
    block = sims.aws_config(name="demo-aws", verify_timeout="60s") + f'accounts = ["{_aws_end(sims)["account"]}"]\n'
    end = _aws_end(sims)
    watch = (f"  AWS       : account {end['account']}'s tunnels end on {len(end['vpn_connection_ids'])} AWS VPN "
             f"connections (aws_vpn kind, EC2 fake {end['endpoint']});\n"
             "              each modification replaces the tunnel for a few seconds, one tunnel of a connection "
             "at a time.\n"
             f"  AWS state : curl -s {end['state_url']}")
    return block, watch


def _aws_end(sims: Any) -> dict[str, Any]:
    info = sims.info()["aws"]
    acc = list(sims.tunnels_by_account)[sims.aws_account]
    return {"account": acc, "endpoint": info["endpoint"], "state_url": info["endpoint"] + "/_sim/state",
            "vpn_connection_ids": info["vpn_connection_ids"], "device": "demo-aws"}


def _simulated_far_end(sims: Any, workdir: str, cleanup: contextlib.ExitStack) -> tuple[str, dict[str, Any], str]:
    """The first account's tunnels through the simulated device, whose verification succeeds only
    when Cloudflare's simulator holds the same key (a fresh IKE authentication would)."""
    from rotator.sim import device

    acc, *others = list(sims.tunnels_by_account)
    others = others[:1]
    dev = device.start(workdir, peer=sims.cloudflare.psk_of)
    cleanup.callback(dev.stop)
    block = dev.config("demo-device") + f'accounts = ["{acc}"]\n'
    state = dev.server.url + "/_sim/state"
    far_end = {"kind": "webhook", "device": "demo-device", "account": acc, "url": dev.url, "state_url": state}
    others_text = f"account {others[0]}'s are rotated at Cloudflare only" if others else ""
    watch = (f"  Far end   : account {acc}'s tunnels go through a simulated device (webhook kind, {dev.url});\n"
             f"              {others_text}. Each key reaches the device before Cloudflare applies it.\n"
             f"  Device    : curl -s {state}      (the key each tunnel holds there, as a sha256 fingerprint)")
    return block, far_end, watch


def _ike_far_end(workdir: str, cleanup: contextlib.ExitStack) -> tuple[Any, str, dict[str, Any], str]:
    """Real IKE peers: the Cloudflare simulator's tunnels in the lab (its edge loads every applied
    key), each established from the site, and the strongswan device driving the site's charon."""
    from rotator.sim import Simulators
    from rotator.sim.ike import Lab, LabError, attach

    lab = Lab(threads=16)
    cleanup.callback(lab.stop)
    sims = Simulators(accounts=1, tunnels=0)
    acc = next(iter(sims.tunnels_by_account))
    pairs = [(sims.cloudflare.add_tunnel(acc, name=f"lab-{i}"), f"lab-{i}") for i in range(IKE_TUNNELS)]
    sims.tunnels_by_account[acc] = [tid for tid, _ in pairs]
    try:
        lab.start()
        attach(lab, sims.cloudflare, acc, pairs)
        lab.up(timeout=30)
    except LabError as exc:
        raise RotatorError(f"the IKE lab did not come up: {exc}", "try again, or run rotator demo without --ike") \
            from None
    cleanup.callback(sims.stop)
    sims.start()
    block = ('[[devices]]\nname = "lab-site"\nkind = "strongswan"\ntunnels = ["*"]\ntimeout = "20s"\n'
             f'concurrency = {IKE_DEVICE_CONCURRENCY}\nsocket = "{lab.site.vici_socket}"\n'
             'owners = ["{tunnel_id}.site.lab"]\n')
    site = f"ip netns exec {lab.site_ns} swanctl --list-sas --uri unix://{lab.site.vici_socket}"
    edge = f"ip netns exec {lab.edge_ns} swanctl --list-sas --uri unix://{lab.edge.vici_socket}"
    far_end = {"kind": "strongswan", "device": "lab-site", "account": acc, "namespaces": [lab.edge_ns, lab.site_ns],
               "site_sas": site, "edge_sas": edge, "charon_pids": [lab.edge.pid, lab.site.pid]}
    watch = (f"  IKE lab   : {IKE_TUNNELS} real IPsec tunnels between two strongSwan charons in network namespaces\n"
             f"              {lab.edge_ns} (Cloudflare's edge) and {lab.site_ns} (the customer's site).\n"
             "              Each rotation loads the key at the site, applies it at the edge and re-authenticates.\n"
             f"  Site SAs  : {site}\n"
             f"  Edge SAs  : {edge}\n"
             "              (the edge's SAs feed the Cloudflare simulator's tunnel health, GraphQL)")
    return sims, block, far_end, watch
