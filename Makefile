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

.PHONY: test lint demo bench
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
