"""Deployment artefacts checked with real tools, no cluster and no init system needed.

Kubernetes: every manifest in config/deploy/kubernetes/ is validated against the Kubernetes API's
own JSON schemas (kubernetes-validate, kubectl-free), every name one object refers to exists in
another, and the ConfigMap's rotator.toml passes `rotator config check` and runs the daemon with
Kubernetes auth against the Vault simulator. systemd: the unit passes `systemd-analyze verify`
and its offline security review, and the env file plus the example config pass `config check`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from rotator.sim import Simulators
from tests.helpers import OUTPUTS, SECRETS, wait_for

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "config" / "deploy" / "kubernetes"
SYSTEMD = ROOT / "config" / "deploy" / "systemd"
UNIT = SYSTEMD / "psk-rotator.service"
# The oldest Kubernetes minor version the manifests promise to work with, and the newest schemas known.
K8S_VERSIONS = ("1.27.0", kubernetes_validate.utils.latest_version())
NAMESPACED = {"ServiceAccount", "ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget",
              "ServiceMonitor"}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _objects() -> dict[tuple[str, str], dict[str, Any]]:
    """Every object in the directory by (kind, name); a duplicate is an error."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in _docs(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in out, f"{key} defined twice"
            out[key] = doc
    return out


def _tool(name: str, package: str = "") -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing: CI must install it (.ci/run)")
        pytest.skip(f"{name} not installed (apt-get install {package or name})")
    return path


def _clean_env(**extra: str) -> dict[str, str]:
    """A process environment with nothing of the caller's Vault or Cloudflare settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "CLOUDFLARE_", "ROTATOR_"))}
    return {**env, **extra}


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "rotator", *args], env=env, capture_output=True, text=True,
                          timeout=60)
    OUTPUTS.extend([proc.stdout, proc.stderr])
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# --- Kubernetes -------------------------------------------------------------------------------------

def test_every_manifest_passes_the_kubernetes_api_schemas():
    objs = _objects()
    checked = 0
    for (kind, name), doc in objs.items():
        if kind == "ServiceMonitor":  # a CRD: not in the Kubernetes API's schemas; its references are checked below
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)  # raises on an unknown or mistyped field
        checked += 1
    assert checked >= 7, sorted(objs)


def test_the_schema_check_catches_a_misspelled_field():
    deployment = _objects()[("Deployment", "psk-rotator")]
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_kustomization_lists_existing_files_and_names_the_deployment_image():
    kust = _docs(K8S / "kustomization.yaml")[0]
    assert kust["kind"] == "Kustomization"
    for res in kust["resources"]:
        assert (K8S / res).is_file(), res
    listed = set(kust["resources"])
    # Every manifest is applied by the kustomization, or says in it why not (commented out) or is the Secret's template.
    text = (K8S / "kustomization.yaml").read_text()
    for path in K8S.glob("*.yaml"):
        if path.name not in ("kustomization.yaml", "secret.example.yaml"):
            assert path.name in listed or f"# - {path.name}" in text, path.name
    image_names = {i["name"] for i in kust["images"]}
    container = _objects()[("Deployment", "psk-rotator")]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] in image_names
    objs = _objects()
    namespace = kust["namespace"]
    assert ("Namespace", namespace) in objs
    for (kind, name), doc in objs.items():
        if kind in NAMESPACED:
            assert doc["metadata"].get("namespace") == namespace, (kind, name)


def test_every_name_a_manifest_refers_to_exists():
    objs = _objects()
    dep = objs[("Deployment", "psk-rotator")]
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    ns = dep["metadata"]["namespace"]
    assert _selects(dep["spec"]["selector"]["matchLabels"], labels)
    assert ("ServiceAccount", spec["serviceAccountName"]) in objs
    (container,) = spec["containers"]
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}

    # Secret keys the env reads: required ones must be in the Secret's template, optional ones mentioned there.
    secret_text = (K8S / "secret.example.yaml").read_text()
    secrets_by_name = {name: doc for (kind, name), doc in objs.items() if kind == "Secret"}
    env = {e["name"]: e for e in container["env"]}
    for e in env.values():
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            secret = secrets_by_name[ref["name"]]
            assert e["name"] == ref["key"], "Secret keys carry the variable's own name"
            if ref.get("optional"):
                assert f"# {ref['key']}:" in secret_text, ref["key"]
            else:
                assert ref["key"] in {**secret.get("stringData", {}), **secret.get("data", {})}, ref["key"]
    assert {"CLOUDFLARE_API_TOKEN", "ROTATOR_ADMIN_TOKEN", "ROTATOR_CONFIG"} <= set(env)
    # The leader advertises its own pod's admin port, so a CLI in any replica reaches it (issue 20 item 11).
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["ROTATOR_ADMIN_ADVERTISE_URL"]["value"] == f"http://$(POD_IP):{port_names['admin']}"
    assert list(env).index("POD_IP") < list(env).index("ROTATOR_ADMIN_ADVERTISE_URL")  # $(VAR) needs it earlier

    # Volumes: every mount has a volume, every volume is mounted, ConfigMap keys exist.
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert set(mounts) == set(volumes)
    cm = volumes["config"]["configMap"]
    cm_data = objs[("ConfigMap", cm["name"])]["data"]
    for item in cm["items"]:
        assert item["key"] in cm_data
    assert env["ROTATOR_CONFIG"]["value"] == f"{mounts['config']['mountPath']}/{cm['items'][0]['path']}"

    # Probes hit a named container port; the admin listen port in the config is that port.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] in port_names, probe
    listen = re.search(r'listen = "([^"]+)"', cm_data["rotator.toml"]).group(1)
    assert listen.startswith("0.0.0.0:") and int(listen.rsplit(":", 1)[1]) == port_names["admin"]

    # Service -> pods, ServiceMonitor -> Service, PDB -> pods.
    svc = objs[("Service", "psk-rotator")]
    assert _selects(svc["spec"]["selector"], labels)
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    for p in svc_ports.values():
        assert p["targetPort"] in port_names
    sm = objs[("ServiceMonitor", "psk-rotator")]
    assert _selects(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert ns in sm["spec"]["namespaceSelector"]["matchNames"]
    for endpoint in sm["spec"]["endpoints"]:
        assert endpoint["port"] in svc_ports and endpoint["path"] == "/metrics"
    pdb = objs[("PodDisruptionBudget", "psk-rotator")]
    assert _selects(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"]["minAvailable"] < dep["spec"]["replicas"], "a drain must be able to evict one pod"

    # The token-review binding names the rotator's ServiceAccount in its namespace.
    crb = objs[("ClusterRoleBinding", "psk-rotator-vault-token-review")]
    (subject,) = crb["subjects"]
    assert (subject["kind"], subject["name"], subject["namespace"]) == ("ServiceAccount", spec["serviceAccountName"], ns)

    # The pod runs as the image's user.
    uid = int(re.search(r"^USER (\d+)$", (ROOT / "Dockerfile").read_text(), re.M).group(1))
    assert spec["securityContext"]["runAsUser"] == uid


def _k8s_env(objs: dict[tuple[str, str], dict[str, Any]]) -> dict[str, str]:
    """The variables the container gets: literal values and the Secret template's (required) keys."""
    container = objs[("Deployment", "psk-rotator")]["spec"]["template"]["spec"]["containers"][0]
    secret = objs[("Secret", "psk-rotator")]["stringData"]
    env = {}
    for e in container["env"]:
        if "value" in e:  # $(VAR) is Kubernetes' own expansion of an earlier variable
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), e["value"])
        elif "fieldRef" in e["valueFrom"]:  # the downward API: the pod's IP is this test's loopback
            env[e["name"]] = {"status.podIP": "127.0.0.1"}[e["valueFrom"]["fieldRef"]["fieldPath"]]
        elif e["valueFrom"]["secretKeyRef"]["key"] in secret:
            env[e["name"]] = secret[e["valueFrom"]["secretKeyRef"]["key"]]
    return env


def test_the_configmap_passes_config_check_with_the_pods_environment(tmp_path):
    objs = _objects()
    cfg = tmp_path / "rotator.toml"
    cfg.write_text(objs[("ConfigMap", "psk-rotator")]["data"]["rotator.toml"])
    env = _k8s_env(objs)
    env["ROTATOR_CONFIG"] = str(cfg)  # the mounted path, in this test's directory
    proc = _run(["config", "check"], _clean_env(**env))
    assert proc.returncode == 0, proc.stderr
    effective = json.loads(proc.stdout)
    assert effective["vault"]["auth"] == "kubernetes" and effective["vault"]["token"] == "<unset>"
    assert effective["admin"]["token"] == "<set>" and effective["cloudflare"]["api_token"] == "<set>"
    # Without the Secret the same file is refused, with one line naming the fix.
    del env["CLOUDFLARE_API_TOKEN"]
    proc = _run(["config", "check"], _clean_env(**env))
    assert proc.returncode == 2 and "CLOUDFLARE_API_TOKEN" in proc.stderr and "Traceback" not in proc.stderr


def test_the_configmap_runs_the_daemon_with_kubernetes_auth_and_the_probes_answer(tmp_path):
    """The pod's configuration, as the pod would run it, against the simulators: the daemon logs in to
    Vault with the ServiceAccount token of the role docs/kubernetes.md creates, and every probe path
    and the ServiceMonitor's path answer on the admin port."""
    objs = _objects()
    dep = objs[("Deployment", "psk-rotator")]
    container = dep["spec"]["template"]["spec"]["containers"][0]
    ns, sa = dep["metadata"]["namespace"], dep["spec"]["template"]["spec"]["serviceAccountName"]
    toml = objs[("ConfigMap", "psk-rotator")]["data"]["rotator.toml"]
    role = re.search(r'role = "([^"]+)"', toml).group(1)
    with Simulators(accounts=1, tunnels=2) as sims:
        jwt = sims.vault.add_kubernetes_role(role, ["rotator"], service_account=sa, namespace=ns)
        SECRETS.update({jwt, sims.vault_token, sims.cloudflare_api_token})
        jwt_file = tmp_path / "token"
        jwt_file.write_text(jwt)
        account = next(iter(sims.tunnels_by_account))
        # Only what points at the cluster changes: the token path, the listen port, the account id.
        toml = re.sub(r'jwt_file = "[^"]+"', f'jwt_file = "{jwt_file}"', toml)
        port = _free_port()
        toml = re.sub(r'listen = "[^"]+"', f'listen = "127.0.0.1:{port}"', toml)
        toml = re.sub(r'id = "[0-9a-f]{32}"', f'id = "{account}"', toml)
        cfg = tmp_path / "rotator.toml"
        cfg.write_text(toml)
        env = _k8s_env(objs)
        env.update(ROTATOR_CONFIG=str(cfg), VAULT_ADDR=sims.vault_addr,
                   CLOUDFLARE_API_TOKEN=sims.cloudflare_api_token, CLOUDFLARE_BASE_URL=sims.cloudflare_base_url)
        proc = subprocess.Popen([sys.executable, "-m", "rotator", *container["args"]], env=_clean_env(**env),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        admin = f"http://127.0.0.1:{port}"
        try:

            def answers(path: str) -> bool:
                try:
                    return httpx.get(admin + path, timeout=5).status_code == 200
                except httpx.TransportError:
                    assert proc.poll() is None, "the daemon exited"
                    return False

            paths = {container[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}
            paths |= {e["path"] for e in objs[("ServiceMonitor", "psk-rotator")]["spec"]["endpoints"]}
            assert paths == {"/healthz", "/readyz", "/metrics"}

            wait_for(lambda: all(answers(p) for p in sorted(paths)), timeout=30,
                     what="the probes and /metrics answering 200")
            assert "psk_rotator_build_info" in httpx.get(admin + "/metrics", timeout=5).text
            # Ready means logged in to Vault: as the ServiceAccount, through the Kubernetes auth role.
            logins = [t for t in list(sims.vault.tokens.values())
                      if (t.meta or {}).get("service_account_name") == sa]
            assert logins and logins[0].meta["service_account_namespace"] == ns and logins[0].meta["role"] == role
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
            OUTPUTS.extend([out, err])
        assert proc.returncode == 0, err[-2000:]
        assert "Traceback" not in err


# --- systemd ----------------------------------------------------------------------------------------

def _unit_root(tmp_path: Path, unit_text: str) -> Path:
    """A root for `systemd-analyze verify --root`: the system's unit files, ours, and an executable at ExecStart."""
    root = tmp_path / "root"
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    (root / "usr" / "lib" / "systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    (root / "etc" / "systemd" / "system" / UNIT.name).write_text(unit_text)
    exec_start = re.search(r"^ExecStart=(\S+)", unit_text, re.M).group(1)
    exe = root / exec_start.lstrip("/")
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    return root


def _verify(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_tool("systemd-analyze", "systemd"), "verify", f"--root={root}", UNIT.name], capture_output=True,
                          text=True, timeout=60)


def test_the_unit_passes_systemd_analyze_verify_without_a_warning(tmp_path):
    if not Path("/usr/lib/systemd/system/multi-user.target").exists():
        pytest.skip("no systemd unit files here (apt-get install systemd)")
    proc = _verify(_unit_root(tmp_path, UNIT.read_text()))
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stdout + proc.stderr
    # The check is real: a misspelled directive is reported.
    broken = UNIT.read_text().replace("ProtectSystem=", "ProtectSytem=")
    proc = _verify(_unit_root(tmp_path / "broken", broken))
    assert "ProtectSytem" in proc.stdout + proc.stderr


def test_the_unit_is_hardened_by_systemds_own_measure(tmp_path):
    if not Path("/usr/lib/systemd/system/multi-user.target").exists():
        pytest.skip("no systemd unit files here (apt-get install systemd)")
    root = _unit_root(tmp_path, UNIT.read_text())
    proc = subprocess.run([_tool("systemd-analyze", "systemd"), "security", "--offline=yes", f"--root={root}", "--no-pager",
                           UNIT.name], capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout + proc.stderr)
    assert match, proc.stdout + proc.stderr
    # 0 = fully locked down, 10 = unprotected; systemd calls under 2.0 "OK". Ours is a network client.
    assert float(match.group(1)) <= 2.0, proc.stdout


def _env_file() -> dict[str, str]:
    env = {}
    for line in (SYSTEMD / "psk-rotator.env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value.strip('"')
    return env


def test_the_env_file_and_the_example_config_pass_config_check(tmp_path):
    unit = UNIT.read_text()
    assert re.search(r"^EnvironmentFile=-?/etc/psk-rotator/env$", unit, re.M)
    config_path = re.search(r"^Environment=ROTATOR_CONFIG=(\S+)$", unit, re.M).group(1)
    assert config_path == "/etc/psk-rotator/rotator.toml"
    env = _env_file()
    known = {"VAULT_ADDR", "VAULT_TOKEN", "VAULT_NAMESPACE", "VAULT_CACERT", "VAULT_ROLE_ID", "VAULT_SECRET_ID",
             "CLOUDFLARE_API_TOKEN", "CLOUDFLARE_EMAIL", "CLOUDFLARE_API_KEY", "CLOUDFLARE_BASE_URL",
             "ROTATOR_ADMIN_TOKEN"}
    assert set(env) <= known and {"VAULT_ADDR", "VAULT_TOKEN", "CLOUDFLARE_API_TOKEN", "ROTATOR_ADMIN_TOKEN"} <= set(env)
    cfg = tmp_path / "rotator.toml"
    shutil.copy(ROOT / "config" / "rotator.example.toml", cfg)  # docs/systemd.md: copy it to /etc/psk-rotator/
    proc = _run(["config", "check"], _clean_env(**env, ROTATOR_CONFIG=str(cfg)))
    assert proc.returncode == 0, proc.stderr
    effective = json.loads(proc.stdout)
    assert effective["vault"]["token"] == "<set>" and effective["admin"]["token"] == "<set>"


# --- the lock the image installs ---------------------------------------------------------------------------

def _lock() -> dict[str, tuple[str, list[str]]]:
    """requirements.lock as {normalised name: (version, hashes)}."""
    entries: dict[str, tuple[str, list[str]]] = {}
    text = (ROOT / "requirements.lock").read_text()
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        head = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", block)
        if head:
            entries[canonicalize_name(head[1])] = (head[2], re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
    return entries


def test_every_runtime_dependency_is_pinned_in_the_lock_with_a_hash():
    """requirements.lock (tools/lock.sh) covers pyproject's dependencies at versions they allow, every
    entry with its hashes: the image installs it with --require-hashes, so nothing unpinned gets in."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lock = _lock()
    assert len(lock) >= len(project["dependencies"]), lock
    stale = []
    for dep in map(Requirement, project["dependencies"]):
        if dep.marker is not None and not dep.marker.evaluate():
            continue
        pinned = lock.get(canonicalize_name(dep.name))
        if pinned is None or not dep.specifier.contains(pinned[0], prereleases=True):
            stale.append(f"{dep} (lock: {pinned[0] if pinned else 'absent'})")
    assert not stale, f"requirements.lock is stale for {stale}: run tools/lock.sh"
    unhashed = [name for name, (_, hashes) in lock.items() if not hashes]
    assert not unhashed, f"entries without a hash: {unhashed}"
    assert "tools/lock.sh" in (ROOT / "requirements.lock").read_text(), "the lock names the command that made it"


def test_the_dockerfile_installs_the_lock_with_hashes_then_the_project_alone():
    steps = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    lock = steps.index("--require-hashes -r requirements.lock")
    project = steps.index("--no-deps .")
    assert "COPY pyproject.toml README.md requirements.lock" in steps and lock < project
    assert re.search(r"pip install --no-cache-dir \.\s", steps) is None, "the project never resolves its own deps"


# --- the container image, built for real --------------------------------------------------------------

@pytest.mark.image
@pytest.mark.skipif(os.environ.get("ROTATOR_IMAGE_TEST") != "1",
                    reason="builds the image with buildah (minutes, root): set ROTATOR_IMAGE_TEST=1")
@pytest.mark.timeout(1800)
def test_the_image_builds_and_runs_help_and_the_demo():
    """tools/build-image.sh: the Dockerfile through buildah, then `rotator --help` and `rotator demo` inside,
    once as buildah runs the container and once on its root file system mounted read-only."""
    if os.geteuid() != 0:
        pytest.skip("buildah with vfs storage and chroot isolation needs root")
    for name in ("buildah", "debootstrap"):
        _tool(name)
    proc = subprocess.run(["bash", str(ROOT / "tools" / "build-image.sh")], capture_output=True, text=True,
                          timeout=1700)
    OUTPUTS.extend([proc.stdout, proc.stderr])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["event"] == "image_built"
    assert result["user"] == "10001" and result["entrypoint"] == ["rotator"] and result["cmd"] == ["run"]
    assert result["healthcheck"] and "/healthz" in " ".join(result["healthcheck"])
    for demo in (result["demo"], result["demo_read_only_root"]):
        assert demo["uid"] == 10001, "the demo ran as the image's user"
        assert demo["demo_ready"]["event"] == "demo_ready" and demo["healthz"] == 200
        assert demo["healthcheck_exit"] == 0, "the image's HEALTHCHECK command passes against the running demo"
        assert demo["rotated"] >= 1 and demo["exit"] == 0 and not demo["traceback"]
    # As config/deploy/kubernetes runs it: readOnlyRootFilesystem, /tmp an emptyDir.
    assert result["demo_read_only_root"]["root_read_only"] and not result["demo"]["root_read_only"]


# --- the docs -------------------------------------------------------------------------------------------

def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, re.M):
        out.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return out


def test_every_link_in_the_deployment_docs_resolves():
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert {p.name for p in pages} >= {"kubernetes.md", "systemd.md", "upgrading.md", "rollback.md"}
    readme = (ROOT / "README.md").read_text()
    deploying = readme[readme.index("## Deploying"):readme.index("## Benchmarks")]
    checked = 0
    for page, text in [(p, p.read_text()) for p in pages] + [(ROOT / "README.md", deploying)]:
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith("http"):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), target
            if anchor and file.suffix == ".md":
                assert anchor in _anchors(file.read_text()), target
            checked += 1
    assert checked >= 20


def test_the_kubernetes_walkthrough_names_what_the_manifests_use():
    """The Vault role, the Secret command and the image step in docs/kubernetes.md match the manifests."""
    doc = (ROOT / "docs" / "kubernetes.md").read_text()
    objs = _objects()
    dep = objs[("Deployment", "psk-rotator")]
    ns, sa = dep["metadata"]["namespace"], dep["spec"]["template"]["spec"]["serviceAccountName"]
    toml = objs[("ConfigMap", "psk-rotator")]["data"]["rotator.toml"]
    role = re.search(r'role = "([^"]+)"', toml).group(1)
    auth_mount = re.search(r'mount = "([^"]+)"', toml[toml.index("[vault.auth]"):]).group(1)
    assert f"vault write auth/{auth_mount}/role/{role} " in doc
    assert re.findall(r"bound_service_account_names=(\S+)", doc) == [sa]
    assert re.findall(r"bound_service_account_namespaces=(\S+)", doc) == [ns]
    policy = re.search(r"token_policies=(\S+)", doc).group(1)
    assert f"vault policy write {policy} " in doc
    # The `kubectl create secret` command creates the Secret the pod reads, with every required key.
    command = re.search(r"kubectl -n (\S+) create secret generic (\S+) ((?:.*\\\n)*.*)", doc)
    assert command and command.group(1) == ns
    secret = objs[("Secret", command.group(2))]
    assert set(re.findall(r"--from-literal=(\w+)=", command.group(3))) == set(secret["stringData"])
    container = dep["spec"]["template"]["spec"]["containers"][0]
    kust = _docs(K8S / "kustomization.yaml")[0]
    assert f"kustomize edit set image {container['image']}=" in doc and kust["namespace"] == ns


def test_the_systemd_walkthrough_names_what_the_unit_uses():
    doc = (ROOT / "docs" / "systemd.md").read_text()
    unit = UNIT.read_text()
    user = re.search(r"^User=(\S+)$", unit, re.M).group(1)
    env_file = re.search(r"^EnvironmentFile=-?(\S+)$", unit, re.M).group(1)
    config = re.search(r"^Environment=ROTATOR_CONFIG=(\S+)$", unit, re.M).group(1)
    venv = re.search(r"^ExecStart=(\S+)/bin/rotator run$", unit, re.M).group(1)
    assert re.search(rf"useradd (?:.*\\\n)*.*\b{user}$", doc, re.M), "the user the unit runs as is created"
    assert f"python3 -m venv {venv}" in doc
    assert re.search(rf"install -m 0640 -o root -g {user} \S+ {config}$", doc, re.M)
    assert re.search(rf"install -m 0640 -o root -g {user} \S*psk-rotator.env.example {env_file}$", doc, re.M)
    assert f"install -m 0644 config/deploy/systemd/{UNIT.name} /etc/systemd/system/" in doc
