# `make demo` and `make test` work on a fresh clone: each creates .venv when missing, installs the
# project (again only when pyproject.toml or constraints.txt changed), then runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
INSTALL := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt -e '.[dev]'

.PHONY: demo test lint install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(INSTALL)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/vap demo

lint: $(STAMP)
	$(BIN)/ruff check pipeline tests
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
