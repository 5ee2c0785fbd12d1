# Developer and CI entry points. GNU make; every recipe line runs in bash with -e and pipefail.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
# python3.11 is the supported interpreter; fall back to whatever python3 is on PATH.
BOOT_PYTHON := $(or $(shell command -v python3.11 2>/dev/null),python3)
INSTALL_STAMP := $(VENV)/.installed

AZURITE_VERSION := 3.35.0
AZURITE_DIR := .tools/azurite
AZURITE_STAMP := $(AZURITE_DIR)/.installed-$(AZURITE_VERSION)
AZURITE_BLOB := $(AZURITE_DIR)/node_modules/.bin/azurite-blob

# NASA C-MAPSS files; tests fail (never skip) without them. Override on the command line or env.
CMAPSS_DIR ?= $(if $(wildcard ../shared/data/cmapss/.),$(abspath ../shared/data/cmapss),)
export CMAPSS_DIR
# The leading units of FD002 (six operating conditions), for the tests of operating regimes.
CMAPSS_FD002_DIR ?= $(if $(wildcard ../shared/data/cmapss-fd002/.),$(abspath ../shared/data/cmapss-fd002),)
export CMAPSS_FD002_DIR
# Embedded state folder (landing zone, warehouse, models, Dagster home).
TURBOFAN_HOME ?= $(CURDIR)/.turbofan
export TURBOFAN_HOME

# Extra arguments for pytest, e.g. `make test PYTEST_ARGS="-k ingest -x"`.
PYTEST_ARGS ?=

.PHONY: help install .venv azurite chromium demo test lint bench ui clean

help:
	@echo "make install   create $(VENV) from requirements.lock and install this repo (editable)"
	@echo "make azurite   install the Azurite blob emulator $(AZURITE_VERSION) into $(AZURITE_DIR)"
	@echo "make chromium  install Debian's chromium (for the browser tests of the UI) when it is missing"
	@echo "make demo      the whole system live: edge, Dagster (sensors, automation), simulator (Ctrl-C stops)"
	@echo "make test      ruff check and format check + pytest (no tests collected counts as a failure)"
	@echo "make lint      ruff check and format check"
	@echo "make bench     run the benchmarks in bench/"
	@echo "make ui        the Dagster UI on $(TURBOFAN_HOME) (turbofan ui)"
	@echo "make clean     remove $(VENV), .tools, .turbofan and caches"

$(PY):
	$(BOOT_PYTHON) -m venv $(VENV)

# Reinstall only when the lock, the package metadata or a C extension changes. editable_mode=compat puts the
# repo root on sys.path through a .pth file, so packages created after the install (edge_module,
# a new subpackage) are importable without reinstalling.
$(INSTALL_STAMP): requirements.lock setup.py $(wildcard turbofan_core/*.c edge_module/*.c) | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check "$$(grep -E '^uv==' requirements.lock || echo uv)"
	$(UV) pip install -p $(PY) -r requirements.lock
	$(UV) pip install -p $(PY) --no-deps --config-settings editable_mode=compat -e .
	touch $@

install .venv: $(INSTALL_STAMP)

$(AZURITE_STAMP):
	npm install --prefix $(AZURITE_DIR) --no-audit --no-fund azurite@$(AZURITE_VERSION)
	test -x $(AZURITE_BLOB)
	touch $@

azurite: $(AZURITE_STAMP)

# The browser tests drive Debian's chromium through Playwright (Playwright's own browser builds are
# downloads that a closed network refuses). CI runs as root on Debian 12.
chromium:
	if [[ ! -x /usr/bin/chromium ]]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; \
	fi
	test -x /usr/bin/chromium

# Extra arguments for `turbofan live`, e.g. `make demo DEMO_ARGS="--ui-port 3001 --units 1-20"`.
DEMO_ARGS ?=

demo: install
	$(VENV)/bin/turbofan live $(DEMO_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The pytest run goes through .ci/pytest-guard, which turns exit 5 (no tests collected) into 1.
test: install azurite chromium
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	.ci/pytest-guard $(PYTEST_ARGS)

bench: install
	$(PY) bench/bench_ingest.py
	$(PY) bench/bench_model.py
	$(PY) bench/bench_edge.py
	$(PY) bench/bench_edge_batch.py
	$(PY) bench/bench_edge_store.py
	$(PY) bench/bench_gateway.py
	$(PY) bench/bench_loop.py

ui: install
	$(VENV)/bin/turbofan ui

clean:
	rm -rf $(VENV) .tools .turbofan .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
