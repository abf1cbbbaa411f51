"""Firewall kinds against their simulators over loopback HTTPS: deliver, verify and a repeated deliver of
N tunnels in one call, with the requests and commits each took.

    .venv/bin/python tests/bench/firewalls.py [N]
"""

from __future__ import annotations

import secrets
import string
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import trustme

from rotator.adapters.devices import build_device, parse_devices
from rotator.rotation.ports import DeviceTunnel
from rotator.secret import Secret
from rotator.sim import fortigate, panos, vyos

ACCOUNT = "0" * 32
SIMS = {"panos": (panos.PanosSim, panos.serve), "vyos": (vyos.VyosSim, vyos.serve),
        "fortigate": (fortigate.FortigateSim, fortigate.serve)}


def key() -> str:
    return "k" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(31))


def bench(kind: str, n: int, where: Path) -> str:
    cloudflare: dict[str, str] = {}
    tunnels = [DeviceTunnel(secrets.token_hex(16), f"site-{i}", Secret(key()), Secret(key())) for i in range(n)]
    make, serve = SIMS[kind]
    sim = make(peer=lambda acc, tid: cloudflare.get(tid))
    for t in tunnels:
        (sim.add_gateway if kind == "panos" else sim.add_tunnel)(f"cf-{t.tunnel_name}", ACCOUNT, t.tunnel_id,
                                                                 t.previous_psk.reveal())
        cloudflare[t.tunnel_id] = t.previous_psk.reveal()
    credential = where / f"{kind}.credential"
    credential.write_text(sim.token if kind == "fortigate" else sim.api_key)
    with serve(sim, certfile=str(where / "cert.pem"), keyfile=str(where / "key.pem")) as server:
        (spec,) = parse_devices([{"name": "bench", "kind": kind, "tunnels": ["*"], "host": "127.0.0.1",
                                  "port": server.port, "ca_file": str(where / "ca.pem"), "timeout": "120s",
                                  "verify_timeout": "120s", "poll_interval": 0.05,
                                  ("token_file" if kind == "fortigate" else "api_key_file"): str(credential)}])
        device = build_device(spec)
        try:
            t0 = time.monotonic()
            assert all(r.ok for r in device.deliver(ACCOUNT, "b", tunnels, deadline=t0 + 120).values())
            t1, requests = time.monotonic(), sum(sim.request_counts().values())
            cloudflare.update({t.tunnel_id: t.psk.reveal() for t in tunnels})
            assert all(r.ok for r in device.verify(ACCOUNT, "b", tunnels, deadline=t1 + 120).values())
            t2 = time.monotonic()
            assert all(r.ok for r in device.deliver(ACCOUNT, "b", tunnels, deadline=t2 + 120).values())
            t3 = time.monotonic()
        finally:
            device.close()
    changes = sim.puts if kind == "fortigate" else sim.commits
    return (f"{kind}: {n} tunnels: deliver {t1 - t0:.2f} s ({requests} requests), verify {t2 - t1:.2f} s, "
            f"repeated deliver {t3 - t2:.2f} s; {'writes' if kind == 'fortigate' else 'commits'} in all: {changes}")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    where = Path(tempfile.mkdtemp(prefix="firewall-bench-"))
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca.cert_pem.write_to_path(str(where / "ca.pem"))
    cert.private_key_pem.write_to_path(str(where / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(where / "cert.pem"))
    for kind in SIMS:
        print(bench(kind, n, where), flush=True)


if __name__ == "__main__":
    main()
