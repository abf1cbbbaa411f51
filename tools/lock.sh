#!/usr/bin/env bash
# Regenerate requirements.lock, the hash-pinned lock of the runtime dependencies, from pyproject.toml.
# One command after any change of [project] dependencies: tools/lock.sh (pip-tools' pip-compile, from the
# test extra; `make lock` does the same). The Dockerfile installs exactly this lock with --require-hashes,
# then the project with --no-deps; tests/test_deploy.py checks that every dependency is pinned with a hash.
# https://pip-tools.readthedocs.io/en/stable/#using-hashes
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
if [ ! -x "$BIN/pip-compile" ]; then
  echo "tools/lock.sh: $BIN/pip-compile is missing: run make (or pip install -e '.[test]') first" >&2
  exit 1
fi
# Resolved for the interpreter that runs pip-compile: the image's Python (3.11) is the project's floor.
CUSTOM_COMPILE_COMMAND="tools/lock.sh" "$BIN/pip-compile" --quiet --generate-hashes --no-emit-index-url \
  --no-emit-find-links --strip-extras --newline lf --output-file requirements.lock pyproject.toml
echo "requirements.lock: $(grep -c '^[a-z0-9]' requirements.lock) pinned packages"
