"""(d) The one-sided rotation of today, shown for what it is.

The rotator changes Cloudflare's key (Vault first, the invariant holds for Cloudflare), the edge
holds it at once, and the tunnel stays up: established SAs never look at the PSK again. The outage
is delayed until the next fresh authentication, which fails with AUTHENTICATION_FAILED and takes the
tunnel down. This is the outage the device step (deliver, verify) prevents.
"""

from __future__ import annotations

import json

import pytest

from rotator.rotation.engine import RunRequest
from tests import helpers
from tests.ike.conftest import lab_sims, link

pytestmark = pytest.mark.ike


def test_one_sided_rotation_keeps_the_tunnel_up_until_a_reauthentication_fails(lab_factory, tmp_path):
    lab = lab_factory(make_before_break=False)  # the site re-authenticates break-before-make, as many do
    with lab_sims(3) as sims:
        acc = next(iter(sims.tunnels_by_account))
        tids = link(sims, lab, acc)
        lab.up(timeout=10)
        rt = helpers.runtime(sims, tmp_path=tmp_path)
        try:
            with lab.probe_all(interval=0.02) as probe:
                report = rt.engine.run(RunRequest(acc))
                assert report.ok
                for t in tids:  # what Cloudflare's edge does on apply
                    lab.load_edge_psk(t, sims.cloudflare.psk_of(acc, t))
                helpers.remember_secrets(sims)
                # the edge runs on the new key, the site on the old one, and nothing notices
                helpers.wait_for(lambda: probe.answered_all(20), timeout=10,
                                 what="traffic after the one-sided rotation")
                assert lab.sa_states("edge") == dict.fromkeys(tids, "ESTABLISHED")
                victim = tids[0]
                attempt = lab.reauth(victim, timeout=5)
                assert not attempt.ok and "AUTHENTICATION_FAILED" in attempt.detail
                helpers.wait_for(lambda: victim not in lab.sa_states("edge"), timeout=5, what="the SA to go")
                names = [lab.tunnel(t).name for t in tids]
                marks = {n: probe.answered_count(n) for n in names}
                # while 10 more echoes cross each other tunnel, nothing crosses the victim's any more
                helpers.wait_for(lambda: all(probe.answered_count(n) >= marks[n] + 10 for n in names[1:]),
                                 timeout=10, what="10 more echoes through the other tunnels")
                assert probe.answered_count(names[0]) == marks[names[0]]
            results = {r.name: r for r in probe.stop()}
        finally:
            rt.close()
        down = results[lab.tunnel(victim).name]
        others = [results[lab.tunnel(t).name] for t in tids[1:]]
        assert down.lost > 0 and all(r.lost == 0 for r in others)
        # the other tunnels are still up on mismatched keys: each is the same outage, postponed
        assert all(lab.sa_states("edge").get(t) == "ESTABLISHED" for t in tids[1:])
        assert helpers.assert_invariant(sims, acc, strict=True) == 3  # Cloudflare's half of the invariant
        for t in tids:  # ... and the far end's half is broken: the site holds a key Vault no longer has
            data = helpers.record(sims, acc, t)
            assert lab.key_loaded("site", t) not in (data.get("psk"), data.get("pending_psk"))
        print(json.dumps({"one_sided": {"reauth_failed_after_s": round(attempt.seconds, 3),
                                        "victim_lost": down.lost, "victim_longest_gap_s": round(down.longest_gap, 3)}}))
