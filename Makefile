# Two commands do everything on a fresh clone (Python 3.11 is all you need):
#   make run    set up .venv, then run the whole pipeline on the default profile (dvc repro)
#   make test   set up .venv, then run the test suite
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= $(shell command -v python3.11 || command -v python3)
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export DAGSTER_DISABLE_TELEMETRY := 1

.PHONY: venv run test browser ui play clean-venv

# Reinstalls only when pyproject.toml or constraints.txt change; otherwise a no-op.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

# Debian's chromium for the browser tests (never `playwright install`: it downloads browsers).
browser:
	@command -v chromium >/dev/null || { (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
	  echo "warning: could not install chromium; browser tests will be skipped"; }

run: venv
	dvc repro

test: venv browser
	python -m pytest -q

clean-venv:
	rm -rf $(VENV)
