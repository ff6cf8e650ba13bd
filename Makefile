# Two commands do everything on a fresh machine:
#   make demo   - create/refresh .venv and run the end-to-end demo (embedded broker, SQLite)
#   make test   - create/refresh .venv and run ruff, mypy and pytest
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)

.PHONY: demo test lint typecheck pytest venv bench clean

venv: $(STAMP)

# setup.py maps folders to edgeserve.* names: a new part folder needs a re-install too.
$(STAMP): pyproject.toml setup.py Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	# torch first, pinned: the CPU build (any looser spec pulls a multi-GB CUDA build)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[all,dev]'
	touch $(STAMP)

demo: venv
	$(BIN)/edgeserve demo $(DEMO_ARGS)

test: venv lint typecheck pytest

lint: venv
	$(BIN)/ruff check .

typecheck: venv
	$(BIN)/mypy

pytest: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: venv
	$(BIN)/python bench/convert.py
	$(BIN)/python bench/agent.py
	$(BIN)/python bench/telemetry.py
	$(BIN)/python bench/rollout.py
	$(BIN)/python bench/experiments.py
	$(BIN)/python bench/evidence.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build *.egg-info
