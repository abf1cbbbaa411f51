#!/usr/bin/env python3
"""psk-rotator exec hook for a strongSwan site that is configured with swanctl.

    [[devices]]
    name = "site-a"
    kind = "exec"
    tunnels = ["site-a-*"]
    command = ["/usr/local/bin/strongswan-swanctl.py", "--owner", "{tunnel_name}.site-a.example.net"]

The rotator writes one JSON object on stdin (README, "Far-end devices"); this hook answers with
{"results": {tunnel_id: {"ok": ..., "reason": ...}}} on stdout. Standard library only.

deliver / rollback: write the tunnel's key into its own file in swanctl's conf.d (mode 0600, as
base64 so no quoting can break it), then `swanctl --load-creds` loads every secret at once.
verify: `swanctl --rekey --ike NAME --reauth` forces a fresh IKE authentication with the key, then
`swanctl --list-sas --ike NAME --raw` is polled until an IKE SA with a new unique id is ESTABLISHED.
The key never appears in argv: swanctl reads it from the file.
"""

import argparse
import base64
import json
import os
import re
import subprocess
import sys
import time

SA_RE = re.compile(r"([^\s{}]+) \{uniqueid=(\d+) .*?state=([A-Z_]+)")


def swanctl(args, *argv):
    """Run swanctl; raise with its last stderr line on failure."""
    proc = subprocess.run([args.swanctl, *argv], capture_output=True, text=True, timeout=args.wait)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"swanctl {argv[0]} failed ({proc.returncode})")
    return proc.stdout


def fields(tunnel):
    return {k: tunnel.get(k) or "" for k in ("tunnel_name", "tunnel_id", "customer_endpoint", "cloudflare_endpoint")}


def write_secret(args, tunnel):
    """conf.d/psk-rotator-<id>.conf holding this tunnel's key, written atomically, readable by root only."""
    name = f"psk-rotator-{tunnel['tunnel_id']}"
    owner = args.owner.format(**fields(tunnel))
    secret = base64.b64encode(tunnel["psk"].encode()).decode()
    text = f"secrets {{\n  ike-{name} {{\n    id-1 = {owner}\n    secret = 0s{secret}\n  }}\n}}\n"
    path = os.path.join(args.conf_dir, name + ".conf")
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(path + ".tmp", path)


def ike_sas(args, ike):
    """{unique id: state} of the IKE SAs named ike."""
    out = swanctl(args, "--list-sas", "--ike", ike, "--raw")
    return {uid: state for name, uid, state in SA_RE.findall(out) if name == ike}


def verify(args, tunnels, results):
    pending = {}
    for t in tunnels:
        ike = args.ike.format(**fields(t))
        try:
            before = ike_sas(args, ike)
            swanctl(args, "--rekey", "--ike", ike, "--reauth")
            pending[t["tunnel_id"]] = (ike, set(before))
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            results[t["tunnel_id"]] = {"ok": False, "reason": f"cannot re-authenticate {ike}: {exc}"}
    end = time.monotonic() + args.wait
    while pending and time.monotonic() < end:
        for tid, (ike, old) in list(pending.items()):
            new = {uid: s for uid, s in ike_sas(args, ike).items() if uid not in old}
            if "ESTABLISHED" in new.values():
                results[tid] = {"ok": True}
                del pending[tid]
        time.sleep(0.5)
    for tid, (ike, _) in pending.items():
        results[tid] = {"ok": False, "reason": f"no fresh IKE SA {ike} within {args.wait}s"}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--owner", required=True, help="IKE identity owning the key, e.g. {tunnel_name}.site.example.net")
    p.add_argument("--ike", default="{tunnel_name}", help="IKE SA (connection) name template")
    p.add_argument("--conf-dir", default="/etc/swanctl/conf.d")
    p.add_argument("--swanctl", default="swanctl")
    p.add_argument("--wait", type=int, default=30, help="seconds to wait for a fresh IKE SA")
    args = p.parse_args()
    request = json.load(sys.stdin)
    tunnels, results = request["tunnels"], {}
    if request["action"] in ("deliver", "rollback"):
        for t in tunnels:
            write_secret(args, t)
        swanctl(args, "--load-creds", "--noprompt")  # a failure exits non-zero: every tunnel failed
        results = {t["tunnel_id"]: {"ok": True} for t in tunnels}
    elif request["action"] == "verify":
        verify(args, tunnels, results)
    json.dump({"results": results}, sys.stdout)


if __name__ == "__main__":
    try:
        main()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"strongswan-swanctl: {exc}", file=sys.stderr)
        sys.exit(1)
