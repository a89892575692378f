# The two commands: `make quickstart` and `make test`. Both create .venv and install on first use.
# The tested torch is pinned here (override: make test TORCH=2.6.0); the package itself accepts torch>=2.6.
PYTHON ?= python3
TORCH ?= 2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(TORCH)

.PHONY: install quickstart test lint format clean

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned, so that nothing resolves an unpinned torch to a CUDA build.
	$(BIN)/python -m pip install --quiet "torch==$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

install: $(STAMP)

quickstart: install
	$(BIN)/lmforge quickstart $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check lmforge tests bench
	$(BIN)/ruff format --check lmforge tests bench

format: install
	$(BIN)/ruff format lmforge tests bench
	$(BIN)/ruff check --fix lmforge tests bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
