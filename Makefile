# The two front-door commands (README): `make shakespeare` trains the default experiment,
# `make test` runs the tests. Each creates .venv (Python >= 3.12) on first use.

# A Python >= 3.12: pyenv's 3.12/3.13 if present (this machine kind), else whatever is on PATH.
PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.1[23]*/bin/python3) $(shell command -v python3.13 python3.12 2>/dev/null))
VENV := .venv
# Keep XLA's scratch buffers mapped between steps: read from its one definition, cgpt_jax/malloc.py
# (launch.py and the benchmarks set it themselves); here for the tests, which run steps in-process.
export GLIBC_TUNABLES ?= $(shell sed -n 's/^GLIBC_TUNABLES = "\(.*\)"/\1/p' cgpt_jax/malloc.py)

WORKDIR ?= runs/shakespeare_char

.PHONY: shakespeare test test-all lint venv

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: no Python >= 3.12 found; set PYTHON=/path/to/python3.12" >&2; exit 2; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 12))' || { echo "error: $(PYTHON) is older than 3.12" >&2; exit 2; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -r requirements.txt
	$(VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

shakespeare: venv
	$(VENV)/bin/python launch.py --config experiments/shakespeare_char.py --workdir $(WORKDIR)

# Test processes (pytest-xdist): the tests compile more than they run, and XLA compiles on one
# core, so two workers keep CI's 2 cores busy (35% off the suite's time there).
TEST_WORKERS ?= 2

test: venv
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS)

test-all: venv
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) -m ""

# Style (pyproject.toml's [tool.ruff]): CI runs this before the tests.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
