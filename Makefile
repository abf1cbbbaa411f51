# One venv in .venv, made on first use; `make test` is the README's test command and CI's.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

.PHONY: test lint demo bench campaign lock
lint: $(STAMP)
	$(BIN)/ruff check rotator tests
	$(BIN)/mypy
	$(BIN)/hadolint --failure-threshold warning Dockerfile

# Every test, the IKE lab, real Prometheus and the campaign included, on JOBS workers (pytest-xdist);
# the lab's tests share one worker (tests/ike/conftest.py); the secret scan merges every worker's.
JOBS ?= 4
PYTEST_ARGS ?=
test: lint
	$(BIN)/pytest -q -n $(JOBS) --dist loadgroup $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/rotator demo

bench: $(STAMP)
	$(BIN)/python tests/bench/run.py

# The long fault campaign (issue 9): the suite's fault classes for 20 minutes unless told otherwise;
# prints its seed, the checks made and the violations found. ROTATOR_CAMPAIGN_SEED replays a schedule.
campaign: $(STAMP)
	ROTATOR_CAMPAIGN_SECONDS=$${ROTATOR_CAMPAIGN_SECONDS:-1200} $(BIN)/python -m tests.campaign

# The hash-pinned lock of the runtime dependencies the image installs (requirements.lock), from pyproject.toml.
lock: $(STAMP)
	VENV=$(VENV) tools/lock.sh
