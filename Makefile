# monedge: the two commands in the README are `make run` and `make test`.
#
#   make run          the demo: installs monedge alone (python3-venv is the
#                     only Debian package it may need), as any user
#   make test         everything CI runs: installs the dev extras and the
#                     Debian tools the tests drive (as root, if missing)
#   make install      monedge into .venv
#   make install-dev  monedge with its dev extras, and the test tools
# The interpreter: Debian's own 3.11 where there is one (scripts/python.sh).
PYTHON ?= $(shell scripts/python.sh)
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test install install-dev unit lint typecheck fuzz bench clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	    || { echo "monedge needs Python 3.11 or later ($(PYTHON) is older)" >&2; exit 1; }
	@PYTHON=$(PYTHON) scripts/system-deps.sh run
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# A regular (not editable) install, so the twisted/plugins dropin lands in
# site-packages exactly as a user's install would; re-run on every build.
install: $(BIN)/python
	$(BIN)/python -m pip install -q .
	@rm -rf build monedge.egg-info

install-dev: $(BIN)/python
	@PYTHON=$(PYTHON) scripts/system-deps.sh test
	$(BIN)/python -m pip install -q '.[dev]'
	@rm -rf build monedge.egg-info

run: install
	VENV=$(VENV) scripts/run-demo.sh

unit: install-dev
	$(BIN)/python -m twisted.trial tests

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install-dev
	$(BIN)/mypy

test: install-dev
	$(BIN)/python -m twisted.trial tests
	FUZZ_SECONDS=60 FUZZ_HTTP2_SECONDS=30 VENV=$(VENV) fuzz/run.sh
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fuzz: install-dev
	VENV=$(VENV) fuzz/run.sh

bench: install-dev
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build monedge.egg-info _trial_temp .mypy_cache .ruff_cache
