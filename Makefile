# aiida-emlip: the two commands a user needs are `make demo` and `make test`.
# Both create .venv, install Quantum ESPRESSO and the package when missing, and are idempotent:
# the install steps are skipped while the stamp in .stamps/ (keyed on pyproject.toml) is current.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
# `make test` (CI) leaves out the tests marked slow and runs on four workers, one test file each
# (module fixtures stay shared): the tests wait on pw.x, AiiDA's polling and subprocesses for much of
# their time, so four workers keep two cores busy. `make test-all` runs every test (two workers: the
# slow daemon tests change broker-wide settings). PYTEST_ARGS= runs serially.
PYTEST_ARGS ?= -m "not slow" -n 4 --dist loadfile --durations=25
STAMPS := .stamps
HASH := $(shell (cat pyproject.toml; echo "$(TORCH_SPEC)") | sha256sum | cut -c1-16)
INSTALL_STAMP := $(STAMPS)/install-$(HASH)
# Python for the venv: python3.11 if present, else python3 (must be >= 3.10).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help demo test test-all setup install qe browser docs lint clean-stamps

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

demo: setup  ## set up everything, then run the demo study (real pw.x through AiiDA) and write its report
	$(BIN)/aiida-emlip demo

test: setup  ## set up everything, then run the test suite without the tests marked slow (what CI runs)
	$(BIN)/pytest $(PYTEST_ARGS)

test-all: setup  ## set up everything, then run every test, the slow ones included
	$(BIN)/pytest -n 2 --dist loadfile

setup: install qe browser  ## create/reuse the isolated AiiDA profile, computer, pw code and pseudo family
	$(BIN)/aiida-emlip setup

install: $(INSTALL_STAMP)  ## create .venv and install torch (CPU) and the package with extras

$(VENV)/pyvenv.cfg:
	@echo ">>> creating $(VENV) with $(PYTHON)"
	@"$(PYTHON)" -c 'import sys; assert sys.version_info >= (3, 10), "need Python >= 3.10"'
	"$(PYTHON)" -m venv "$(VENV)"

# Keyed on the content of pyproject.toml (and TORCH_SPEC); redone when the venv is recreated.
$(INSTALL_STAMP): $(VENV)/pyvenv.cfg
	@echo ">>> pip install $(TORCH_SPEC) (first, so that no CUDA build is pulled in)"
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	@echo ">>> pip install -e .[tests,docs]"
	$(BIN)/python -m pip install --quiet -e ".[tests,docs]"
	@mkdir -p $(STAMPS) && rm -f $(STAMPS)/install-* && touch $@

qe:  ## install Quantum ESPRESSO (Debian package quantum-espresso) if pw.x is missing
	@if command -v pw.x >/dev/null && command -v ld1.x >/dev/null; then \
	  echo ">>> Quantum ESPRESSO: $$(command -v pw.x)"; \
	else \
	  echo ">>> pw.x/ld1.x not found: installing Quantum ESPRESSO with apt-get (quantum-espresso)"; \
	  $(SUDO) apt-get update -q; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q quantum-espresso; \
	fi

browser:  ## install Debian chromium if missing (the report's tests render it headless)
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then \
	  echo ">>> chromium: $$(command -v chromium || command -v chromium-browser)"; \
	else \
	  echo ">>> chromium not found: installing it with apt-get (chromium)"; \
	  $(SUDO) apt-get update -q; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	fi

docs: install  ## build the Sphinx (MyST) docs; warnings are errors
	$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html

lint: install  ## ruff check of the whole repository
	$(BIN)/ruff check .

clean-stamps:  ## forget the install stamps (the next make reinstalls)
	rm -rf $(STAMPS)
