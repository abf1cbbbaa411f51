# One venv in .venv, made on first use; `make test` is the README's test command and CI's.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/rotator: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

.PHONY: test lint demo bench
lint: $(BIN)/rotator
	$(BIN)/ruff check rotator tests
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

demo: $(BIN)/rotator
	$(BIN)/rotator demo

bench: $(BIN)/rotator
	$(BIN)/python tests/bench/run.py
