"""Vault transport under hvac: the hand-written PooledSession against requests.Session with a tuned
HTTPAdapter (one pool of ``concurrency`` connections, no retries), plain and with ``trust_env`` off.

The simulator runs in its own process (``rotator sim``), so the CPU figure is the client's alone.
Run: ``.venv/bin/python tests/bench/vault_transport.py`` (N=reads, default 3000; 16 threads).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import hvac
import requests
from requests.adapters import HTTPAdapter

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])

from rotator.adapters.vault import PooledSession

THREADS = 16
PATH = "cloudflare/magic-ipsec/" + "a" * 32 + "/" + "b" * 32


def main() -> None:
    n = int(os.environ.get("N", "3000"))
    proc = subprocess.Popen([sys.executable, "-m", "rotator", "sim", "--json", "--tunnels", "1"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        addr, token = info["vault_addr"], info["vault_token"]

        def over_requests(trust_env: bool) -> hvac.Client:
            session = requests.Session()
            session.trust_env = trust_env
            if not trust_env:
                session.proxies = requests.utils.get_environ_proxies(addr)
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=THREADS, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            return hvac.Client(url=addr, token=token, session=session, timeout=15)

        clients: dict[str, Callable[[], hvac.Client]] = {
            "hvac + PooledSession": lambda: hvac.Client(url=addr, token=token, timeout=15,
                                                        session=PooledSession(addr, maxsize=THREADS)),
            "hvac + requests HTTPAdapter": lambda: over_requests(True),
            "hvac + requests, trust_env off": lambda: over_requests(False),
        }
        for _ in range(2):
            for label, make in clients.items():
                client = make()
                client.secrets.kv.v2.create_or_update_secret(PATH, secret={"psk": "x" * 32}, mount_point="secret")

                def read(_: int, client: hvac.Client = client) -> None:
                    client.secrets.kv.v2.read_secret_version(PATH, mount_point="secret",
                                                             raise_on_deleted_version=False)

                with ThreadPoolExecutor(THREADS) as pool:
                    list(pool.map(read, range(200)))  # warm the connections
                    cpu0, t0 = time.process_time(), time.perf_counter()
                    list(pool.map(read, range(n)))
                    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
                print(f"{label:32s} {n} reads: wall {wall / n * 1e6:5.0f} us/read, "
                      f"client CPU {cpu / n * 1e6:5.0f} us/read")
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
