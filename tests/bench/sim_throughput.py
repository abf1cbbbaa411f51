"""Simulator throughput: KV v2 writes per second and bulk PSK sets of 1,000 tunnels per second.

The simulators run in their own process (``rotator sim``); load comes from client processes with
keep-alive connections, so the figure is the simulator's, not one Python client's.
"""

from __future__ import annotations

import http.client
import json
import multiprocessing
import sys
import time

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])

from tests.bench.common import simulators


def _kv_writer(addr: str, token: str, seconds: float, worker: int, out) -> None:
    host, port = addr.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port))
    headers = {"X-Vault-Token": token, "Content-Type": "application/json"}
    body = json.dumps({"options": {}, "data": {"psk": "x" * 32, "state": "active"}})
    done, deadline, i = 0, time.perf_counter() + seconds, 0
    while time.perf_counter() < deadline:
        i += 1
        conn.request("POST", f"/v1/secret/data/cloudflare/magic-ipsec/bench/{worker}-{i % 500}", body=body,
                     headers=headers)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200, resp.status
        done += 1
    out.put(done)


def _psk_setter(base: str, token: str, account: str, tunnels: list[str], seconds: float, out) -> None:
    host_port, path = base.removeprefix("http://").split("/", 1)
    host, port = host_port.split(":")
    conn = http.client.HTTPConnection(host, int(port))
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    body = json.dumps({"psks": [{"id": t, "psk": "Q" * 32} for t in tunnels]})
    done, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        conn.request("POST", f"/{path}/accounts/{account}/magic/ipsec_tunnels/psk", body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200, resp.status
        done += 1
    out.put(done)


def _run(target, args_for, workers: int, seconds: float) -> float:
    out: multiprocessing.Queue = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=target, args=(*args_for(w), out)) for w in range(workers)]
    for p in procs:
        p.start()
    total = sum(out.get() for _ in procs)
    for p in procs:
        p.join()
    return total / seconds


def measure(seconds: float = 5.0, workers: int = 2) -> dict[str, float]:
    with simulators(1, 1000, 0.0, 0.0) as info:
        kv = _run(_kv_writer, lambda w: (info["vault_addr"], info["vault_token"], seconds, w), workers, seconds)
        acc, tunnels = next(iter(info["accounts"].items()))
        psk = _run(_psk_setter, lambda w: (info["cloudflare_base_url"], info["cloudflare_api_token"], acc, tunnels,
                                           seconds), workers, seconds)
    return {"kv_writes_per_s": round(kv), "bulk_psk_set_1000_per_s": round(psk, 1),
            "psks_applied_per_s": round(psk * 1000)}


if __name__ == "__main__":
    print(json.dumps(measure()))
