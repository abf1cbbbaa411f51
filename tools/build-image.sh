#!/usr/bin/env bash
# Build the container image from the Dockerfile without a Docker engine, then prove it runs.
#
#   sudo tools/build-image.sh [--fresh] [--keep]
#
# 1. Builder: buildah (Debian package), vfs storage under $WORK, chroot isolation: root, no daemon.
# 2. Base: Docker Hub's python:3.11.11-slim-bookworm when it can be pulled; otherwise a Debian
#    bookworm root made with debootstrap (python3, python3-venv, python-is-python3, ca-certificates),
#    imported as localhost/psk-rotator-base:bookworm and passed as PYTHON_IMAGE. Cached in $WORK;
#    --fresh makes it again.
# 3. `buildah build` runs the Dockerfile's two stages (pip installs from PyPI inside the build).
# 4. Proof, inside a container of the built image, as its user: `rotator --help`, then `rotator demo`
#    until it prints demo_ready, GET /healthz, the image's HEALTHCHECK command, rotations in /metrics,
#    SIGINT, exit 0; then the demo again on the image's root mounted read-only with a tmpfs /tmp, as
#    the Kubernetes manifests run it.
# The last line printed is one JSON object with the figures. Everything made is removed on exit
# except the base cache and, with --keep, the image (then: buildah --root $WORK/storage ... push).
set -euo pipefail

cd "$(dirname "$0")/.."
WORK=${ROTATOR_IMAGE_WORK:-/var/tmp/psk-rotator-image}
MIRROR=${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
UPSTREAM=docker.io/library/python:3.11.11-slim-bookworm
LOCAL_BASE=localhost/psk-rotator-base:bookworm
VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' rotator/__init__.py)
IMAGE=localhost/psk-rotator:$VERSION
FRESH=0 KEEP=0
for arg in "$@"; do
  case $arg in
    --fresh) FRESH=1 ;;
    --keep) KEEP=1 ;;
    *) echo "build-image: unknown option $arg (use --fresh, --keep)" >&2; exit 2 ;;
  esac
done

die() { echo "build-image: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (buildah with vfs storage and chroot isolation); run it with sudo"
for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || die "$tool is missing: apt-get install -y --no-install-recommends buildah debootstrap"
done

mkdir -p "$WORK"
B=(buildah --root "$WORK/storage" --runroot "$WORK/run" --storage-driver vfs)
containers=()
cleanup() {
  for c in "${containers[@]}"; do "${B[@]}" rm "$c" >/dev/null 2>&1 || true; done
  if [ "$KEEP" = 0 ]; then "${B[@]}" rmi -f "$IMAGE" >/dev/null 2>&1 || true; fi
  rm -rf "$WORK/rootfs.new"
}
trap cleanup EXIT

now() { date +%s.%N; }
t0=$(now)

# --- 2. the base image ---------------------------------------------------------------------------
base_source=""
if timeout 60 "${B[@]}" pull -q "$UPSTREAM" >/dev/null 2>"$WORK/pull.err"; then
  base=$UPSTREAM base_source="pulled $UPSTREAM"
else
  echo "build-image: cannot pull $UPSTREAM ($(tail -1 "$WORK/pull.err" | cut -c1-160)); using a debootstrap root" >&2
  base=$LOCAL_BASE
  if [ "$FRESH" = 1 ]; then "${B[@]}" rmi -f "$LOCAL_BASE" >/dev/null 2>&1 || true; rm -rf "$WORK/rootfs"; fi
  if ! "${B[@]}" inspect --type image "$LOCAL_BASE" >/dev/null 2>&1; then
    if [ ! -x "$WORK/rootfs/usr/bin/python3" ]; then
      rm -rf "$WORK/rootfs.new"
      echo "build-image: debootstrap bookworm from $MIRROR (a few minutes)" >&2
      debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
        bookworm "$WORK/rootfs.new" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || die "debootstrap failed: see $WORK/debootstrap.log"
      rm -rf "$WORK/rootfs.new"/var/cache/apt/archives/*.deb "$WORK/rootfs.new"/var/lib/apt/lists/*
      mv "$WORK/rootfs.new" "$WORK/rootfs"
    fi
    c=$("${B[@]}" from scratch); containers+=("$c")
    mnt=$("${B[@]}" mount "$c")
    cp -a "$WORK/rootfs/." "$mnt/"
    "${B[@]}" umount "$c" >/dev/null
    "${B[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
      --cmd python3 --label org.opencontainers.image.description="Debian bookworm minbase with python3 (debootstrap)" "$c"
    "${B[@]}" commit -q --format docker "$c" "$LOCAL_BASE" >/dev/null
  fi
  base_source="debootstrap bookworm from $MIRROR"
fi
t_base=$(now)

# --- 3. the Dockerfile ---------------------------------------------------------------------------
# Where HTTPS goes through a proxy with its own CA (pip's `cert` setting on this host, or
# ROTATOR_IMAGE_CA), the build's pip trusts that CA too: mounted for the RUN steps only, not in the image.
build_mounts=()
ca=${ROTATOR_IMAGE_CA:-${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}}
if [ -n "$ca" ] && [ -f "$ca" ]; then
  printf '[global]\ncert = /run/build-ca.pem\n' >"$WORK/pip.conf"
  build_mounts=(-v "$ca:/run/build-ca.pem:ro" -v "$WORK/pip.conf:/etc/pip.conf:ro")
fi
# --format docker keeps HEALTHCHECK (the OCI format has no such field).
"${B[@]}" build --isolation chroot --format docker --build-arg "PYTHON_IMAGE=$base" "${build_mounts[@]}" \
  -t "$IMAGE" -f Dockerfile . \
  >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log" >&2; die "the Dockerfile build failed: see $WORK/build.log"; }
t_build=$(now)
"${B[@]}" inspect --type image "$IMAGE" >"$WORK/inspect.json"
"${B[@]}" images --format '{{.Size}}' "$IMAGE" >"$WORK/size.txt" 2>/dev/null || echo "?" >"$WORK/size.txt"

# --- 4. proof ------------------------------------------------------------------------------------
# The image's own HEALTHCHECK command (run below against the demo's admin port).
healthcheck=$(python3 -c 'import json, sys; print(json.dumps(json.load(open(sys.argv[1]))["Docker"]["config"]["Healthcheck"]["Test"][1:]))' "$WORK/inspect.json")
c=$("${B[@]}" from -q "$IMAGE"); containers+=("$c")
help_out=$("${B[@]}" run --isolation chroot "$c" -- rotator --help)
grep -q "rotate" <<<"$help_out" || die "rotator --help in the image printed no command list"
# One Python process inside the container drives the demo: start, wait for demo_ready (bounded),
# probe it over loopback, SIGINT, and report. stdout: one JSON line.
probe=$(cat <<'PY'
import json, os, signal, subprocess, sys, time, urllib.request
t0 = time.monotonic()
p = subprocess.Popen(["rotator", "demo", "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     text=True)
try:
    line = p.stdout.readline()
    ready = json.loads(line)
    assert ready["event"] == "demo_ready", line
    t_ready = time.monotonic() - t0
    health = urllib.request.urlopen(ready["admin_url"] + "/healthz", timeout=5).status
    port = ready["admin_url"].rsplit(":", 1)[1]
    check = [a.replace("127.0.0.1:9477", "127.0.0.1:" + port) for a in json.loads(sys.argv[1])]
    healthcheck = subprocess.run(check, timeout=30).returncode
    deadline = time.monotonic() + 60
    rotated = 0.0
    while time.monotonic() < deadline and rotated < 1:
        text = urllib.request.urlopen(ready["metrics_url"], timeout=5).read().decode()
        rotated = sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
                      if l.startswith("psk_rotator_rotations_total{") and 'result="rotated"' in l)
        time.sleep(0.2)
finally:
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
print(json.dumps({"uid": os.getuid(), "root_read_only": bool(os.statvfs("/").f_flag & os.ST_RDONLY),
                  "demo_ready": ready, "seconds_to_ready": round(t_ready, 2), "healthz": health, "healthcheck_exit": healthcheck,
                  "rotated": rotated, "exit": p.returncode, "traceback": "Traceback" in err}))
PY
)
demo_out=$("${B[@]}" run --isolation chroot "$c" -- python -c "$probe" "$healthcheck" | tail -1)
# The same again as the Kubernetes pod runs it (config/deploy/kubernetes): the image's root file
# system read-only, /tmp a small tmpfs, uid and gid 10001, no environment but the image's.
mnt=$("${B[@]}" mount "$c")
mkdir -p "$mnt/tmp" "$mnt/dev" "$mnt/proc"  # in this throwaway container, not in the image
# shellcheck disable=SC2016  # the inner script expands its own arguments
ro_out=$(unshare --mount --fork -- sh -ec '
  mnt=$1; shift
  mount --bind "$mnt" "$mnt"
  mount -o remount,bind,ro "$mnt"
  mount -t tmpfs -o size=16m,mode=1777 tmpfs "$mnt/tmp"
  mount --rbind /dev "$mnt/dev"
  mount -t proc proc "$mnt/proc"
  exec chroot --userspec=10001:10001 "$mnt" /usr/bin/env -i PATH=/opt/psk-rotator/bin:/usr/bin:/bin \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/nonexistent python -c "$@"
' sh "$mnt" "$probe" "$healthcheck" | tail -1)
"${B[@]}" umount "$c" >/dev/null
t_proof=$(now)
check_demo() {
  python3 - "$1" "$2" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
ok = (r["uid"] == 10001 and r["healthz"] == 200 and r["healthcheck_exit"] == 0 and r["rotated"] >= 1
      and r["exit"] == 0 and not r["traceback"] and (r["root_read_only"] or sys.argv[2] != "ro"))
sys.exit(0 if ok else 1)
PY
}
check_demo "$demo_out" rw || die "the demo did not run cleanly in the image: $demo_out"
check_demo "$ro_out" ro || die "the demo did not run cleanly on the image's read-only root: $ro_out"
python3 - "$WORK" "$IMAGE" "$base_source" "$demo_out" "$ro_out" "$t0" "$t_base" "$t_build" "$t_proof" <<'PY'
import json, sys
work, image, base, demo, demo_ro, t0, t_base, t_build, t_proof = sys.argv[1:]
config = json.load(open(f"{work}/inspect.json"))["Docker"]["config"]
t0, t_base, t_build, t_proof = map(float, (t0, t_base, t_build, t_proof))
print(json.dumps({"event": "image_built", "image": image, "base": base, "user": config.get("User"),
                  "entrypoint": config.get("Entrypoint"), "cmd": config.get("Cmd"),
                  "healthcheck": (config.get("Healthcheck") or {}).get("Test"),
                  "size": open(f"{work}/size.txt").read().strip(),
                  "seconds": {"base": round(t_base - t0, 1), "build": round(t_build - t_base, 1),
                              "proof": round(t_proof - t_build, 1)},
                  "help_ok": True, "demo": json.loads(demo), "demo_read_only_root": json.loads(demo_ro)}))
PY
