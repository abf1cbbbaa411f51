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

.PHONY: test lint demo bench campaign
lint: $(STAMP)
	$(BIN)/ruff check rotator tests
	$(BIN)/mypy
	$(BIN)/hadolint --failure-threshold warning Dockerfile

test: lint
	$(BIN)/pytest -q

demo: $(STAMP)
	$(BIN)/rotator demo

bench: $(STAMP)
	$(BIN)/python tests/bench/run.py

# The long fault campaign (issue 9): the suite's fault classes for 20 minutes unless told otherwise;
# prints its seed, the checks made and the violations found. ROTATOR_CAMPAIGN_SEED replays a schedule.
campaign: $(STAMP)
	ROTATOR_CAMPAIGN_SECONDS=$${ROTATOR_CAMPAIGN_SECONDS:-1200} $(BIN)/python -m tests.campaign
