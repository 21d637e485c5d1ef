# monedge: the two commands in the README are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test install check unit lint typecheck fuzz bench clean

$(BIN)/python:
	@scripts/system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# A regular (not editable) install, so the twisted/plugins dropin lands in
# site-packages exactly as a user's install would; re-run on every build.
install: $(BIN)/python
	$(BIN)/python -m pip install -q '.[dev]'
	@rm -rf build monedge.egg-info

run: install
	scripts/run-demo.sh

unit: install
	$(BIN)/python -m twisted.trial tests

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

test: install
	@scripts/system-deps.sh
	$(BIN)/python -m twisted.trial tests
	FUZZ_SECONDS=60 VENV=$(VENV) fuzz/run.sh
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fuzz: install
	VENV=$(VENV) fuzz/run.sh

bench: install
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build monedge.egg-info _trial_temp .mypy_cache .ruff_cache
