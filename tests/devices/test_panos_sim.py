"""The simulated PAN-OS firewall (rotator/sim/panos.py), driven over HTTPS by pan-python's ``pan.xapi``,
the client the ``panos`` kind uses: candidate vs running configuration, commit jobs, IKE SAs coupled to
the key Cloudflare holds, and the errors of the XML API."""

from __future__ import annotations

import ssl

import pytest

from rotator.sim.panos import GATEWAYS, PanosSim, serve
from tests import helpers
from tests.devices.conftest import ACCOUNT, new_key

xapi_mod = pytest.importorskip("pan.xapi")

GW = "cf-site-0"
KEY_XPATH = f"{GATEWAYS}/entry[@name='{GW}']/authentication/pre-shared-key"


@pytest.fixture
def firewall(loopback_tls):
    cloudflare: dict[str, str] = {}
    sim = PanosSim(peer=lambda acc, tid: cloudflare.get(tid))
    old = new_key()
    sim.add_gateway(GW, ACCOUNT, "t0", old)
    cloudflare["t0"] = old
    with serve(sim, certfile=loopback_tls.certfile, keyfile=loopback_tls.keyfile) as server:
        xapi = xapi_mod.PanXapi(hostname="127.0.0.1", port=server.port, api_key=sim.api_key, timeout=5,
                                ssl_context=ssl.create_default_context(cafile=loopback_tls.ca_file))
        try:
            yield sim, xapi, cloudflare, server
        finally:
            helpers.SECRETS.update(sim.scan_secrets())
            print(sim.snapshot())  # the secret scan reads it: fingerprints only, no key, no credential


def sa_serials(xapi) -> list[str]:
    xapi.op(cmd=f"<show><vpn><ike-sa><gateway>{GW}</gateway></ike-sa></vpn></show>")
    return [e.findtext("sn") for e in xapi.element_root.findall("./result/entry")
            if e.findtext("state") == "Established"]


def test_a_set_changes_the_candidate_only_and_a_commit_job_makes_it_running(firewall):
    sim, xapi, cloudflare, _ = firewall
    old, new = sim.running_key(GW), new_key()
    xapi.set(xpath=KEY_XPATH, element=f"<key>{new}</key>")
    assert sim.candidate_key(GW) == new and sim.running_key(GW) == old
    xapi.get(xpath=KEY_XPATH + "/key")
    stored = xapi.element_root.findtext("./result/key")
    assert stored.startswith("-AQ==") and new not in xapi.xml_document  # stored encrypted, never read back
    xapi.show(xpath=KEY_XPATH + "/key")
    assert xapi.element_root.findtext("./result/key") != stored  # running still has the old key
    xapi.op(cmd="<check><pending-changes></pending-changes></check>")
    assert xapi.element_root.findtext("result") == "yes"
    xapi.commit(cmd="<commit></commit>", sync=True, interval=0.01, timeout=5)
    assert xapi.element_root.findtext("./result/job/result") == "OK"
    assert sim.running_key(GW) == new
    xapi.show(xpath=KEY_XPATH + "/key")
    assert xapi.element_root.findtext("./result/key") == stored  # the same key: the same encrypted value
    xapi.commit(cmd="<commit></commit>")
    assert "no changes to commit" in xapi.status_detail.lower() and sim.commits == 1


def test_a_fresh_ike_sa_comes_up_after_a_clear_only_while_cloudflare_holds_the_key(firewall):
    sim, xapi, cloudflare, _ = firewall
    before = sa_serials(xapi)
    assert len(before) == 1
    xapi.op(cmd=f"<clear><vpn><ike-sa><gateway>{GW}</gateway></ike-sa></vpn></clear>")
    after = sa_serials(xapi)
    assert after and after != before  # same key both ends: re-authenticated
    xapi.set(xpath=KEY_XPATH, element=f"<key>{new_key()}</key>")
    xapi.commit(cmd="<commit></commit>", sync=True, interval=0.01, timeout=5)
    xapi.op(cmd=f"<clear><vpn><ike-sa><gateway>{GW}</gateway></ike-sa></vpn></clear>")
    assert sa_serials(xapi) == []  # Cloudflare holds another key: IKE_AUTH fails, no SA
    cloudflare["t0"] = sim.running_key(GW)
    assert len(sa_serials(xapi)) == 1  # the firewall retries; with matching keys it comes up


def test_a_failed_commit_reports_its_text_and_leaves_the_running_key(firewall):
    sim, xapi, _, _ = firewall
    old, new = sim.running_key(GW), new_key()
    sim.fail_commit(f"Validation Error: key {new} is not allowed")
    xapi.set(xpath=KEY_XPATH, element=f"<key>{new}</key>")
    xapi.commit(cmd="<commit></commit>", sync=True, interval=0.01, timeout=5)
    job = xapi.element_root.find("./result/job")
    assert (job.findtext("status"), job.findtext("result")) == ("FIN", "FAIL")
    assert "Validation Error" in job.findtext("details/line")
    assert sim.running_key(GW) == old and sim.candidate_key(GW) == new


def test_a_wrong_api_key_is_refused_with_403_and_keygen_checks_the_password(firewall, loopback_tls):
    sim, _, _, server = firewall
    ctx = ssl.create_default_context(cafile=loopback_tls.ca_file)
    bad = xapi_mod.PanXapi(hostname="127.0.0.1", port=server.port, api_key="LUFRPT-wrong", timeout=5,
                           ssl_context=ctx)
    with pytest.raises(xapi_mod.PanXapiError, match="403"):
        bad.op(cmd="<check><pending-changes></pending-changes></check>")
    (user, password), = sim.users.items()
    good = xapi_mod.PanXapi(hostname="127.0.0.1", port=server.port, api_username=user, api_password=password,
                            timeout=5, ssl_context=ctx)
    assert good.keygen() == sim.api_key
    with pytest.raises(xapi_mod.PanXapiError, match="403"):
        xapi_mod.PanXapi(hostname="127.0.0.1", port=server.port, api_username=user, api_password="nope",
                         timeout=5, ssl_context=ctx).keygen()


def test_a_set_on_a_gateway_that_does_not_exist_creates_a_node_the_commit_refuses(firewall):
    sim, xapi, _, _ = firewall
    xapi.set(xpath=KEY_XPATH.replace(GW, "cf-nowhere"), element=f"<key>{new_key()}</key>")
    xapi.commit(cmd="<commit></commit>", sync=True, interval=0.01, timeout=5)
    assert xapi.element_root.findtext("./result/job/result") == "FAIL"
    assert "cf-nowhere" in xapi.element_root.findtext("./result/job/details/line")


def test_a_refused_key_is_an_error_response(firewall):
    sim, xapi, _, _ = firewall
    sim.refuse_key(GW, "is invalid")
    with pytest.raises(xapi_mod.PanXapiError, match="is invalid"):
        xapi.set(xpath=KEY_XPATH, element=f"<key>{new_key()}</key>")
    assert xapi.status_code == "12"
