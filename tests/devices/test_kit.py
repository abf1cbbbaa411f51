"""The device kit (docs/design.md section 10): the registry's module contract, the key rules that
`config check` and `run` enforce, the metrics wrapper forwarding every attribute the Device port
names, and the helpers vendor kinds share (matching, a repeated deliver, bounded polling)."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

import pytest

from rotator import config
from rotator.adapters import devices as registry
from rotator.adapters.devices import KIND_MODULES, kind
from rotator.adapters.devices._common import DeviceBase, DeviceSpec, holds, match_endpoint, poll
from rotator.errors import ConfigError
from rotator.rotation.ports import PROOFS, Device, DeviceResult, DeviceStatus, DeviceTunnel, KeyRules
from rotator.secret import Secret
from rotator.service.metrics import MeasuredDevice, Metrics
from tests.devices.conftest import ACCOUNT
from tests.fakes import FakeDevice

PORT_ATTRIBUTES = ("name", "kind", "timeout", "verify_timeout", "verifies", "ack_timeout", "interrupts",
                   "key_rules", "proof")
AWS_LIKE = KeyRules(8, 64, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._", "0",
                    "8-64 characters of A-Z a-z 0-9 . _, not starting with 0")


@pytest.mark.parametrize("name", KIND_MODULES)
def test_every_registered_kind_follows_the_module_contract(name: str) -> None:
    module = kind(name)
    assert module.KIND == name and module.PROOF in PROOFS and isinstance(module.INTERRUPTS, bool)
    rules = module.KEY_RULES
    assert isinstance(rules, KeyRules) or callable(rules)
    for fn in ("parse_settings", "build", "secrets"):
        assert callable(getattr(module, fn))
    extra = getattr(module, "EXTRA_COMMON_KEYS", ())
    assert isinstance(extra, tuple) and set(extra) <= {"verify_timeout"}


def test_an_unknown_kind_names_the_registered_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown kind 'cisco'.*exec, webhook, strongswan, manual"):
        registry.parse_devices([{"name": "x", "kind": "cisco", "tunnels": ["*"]}])


def test_each_kind_builds_a_device_carrying_its_kind_attributes(tmp_path) -> None:
    secret = tmp_path / "hook.key"
    secret.write_text("a" * 32)
    specs = registry.parse_devices([
        {"name": "e", "kind": "exec", "tunnels": ["*"], "command": [sys.executable], "verify": False},
        {"name": "w", "kind": "webhook", "tunnels": ["*"], "url": "https://hub.example.net/psk",
         "secret_file": str(secret)},
        {"name": "s", "kind": "strongswan", "tunnels": ["*"], "owners": ["x"]},
        {"name": "m", "kind": "manual", "tunnels": ["*"], "ack_timeout": "2h"},
    ])
    built = [registry.build_device(s) for s in specs]
    try:
        for spec, device in zip(specs, built, strict=True):
            module = kind(spec.kind)
            assert device.name == spec.name and device.kind == spec.kind
            assert device.proof == module.PROOF and device.interrupts == module.INTERRUPTS
            assert device.key_rules == module.KEY_RULES and device.timeout == spec.timeout
            assert device.verifies == spec.verify
        assert [d.verifies for d in built] == [False, True, True, False]
        assert built[3].ack_timeout == 7200 and built[0].ack_timeout is None
        assert registry.secrets_of(specs) == [Secret("a" * 32)]
    finally:
        for device in built:
            device.close()


def test_a_kind_that_cannot_verify_refuses_verify_true() -> None:
    with pytest.raises(ConfigError, match=r"devices\[0\]\.verify: a manual device cannot verify"):
        registry.parse_devices([{"name": "m", "kind": "manual", "tunnels": ["*"], "verify": True}])


def test_verify_timeout_is_a_common_key_only_for_kinds_that_ask_for_it() -> None:
    with pytest.raises(ConfigError, match=r"devices\[0\]\.verify_timeout: unknown setting"):
        registry.parse_devices([{"name": "e", "kind": "exec", "tunnels": ["*"], "command": [sys.executable],
                                 "verify_timeout": "5m"}])


# -- key rules in config ------------------------------------------------------------------------------

CONFIG = f"""
[policies.default]
every = "30d"
{{default_psk}}
[policies.aws]
every = "30d"
psk_charset = "aws"

[[accounts]]
id = "{ACCOUNT}"
{{select}}

[[devices]]
name = "aws-eu"
kind = "exec"
tunnels = ["aws-*"]
command = ["{sys.executable}"]
{{device_accounts}}
"""


@pytest.fixture
def aws_like_exec(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exec kind made to refuse what AWS refuses: the check is the kit's, for every kind."""
    monkeypatch.setattr(kind("exec"), "KEY_RULES", AWS_LIKE)


def load(tmp_path, env, default_psk: str = "", select: str = "", device_accounts: str = "") -> config.Settings:
    path = tmp_path / "rotator.toml"
    path.write_text(CONFIG.format(default_psk=default_psk, select=select, device_accounts=device_accounts))
    return config.load(str(path), env=env)


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    return {"VAULT_ADDR": "http://127.0.0.1:1", "VAULT_TOKEN": "t" * 26, "CLOUDFLARE_API_TOKEN": "c" * 40}


def test_a_policy_that_could_make_a_refused_key_is_a_config_error_naming_device_and_rule(
        tmp_path, env, aws_like_exec) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, env)  # the default policy: alnum, which may start with '0'
    text = str(err.value)
    assert "devices[0] (aws-eu, kind exec): policies.default" in text and "start with '0'" in text
    assert "\n" not in text


def test_a_policy_whose_keys_fit_passes(tmp_path, env, aws_like_exec) -> None:
    settings = load(tmp_path, env, default_psk='psk_charset = "aws"')
    assert settings.devices[0].name == "aws-eu"


def test_only_the_policies_a_device_may_meet_are_checked(tmp_path, env, aws_like_exec) -> None:
    aws_only = '[[accounts.select]]\npolicy = "aws"\nall = true'
    # the device applies to every account: an account not configured would use the default policy
    with pytest.raises(ConfigError, match=r"policies\.default"):
        load(tmp_path, env, select=aws_only)
    # the device applies to the configured account only, which selects every tunnel with "aws"
    load(tmp_path, env, select=aws_only, device_accounts=f'accounts = ["{ACCOUNT}"]')
    # a selection that does not name every tunnel leaves the default policy for the rest
    partial = '[[accounts.select]]\npolicy = "aws"\nnames = ["aws-*"]'
    with pytest.raises(ConfigError, match=r"policies\.default"):
        load(tmp_path, env, select=partial, device_accounts=f'accounts = ["{ACCOUNT}"]')


def test_a_long_policy_breaks_a_length_rule(tmp_path, env, aws_like_exec) -> None:
    with pytest.raises(ConfigError, match=r"psk_length 100 is outside 8\.\.64"):
        load(tmp_path, env, default_psk='psk_charset = "aws"\npsk_length = 100')


# -- the metrics wrapper ---------------------------------------------------------------------------------

def test_the_metrics_wrapper_forwards_every_attribute_the_port_names() -> None:
    from prometheus_client import CollectorRegistry

    inner = FakeDevice("aws", timeout=7.0, verify=False, interrupts=True, key_rules=AWS_LIKE, verify_timeout=900.0)
    inner.proof, inner.ack_timeout = "vendor_status", 3.0
    measured: Device = MeasuredDevice(inner, Metrics(CollectorRegistry()))
    for attribute in PORT_ATTRIBUTES:
        assert getattr(measured, attribute) == getattr(inner, attribute), attribute
    assert not hasattr(MeasuredDevice, "__getattr__")  # every attribute is forwarded by name


# -- helpers -------------------------------------------------------------------------------------------------

def tunnel(endpoint: str | None) -> DeviceTunnel:
    return DeviceTunnel("a" * 32, "aws-1", Secret("k" * 32), None, endpoint)


def test_match_endpoint_finds_the_vendor_tunnel_or_refuses_naming_what_it_looked_for() -> None:
    vendor = {"198.51.100.1": ("vpn-1", 0)}
    assert match_endpoint(tunnel("198.51.100.1"), vendor, "eu-west-1") == ("vpn-1", 0)
    missing = match_endpoint(tunnel("203.0.113.5"), vendor, "VPN connections vpn-1 in eu-west-1")
    assert isinstance(missing, DeviceResult) and missing.status is DeviceStatus.FAILED
    assert "203.0.113.5" in (missing.reason or "") and "vpn-1 in eu-west-1" in (missing.reason or "")
    none = match_endpoint(tunnel(None), vendor, "eu-west-1")
    assert isinstance(none, DeviceResult) and "customer_endpoint" in (none.reason or "")


def test_holds_compares_the_vendor_key_with_the_wanted_one() -> None:
    assert holds("k" * 32, Secret("k" * 32)) and holds(Secret("k" * 32), Secret("k" * 32))
    assert not holds(None, Secret("k" * 32)) and not holds("k" * 31, Secret("k" * 32))


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_poll_stops_at_the_first_answer_or_at_the_deadline() -> None:
    clock = VirtualClock()
    answers: list[DeviceResult | None] = [None, None, DeviceResult(DeviceStatus.OK)]
    result = poll(lambda: answers.pop(0), 100.0, interval=10.0, sleep=clock.sleep, clock=clock,
                  on_timeout=lambda: DeviceResult(DeviceStatus.FAILED, "late"))
    assert result.ok and clock.now == 20.0
    clock = VirtualClock()
    checks: list[float] = []
    never: Callable[[], DeviceResult | None] = lambda: checks.append(clock.now)
    result = poll(never, 35.0, interval=10.0, sleep=clock.sleep, clock=clock,
                  on_timeout=lambda: DeviceResult(DeviceStatus.FAILED, "not up in time"))
    assert result.reason == "not up in time" and clock.now == 35.0 and checks == [0.0, 10.0, 20.0, 30.0, 35.0]


def test_device_base_defaults_pair_by_customer_endpoint() -> None:
    from rotator.model import TunnelInfo

    base = DeviceBase()
    ts = [TunnelInfo("1" * 32, "a", customer_endpoint="198.51.100.1"), TunnelInfo("2" * 32, "b")]
    assert base.pair_of(ACCOUNT, ts, deadline=0.0) == {"1" * 32: "198.51.100.1"}
    assert base.tunnels_up(ACCOUNT, ts, deadline=0.0) == {}
    assert dataclasses.is_dataclass(DeviceSpec)
