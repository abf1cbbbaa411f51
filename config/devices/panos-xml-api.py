#!/usr/bin/env python3
"""psk-rotator exec hook for Palo Alto PAN-OS through its XML API.

    [[devices]]
    name = "pa-hq"
    kind = "exec"
    tunnels = ["hq-*"]
    command = ["/usr/local/bin/panos-xml-api.py", "--url", "https://fw.example.net",
               "--api-key-file", "/etc/psk-rotator/panos.key", "--gateway", "cf-{tunnel_name}"]

Reads the rotator's JSON on stdin (README, "Far-end devices"), answers {"results": ...} on stdout.
deliver / rollback: set the IKE gateway's pre-shared key (type=config, action=set), then one
commit for the batch, waited for. verify: clear the gateway's IKE SA (a fresh IKE_AUTH follows),
then poll `show vpn ike-sa gateway GW` until it is up again. Every call is a POST, so neither the
key nor the API key ends up in a URL or a log line. Standard library only.
"""

import argparse
import json
import ssl
import sys
import time
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape

XPATH = ("/config/devices/entry[@name='localhost.localdomain']/network/ike/gateway/entry[@name='{gw}']"
         "/authentication/pre-shared-key")


def https_url(value):
    if not value.startswith("https://"):
        raise argparse.ArgumentTypeError("the API URL must start with https:// (the body carries keys)")
    return value


def api(args, **params):
    """One XML API call; return the <result> element or raise with PAN-OS's message."""
    body = urllib.parse.urlencode({**params, "key": args.api_key}).encode()
    ctx = ssl.create_default_context(cafile=args.cacert)  # TLS is verified
    with urllib.request.urlopen(args.url.rstrip("/") + "/api/", data=body, timeout=args.wait, context=ctx) as r:  # noqa: S310 (https only, checked)
        root = ET.fromstring(r.read())  # noqa: S314 (the firewall, over verified TLS)
    if root.get("status") != "success":
        raise RuntimeError(" ".join(root.itertext()).strip() or "PAN-OS refused the call")
    return root.find("result")


def commit(args):
    job = api(args, type="commit", cmd="<commit></commit>").findtext("job")
    end = time.monotonic() + args.wait
    while job and time.monotonic() < end:
        time.sleep(2)
        status = api(args, type="op", cmd=f"<show><jobs><id>{job}</id></jobs></show>")
        if status.findtext("job/status") == "FIN":
            if status.findtext("job/result") != "OK":
                raise RuntimeError(f"commit job {job} failed")
            return
    if job:
        raise RuntimeError(f"commit job {job} not finished within {args.wait}s")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, type=https_url)
    p.add_argument("--api-key-file", required=True)
    p.add_argument("--cacert", default=None)
    p.add_argument("--gateway", default="{tunnel_name}", help="IKE gateway name template")
    p.add_argument("--wait", type=int, default=120)
    args = p.parse_args()
    with open(args.api_key_file, encoding="utf-8") as fh:
        args.api_key = fh.read().strip()
    request = json.load(sys.stdin)
    gateway = {t["tunnel_id"]: args.gateway.format(tunnel_name=t["tunnel_name"], tunnel_id=t["tunnel_id"])
               for t in request["tunnels"]}
    results = {}
    if request["action"] in ("deliver", "rollback"):
        for t in request["tunnels"]:
            api(args, type="config", action="set", xpath=XPATH.format(gw=gateway[t["tunnel_id"]]),
                element=f"<key>{escape(t['psk'])}</key>")
        commit(args)
        results = {t["tunnel_id"]: {"ok": True} for t in request["tunnels"]}
    elif request["action"] == "verify":
        for t in request["tunnels"]:
            gw = escape(gateway[t["tunnel_id"]])
            api(args, type="op", cmd=f"<clear><vpn><ike-sa><gateway>{gw}</gateway></ike-sa></vpn></clear>")
            end, up = time.monotonic() + args.wait, False
            while not up and time.monotonic() < end:
                time.sleep(2)
                sa = api(args, type="op", cmd=f"<show><vpn><ike-sa><gateway>{gw}</gateway></ike-sa></vpn></show>")
                up = any((e.text or "").strip() == "Established" for e in sa.iter("state"))
            results[t["tunnel_id"]] = {"ok": True} if up else {"ok": False, "reason": f"IKE SA {gw} not up"}
    json.dump({"results": results}, sys.stdout)


if __name__ == "__main__":
    try:
        main()
    except (RuntimeError, OSError, ValueError, ET.ParseError) as exc:
        print(f"panos-xml-api: {exc}", file=sys.stderr)
        sys.exit(1)
