"""One rotation-at-scale scenario in a fresh process (clean peak RSS): ours, ours with a far-end
device, or the peer script.

    python tests/bench/scale.py ours N ACCOUNTS [CF_LATENCY VAULT_LATENCY]
    python tests/bench/scale.py exec N ACCOUNTS [CF_LATENCY VAULT_LATENCY]     a trivial exec hook
    python tests/bench/scale.py simdev N ACCOUNTS [CF_LATENCY VAULT_LATENCY [VERIFY_LATENCY]]
    python tests/bench/scale.py peer N 1 [CF_LATENCY VAULT_LATENCY]

``exec`` and ``simdev`` configure one ``[[devices]]`` block for every tunnel, through the config file
and the wiring the daemon uses: a hook that reads its input and succeeds (the exec machinery alone),
or the simulated device (webhook kind) in its own process at VERIFY_LATENCY seconds per verified
tunnel (default 0.2). Prints one JSON line with the measurements.
"""

from __future__ import annotations

import json
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])

from tests.bench.common import Meter, counts, device_process, env_of, sim_cpu_seconds, simulators
from tests.bench.devices import trivial_hook


def prepare_ours(info, config_text: str = "", workdir: str = ""):
    """Start-up (imports, clients, Vault login) happens before the meter, as in a running daemon."""
    import logging

    import structlog

    from rotator import config
    from rotator.rotation.engine import RunRequest
    from rotator.wiring import build_runtime, preflight

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    path = None
    if config_text:
        path = str(Path(workdir) / "rotator.toml")
        Path(path).write_text(config_text)
    rt = build_runtime(config.load(path, env=env_of(info)))
    preflight(rt)

    def run(accounts):
        rotated = 0
        try:
            for acc in accounts:
                report = rt.engine.run(RunRequest(acc, **rt.request_options(acc)))
                rotated += report.counts()["rotated"]
                for step, seconds in report.step_seconds.items():  # where the wall time goes
                    steps[step] = steps.get(step, 0.0) + seconds
            return rotated
        finally:
            rt.close()

    steps: dict[str, float] = {}
    run.steps = steps
    return run


def prepare_peer(info):
    """What a user would write instead: per tunnel, psk_generate with the SDK, then an hvac write."""
    import cloudflare
    import hvac

    cf = cloudflare.Cloudflare(api_token=info["cloudflare_api_token"], base_url=info["cloudflare_base_url"])
    vault = hvac.Client(url=info["vault_addr"], token=info["vault_token"])
    return lambda accounts: peer(cf, vault, accounts)


def peer(cf, vault, accounts):
    rotated = 0
    for acc in accounts:
        for tunnel in cf.magic_transit.ipsec_tunnels.list(account_id=acc).ipsec_tunnels:
            new = cf.magic_transit.ipsec_tunnels.psk_generate(tunnel.id, account_id=acc)
            vault.secrets.kv.v2.create_or_update_secret(f"cloudflare/magic-ipsec/{acc}/{tunnel.id}",
                                                        secret={"psk": new.psk})
            rotated += 1
    return rotated


def main() -> None:
    kind, n, n_accounts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    cf_latency = float(sys.argv[4]) if len(sys.argv) > 4 else 0.05
    vault_latency = float(sys.argv[5]) if len(sys.argv) > 5 else 0.002
    verify_latency = float(sys.argv[6]) if len(sys.argv) > 6 else 0.2
    extra: dict = {}
    with ExitStack() as stack:
        info = stack.enter_context(simulators(n_accounts, n // n_accounts, cf_latency, vault_latency))
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-scale-"))
        accounts = list(info["accounts"])
        if kind == "peer":
            run = prepare_peer(info)
        elif kind == "exec":
            run = prepare_ours(info, '[[devices]]\nname = "hook"\nkind = "exec"\ntunnels = ["*"]\n'
                                     f'command = ["{trivial_hook(workdir)}"]\n', workdir)
        elif kind == "simdev":
            url, key, state = stack.enter_context(device_process(workdir, verify_latency))
            run = prepare_ours(info, '[[devices]]\nname = "sim"\nkind = "webhook"\ntunnels = ["*"]\n'
                                     f'url = "{url}"\nsecret_file = "{key}"\n', workdir)
            extra["device_state"] = state
        else:
            run = prepare_ours(info)
        cf0, v0 = counts(info)
        sim0 = sim_cpu_seconds(info)
        with Meter() as m:
            rotated = run(accounts)
        # The simulators serve from one process (one GIL): a share near 1.0 of a core would make
        # them, not the rotator, the bottleneck.
        extra["sim_cpu_s"] = round(sim_cpu_seconds(info) - sim0, 3)
        extra["sim_share_of_wall"] = round(extra["sim_cpu_s"] / m.wall, 3) if m.wall else None
        cf1, v1 = counts(info)
        if getattr(run, "steps", None):
            extra["steps_s"] = {k: round(v, 2) for k, v in run.steps.items()}
        if "device_state" in extra:
            import httpx

            extra["device_calls"] = sum(httpx.get(extra.pop("device_state")).json()["result"]["request_counts"].values())
    print(json.dumps({"kind": kind, "n": n, "accounts": n_accounts, "rotated": rotated, "wall_s": round(m.wall, 3),
                      "cpu_s": round(m.cpu, 3), "cpu_us_per_tunnel": round(m.cpu / n * 1e6, 1),
                      "peak_rss_mb": round(m.peak_rss_mb, 1), "cloudflare_calls": cf1 - cf0, "vault_calls": v1 - v0,
                      **extra}))


if __name__ == "__main__":
    main()
