"""One rotation-at-scale scenario in a fresh process (clean peak RSS): ours or the peer script.

    python tests/bench/scale.py ours N ACCOUNTS [CF_LATENCY VAULT_LATENCY]
    python tests/bench/scale.py peer N 1 [CF_LATENCY VAULT_LATENCY]

Prints one JSON line with the measurements.
"""

from __future__ import annotations

import json
import sys

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])

from tests.bench.common import Meter, counts, env_of, simulators


def prepare_ours(info):
    """Start-up (imports, clients, Vault login) happens before the meter, as in a running daemon."""
    from rotator import config
    from rotator.rotation.engine import RunRequest
    from rotator.wiring import build_runtime, preflight

    rt = build_runtime(config.load(None, env=env_of(info)))
    preflight(rt)

    def run(accounts):
        rotated = sum(rt.engine.run(RunRequest(acc)).counts()["rotated"] for acc in accounts)
        rt.close()
        return rotated

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
    cf_latency = float(sys.argv[4]) if len(sys.argv) > 4 else 0.08
    vault_latency = float(sys.argv[5]) if len(sys.argv) > 5 else 0.002
    with simulators(n_accounts, n // n_accounts, cf_latency, vault_latency) as info:
        accounts = list(info["accounts"])
        run = (prepare_ours if kind == "ours" else prepare_peer)(info)
        cf0, v0 = counts(info)
        with Meter() as m:
            rotated = run(accounts)
        cf1, v1 = counts(info)
    print(json.dumps({"kind": kind, "n": n, "accounts": n_accounts, "rotated": rotated, "wall_s": round(m.wall, 3),
                      "cpu_s": round(m.cpu, 3), "cpu_us_per_tunnel": round(m.cpu / n * 1e6, 1),
                      "peak_rss_mb": round(m.peak_rss_mb, 1), "cloudflare_calls": cf1 - cf0, "vault_calls": v1 - v0}))


if __name__ == "__main__":
    main()
