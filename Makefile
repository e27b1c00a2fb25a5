# Two commands do everything on a fresh clone (Python 3.11 is all you need):
#   make run    set up .venv, then run the whole pipeline on the default profile (params checked, then dvc repro)
#   make test   set up .venv, then ruff, mypy and the test suite
#   make play   play the learned game in a browser (ONNX export, 127.0.0.1)
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= $(shell command -v python3.11 || command -v python3)
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export DAGSTER_DISABLE_TELEMETRY := 1

.PHONY: venv web run test lint browser ui play ablations promote clean-venv

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

# ONNX Runtime Web for the in-browser player (pinned in package.json and package-lock.json): npm ci, again only
# when the lock file changes. Without npm the browser-engine tests are skipped.
node_modules/.package-lock.json: package.json package-lock.json
	@command -v npm >/dev/null && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error || \
	  echo "warning: npm ci failed or npm is missing; the in-browser player (make web) is unavailable"

web: node_modules/.package-lock.json

run: venv
	python -m components repro

# Dagster UI on http://127.0.0.1:$(UI_PORT) (DAGSTER_HOME=dagster_home/, telemetry off); Ctrl-C or SIGTERM stops it.
UI_PORT ?= 3000
ui: venv
	exec python -m orchestration.ui --host 127.0.0.1 --port $(UI_PORT)

# ruff and mypy, configured in pyproject.toml; `make test` runs them first
lint: venv
	ruff check .
	mypy

test: venv browser web lint
	python -m pytest -q

# Play the learned game in a browser from the ONNX export (README "Play"). Builds the export first if needed:
#   make play                   serve http://127.0.0.1:8765/ (params play.*)
#   make play PLAY_ARGS="--engine browser"   the page runs the model itself (ONNX Runtime Web, dist/play)
#   make play PLAY_ARGS="--port 9000 --export path/to/export"
PLAY_ARGS ?=
play: venv web
	@test -f data/onnx_export/manifest.json || [[ "$(PLAY_ARGS)" == *--export* ]] || python -m components repro onnx_export
	python -m components play $(PLAY_ARGS)

# The paper's ablations as DVC experiments (README "Evaluation, ablations and promotion"); tables to docs/results.md.
#   make ablations                                  context lengths, noise augmentation on/off, agent vs random data
#   make ablations ABLATION_ARGS="--groups context"  one group;  ABLATION_ARGS=--report-only rewrites the tables
ABLATION_ARGS ?=
ablations: venv
	python -m components ablations $(ABLATION_ARGS)

# Champion/challenger: the `champion` stage promotes data/onnx_export to artifacts/champion if it is no worse on
# held-out play (reports/champion.json says which); after committing dvc.lock, `python -m components register`.
promote: venv
	python -m components repro champion

clean-venv:
	rm -rf $(VENV)
