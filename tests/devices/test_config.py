"""``[[devices]]`` parsing (one-line errors naming the key) and which device owns a tunnel."""

from __future__ import annotations

import sys
import tomllib

import pytest

from rotator.adapters.devices import (
    DeviceRegistry,
    ExecDevice,
    ManualDevice,
    StrongSwanDevice,
    WebhookDevice,
    parse_devices,
)
from rotator.errors import ConfigError
from rotator.model import TunnelInfo
from tests.devices.conftest import ACCOUNT

OTHER = "f" * 32


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "hook.key"
    path.write_text("0123456789abcdef0123456789abcdef\n")
    return str(path)


def devices(text: str) -> list[dict]:
    return tomllib.loads(text)["devices"]


def test_every_kind_parses_with_defaults(secret_file):
    specs = parse_devices(devices(f"""
        [[devices]]
        name = "branch-routers"
        kind = "exec"
        accounts = ["{ACCOUNT}"]
        tunnels = ["site-0-*", "aws-*"]
        timeout = "90s"
        command = ["{sys.executable}", "-c", "pass"]
        [[devices]]
        name = "hub"
        kind = "webhook"
        tunnels = ["hub-*"]
        url = "https://hub.example.net/psk"
        secret_file = "{secret_file}"
        concurrency = 4
        [[devices]]
        name = "lab"
        kind = "strongswan"
        tunnels = ["lab-*"]
        socket = "/run/site/charon.vici"
        owners = ["{{tunnel_name}}.site.example.net"]
        reauth = "restart"
        [[devices]]
        name = "pfsense"
        kind = "manual"
        tunnels = ["{'a' * 32}"]
        ack_timeout = "2d"
    """), accounts=[ACCOUNT])
    exec_, hook, lab, manual = specs
    assert (exec_.name, exec_.kind, exec_.accounts, exec_.tunnels, exec_.timeout, exec_.verify, exec_.concurrency) \
        == ("branch-routers", "exec", (ACCOUNT,), ("site-0-*", "aws-*"), 90.0, True, 16)
    assert exec_.settings.command == (sys.executable, "-c", "pass")
    assert (hook.timeout, hook.concurrency, hook.settings.url) == (60.0, 4, "https://hub.example.net/psk")
    assert "0123456789abcdef" not in repr(hook) and "0123456789abcdef" not in str(hook.masked())
    assert (lab.settings.socket, lab.settings.reauth, lab.settings.secret_id) == \
        ("/run/site/charon.vici", "restart", "psk-rotator-{tunnel_id}")
    assert (manual.verify, manual.settings.ack_timeout) == (False, 172800.0)
    registry = DeviceRegistry(specs)
    try:
        built = [registry.by_name(s.name) for s in specs]
        assert [type(d) for d in built] == [ExecDevice, WebhookDevice, StrongSwanDevice, ManualDevice]
        # What the engine reads from a device (rotation/ports.py): its timeout and whether it verifies.
        assert [(d.timeout, d.verifies) for d in built] == [(90.0, True), (60.0, True), (60.0, True), (60.0, False)]
        assert (built[1].concurrency, built[2].concurrency) == (4, 16)
    finally:
        registry.close()


BASE = f'name = "d"\nkind = "exec"\ntunnels = ["x"]\ncommand = ["{sys.executable}"]\n'


@pytest.mark.parametrize("extra, message", [
    ('timeout = "soon"', "devices[0].timeout: 'soon' is not a duration"),
    ("timeout = 0", "devices[0].timeout: must be longer than 0s"),
    ('verify = "yes"', "devices[0].verify: expected true or false, got str"),
    ("concurrency = 0", "devices[0].concurrency: 0 is outside 1..256"),
    ("concurrency = true", "devices[0].concurrency: expected an integer, got bool"),
    ('accounts = ["ACME"]', "devices[0].accounts[0]: 'ACME' is not a Cloudflare account id"),
    (f'accounts = ["{OTHER}"]', f"devices[0].accounts[0]: account {OTHER} is not configured"),
    ("colour = 1", "devices[0].colour: unknown setting for this kind of device"),
    ('url = "https://x"', "devices[0].url: unknown setting for this kind of device"),
    ('pass_env = ["VAULT_TOKEN"]', "devices[0].pass_env[0]: VAULT_TOKEN looks like a secret"),
])
def test_bad_common_settings_name_the_key(extra, message):
    with pytest.raises(ConfigError) as err:
        parse_devices(devices(f"[[devices]]\n{BASE}{extra}\n"), accounts=[ACCOUNT])
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value) and "(" in str(err.value)  # one line, with a fix


@pytest.mark.parametrize("block, message", [
    ('kind = "exec"\ntunnels = ["x"]\ncommand = ["/bin/true"]', "devices[0].name: is missing"),
    ('name = "a b"\nkind = "exec"\ntunnels = ["x"]', "devices[0].name: 'a b' is not a device name"),
    ('name = "d"\nkind = "ssh"\ntunnels = ["x"]', "devices[0].kind: unknown kind 'ssh'"),
    ('name = "d"\nkind = "exec"\ncommand = ["/bin/true"]', "devices[0].tunnels: is missing"),
    ('name = "d"\nkind = "exec"\ntunnels = []\ncommand = ["/bin/true"]', "devices[0].tunnels: matches no tunnel"),
    ('name = "d"\nkind = "exec"\ntunnels = [""]\ncommand = ["/bin/true"]',
     "devices[0].tunnels[0]: expected a non-empty string"),
    ('name = "d"\nkind = "exec"\ntunnels = ["x"]', "devices[0].command: is missing"),
    ('name = "d"\nkind = "exec"\ntunnels = ["x"]\ncommand = []', "devices[0].command: is empty"),
    ('name = "d"\nkind = "exec"\ntunnels = ["x"]\ncommand = ["/nonexistent/hook"]',
     "devices[0].command: '/nonexistent/hook' is not an executable file"),
    ('name = "d"\nkind = "exec"\ntunnels = ["x"]\ncommand = "/bin/true"',
     "devices[0].command: expected a list of strings, got str"),
    ('name = "d"\nkind = "webhook"\ntunnels = ["x"]\nurl = "http://router.example.net/psk"\nsecret_file = "/x"',
     "devices[0].url: plain http to router.example.net would send keys unencrypted"),
    ('name = "d"\nkind = "webhook"\ntunnels = ["x"]\nurl = "ftp://router"\nsecret_file = "/x"',
     "devices[0].url: 'ftp://router' is not an http(s) URL"),
    ('name = "d"\nkind = "webhook"\ntunnels = ["x"]\nurl = "https://u:p@router/"\nsecret_file = "/x"',
     "devices[0].url: the URL carries credentials"),
    ('name = "d"\nkind = "webhook"\ntunnels = ["x"]\nurl = "https://router/"\nsecret_file = "/nonexistent"',
     "devices[0].secret_file: cannot read /nonexistent"),
    ('name = "d"\nkind = "webhook"\ntunnels = ["x"]\nurl = "https://router/"', "devices[0].secret_file: is missing"),
    ('name = "d"\nkind = "strongswan"\ntunnels = ["x"]', "devices[0].owners: is missing"),
    ('name = "d"\nkind = "strongswan"\ntunnels = ["x"]\nowners = []', "devices[0].owners: is empty"),
    ('name = "d"\nkind = "strongswan"\ntunnels = ["x"]\nowners = ["{peer}"]',
     "devices[0].owners[0]: unknown field {peer}"),
    ('name = "d"\nkind = "strongswan"\ntunnels = ["x"]\nowners = ["a"]\nike = "{tunnel_name"',
     "devices[0].ike: '{tunnel_name' is not a valid template"),
    ('name = "d"\nkind = "strongswan"\ntunnels = ["x"]\nowners = ["a"]\nreauth = "bounce"',
     "devices[0].reauth: unknown mode 'bounce'"),
    ('name = "d"\nkind = "strongswan"\ntunnels = ["x"]\nowners = ["a"]\nsocket = "charon.vici"',
     "devices[0].socket: 'charon.vici' is not an absolute path"),
    ('name = "d"\nkind = "manual"\ntunnels = ["x"]\nverify = true', "devices[0].verify: a manual device cannot"),
    ('name = "d"\nkind = "manual"\ntunnels = ["x"]\nack_timeout = "never"', "devices[0].ack_timeout: 'never'"),
])
def test_bad_kind_settings_name_the_key(block, message):
    with pytest.raises(ConfigError) as err:
        parse_devices(devices(f"[[devices]]\n{block}\n"))
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_a_short_webhook_secret_is_refused(tmp_path):
    path = tmp_path / "k"
    path.write_text("short")
    with pytest.raises(ConfigError, match=r"devices\[0\].secret_file: .* too short"):
        parse_devices([{"name": "d", "kind": "webhook", "tunnels": ["x"], "url": "https://r/", "secret_file": str(path)}])


def test_plain_http_is_accepted_on_loopback(secret_file):
    for url in ("http://127.0.0.1:8080/psk", "http://localhost/psk", "http://[::1]:9/"):
        (spec,) = parse_devices([{"name": "d", "kind": "webhook", "tunnels": ["x"], "url": url,
                                  "secret_file": secret_file}])
        assert spec.settings.url == url


def test_duplicate_names_and_wrong_shapes_are_errors():
    block = {"name": "d", "kind": "manual", "tunnels": ["x"]}
    with pytest.raises(ConfigError, match=r"^devices\[1\]\.name: 'd' is already the name of devices\[0\]"):
        parse_devices([block, dict(block)])
    with pytest.raises(ConfigError, match=r"^devices: expected an array of tables, got dict"):
        parse_devices({"name": "d"})
    with pytest.raises(ConfigError, match=r"^devices\[0\]: expected a table, got str"):
        parse_devices(["d"])
    assert parse_devices([]) == ()


def tunnel(name: str, tid: str | None = None) -> TunnelInfo:
    return TunnelInfo(tid or (name.encode().hex() + "0" * 32)[:32], name)


def test_the_first_matching_device_owns_a_tunnel():
    specs = parse_devices([
        {"name": "only-other", "kind": "manual", "tunnels": ["*"], "accounts": [OTHER]},
        {"name": "by-id", "kind": "manual", "tunnels": ["a" * 32]},
        {"name": "sites", "kind": "manual", "tunnels": ["site-*", "aws-?"]},
        {"name": "late", "kind": "manual", "tunnels": ["site-1", "nothing-*"]},
    ])
    registry = DeviceRegistry(specs)
    owner = lambda acc, t: (d.name if (d := registry.for_account(acc)(t)) else None)
    assert owner(OTHER, tunnel("anything")) == "only-other"
    assert owner(ACCOUNT, tunnel("site-1", "a" * 32)) == "by-id"
    assert owner(ACCOUNT, tunnel("site-1")) == "sites"
    assert owner(ACCOUNT, tunnel("aws-1")) == "sites"
    assert owner(ACCOUNT, tunnel("aws-12")) is None
    assert owner(ACCOUNT, tunnel("Site-1")) is None  # globs are case-sensitive, like selections
    assert registry.spec_for(ACCOUNT, tunnel("site-2")).path == "devices[2]"
    warnings = registry.unmatched_patterns({ACCOUNT: [tunnel("site-1"), tunnel("aws-1")]})
    assert warnings == [
        "devices[0].tunnels[0]: '*' matches no tunnel of its accounts",
        f"devices[1].tunnels[0]: '{'a' * 32}' matches no tunnel of the configured accounts",
        "devices[3].tunnels[0]: 'site-1' only matches tunnels owned by an earlier device (sites): "
        "the first match owns a tunnel",
        "devices[3].tunnels[1]: 'nothing-*' matches no tunnel of the configured accounts",
    ]
