# One-step install into .venv, then the two commands the README documents.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install test demo lint format

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps torchrec==1.8.0
	touch $(STAMP)

install: $(STAMP)

# pytest exits 5 when it collects no test: that is not a failure of the suite.
test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider tests; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

demo: install
	$(BIN)/embtab demo

# lint-imports checks the package arrows of docs/architecture.md (pyproject.toml's contracts).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
