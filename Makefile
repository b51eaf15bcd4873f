# `make demo` and `make test` work on a fresh clone: each creates .venv when missing, installs the
# project (again only when pyproject.toml or constraints.txt changed), then runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The install command lives in deploy/install.sh, shared with the Dockerfiles (tests/test_deploy.py checks).
INSTALL := sh deploy/install.sh $(VENV) dev

.PHONY: demo test lint install system-deps clean

# deploy/install.sh creates .venv when it has no pip (as a failed venv on Debian leaves it) with $(PYTHON).
export PYTHON

$(STAMP): pyproject.toml constraints.txt
	$(INSTALL)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/vap demo

lint: $(STAMP)
	$(BIN)/ruff check pipeline tests benchmarks
	$(BIN)/mypy

# Real stream servers for the reader tests (GStreamer's RTSP server); a no-op once installed.
system-deps:
	bash tools/install-system-deps.sh

# Most tests wait on brokers, cameras and timeouts rather than compute, so two workers halve the suite's time
# even on two cores. `--dist loadfile` keeps each file in one worker, with its module fixtures built once.
TEST_WORKERS ?= 2

test: lint system-deps
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
