# The two commands: `make quickstart` and `make test`. Both create .venv and install on first use.
# The tested torch is pinned here (override: make test TORCH=2.6.0); the package itself accepts torch>=2.6.
PYTHON ?= python3
TORCH ?= 2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(TORCH)

# llama.cpp for the GGUF tests comes prebuilt (llama-cpp-py-sync, in the dev extra); the tested build is
# pinned here too, as its C API follows llama.cpp's master (override: make test LLAMA_CPP=0.11739).
LLAMA_CPP ?= 0.11739

.PHONY: install test-deps quickstart test lint format clean

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned, so that nothing resolves an unpinned torch to a CUDA build.
	$(BIN)/python -m pip install --quiet "torch==$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]" "llama-cpp-py-sync==$(LLAMA_CPP)"
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

install: $(STAMP)

# What only the test suite needs beyond the Python packages: llama.cpp's prebuilt libraries made loadable
# on glibc < 2.38 (a no-op elsewhere; see the script), and a headless Chromium.
$(VENV)/.test-deps: $(STAMP) scripts/llama_cpp_glibc.py
	$(BIN)/python scripts/llama_cpp_glibc.py
	sh scripts/ensure_chromium.sh
	@touch $@

test-deps: $(VENV)/.test-deps

quickstart: install
	$(BIN)/lmforge quickstart $(ARGS)

test: install test-deps
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check lmforge tests bench
	$(BIN)/ruff format --check lmforge tests bench

format: install
	$(BIN)/ruff format lmforge tests bench
	$(BIN)/ruff check --fix lmforge tests bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
