#!/usr/bin/env python3
"""psk-rotator exec hook for VyOS 1.4+ through its HTTPS API.

    [[devices]]
    name = "vyos-branch"
    kind = "exec"
    tunnels = ["branch-*"]
    command = ["/usr/local/bin/vyos-http-api.py", "--url", "https://vyos.example.net",
               "--api-key-file", "/etc/psk-rotator/vyos.key", "--psk-name", "{tunnel_name}",
               "--peer", "{tunnel_name}"]

Reads the rotator's JSON on stdin (README, "Far-end devices"), answers {"results": ...} on stdout.
deliver / rollback: `set vpn ipsec authentication psk NAME secret KEY`, then commit and save
(the key and the API key travel in the POST body over TLS, never in argv or a URL).
verify: `reset vpn ipsec site-to-site peer PEER` forces a fresh IKE authentication, then
`show vpn ipsec sa` is polled until the peer's SA is up again.
Check the paths against your VyOS version before use. Standard library only.
"""

import argparse
import json
import ssl
import sys
import time
import urllib.parse
import urllib.request


def https_url(value):
    if not value.startswith("https://"):
        raise argparse.ArgumentTypeError("the API URL must start with https:// (the body carries keys)")
    return value


def api(args, endpoint, command):
    """POST one command to the VyOS API; return its data or raise with VyOS's error."""
    body = urllib.parse.urlencode({"data": json.dumps(command), "key": args.api_key}).encode()
    ctx = ssl.create_default_context(cafile=args.cacert)  # TLS is verified
    with urllib.request.urlopen(args.url.rstrip("/") + endpoint, data=body, timeout=args.wait, context=ctx) as r:  # noqa: S310 (https only, checked)
        answer = json.load(r)
    if not answer.get("success"):
        raise RuntimeError(answer.get("error") or f"{endpoint} failed")
    return answer.get("data")


def fields(t):
    return {k: t.get(k) or "" for k in ("tunnel_name", "tunnel_id", "customer_endpoint", "cloudflare_endpoint")}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, type=https_url)
    p.add_argument("--api-key-file", required=True)
    p.add_argument("--cacert", default=None, help="PEM of the CA of the router's certificate")
    p.add_argument("--psk-name", default="{tunnel_name}", help="name under vpn ipsec authentication psk")
    p.add_argument("--peer", default="{tunnel_name}", help="site-to-site peer name, for the reset")
    p.add_argument("--wait", type=int, default=30)
    args = p.parse_args()
    with open(args.api_key_file, encoding="utf-8") as fh:
        args.api_key = fh.read().strip()
    request = json.load(sys.stdin)
    results = {}
    if request["action"] in ("deliver", "rollback"):
        commands = [{"op": "set", "path": ["vpn", "ipsec", "authentication", "psk",
                                           args.psk_name.format(**fields(t)), "secret", t["psk"]]}
                    for t in request["tunnels"]]
        api(args, "/configure", commands)  # one commit for the whole batch
        api(args, "/config-file", {"op": "save"})
        results = {t["tunnel_id"]: {"ok": True} for t in request["tunnels"]}
    elif request["action"] == "verify":
        for t in request["tunnels"]:
            peer = args.peer.format(**fields(t))
            api(args, "/reset", {"op": "reset", "path": ["vpn", "ipsec", "site-to-site", "peer", peer]})
            end, up = time.monotonic() + args.wait, False
            while not up and time.monotonic() < end:
                time.sleep(1)
                sas = api(args, "/show", {"op": "show", "path": ["vpn", "ipsec", "sa"]}) or ""
                up = any(peer in line and " up " in f" {line} " for line in sas.splitlines())
            results[t["tunnel_id"]] = {"ok": True} if up else {"ok": False, "reason": f"{peer} not up after reset"}
    json.dump({"results": results}, sys.stdout)


if __name__ == "__main__":
    try:
        main()
    except (RuntimeError, OSError, ValueError) as exc:  # urllib errors are OSErrors
        print(f"vyos-http-api: {exc}", file=sys.stderr)
        sys.exit(1)
