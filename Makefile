# The two commands: `make quickstart` and `make test`. Both create .venv and install on first use.
# The tested torch is pinned here (override: make test TORCH=2.6.0); the package itself accepts torch>=2.6.
PYTHON ?= python3
TORCH ?= 2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(TORCH)

# llama.cpp's Python binding builds from source (~10 minutes on 2 cores the first time; pip caches the
# wheel). Only the GGUF-vs-llama.cpp tests need it; they skip with the reason if the build fails.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

.PHONY: install test-deps quickstart test lint format clean

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned, so that nothing resolves an unpinned torch to a CUDA build.
	$(BIN)/python -m pip install --quiet "torch==$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

install: $(STAMP)

# What only the test suite needs beyond the Python packages: llama.cpp and a headless Chromium.
# The built wheel is kept in WHEELS (outside the checkout), so it is built once per machine, not per clone.
WHEELS ?= $(HOME)/.cache/lmforge/wheels

$(VENV)/.test-deps: $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip wheel --quiet --no-deps --prefer-binary \
		--find-links "$(WHEELS)" -w "$(WHEELS)" "llama-cpp-python>=0.3" \
		&& $(BIN)/python -m pip install --quiet --prefer-binary --find-links "$(WHEELS)" "llama-cpp-python>=0.3" \
		|| echo "llama-cpp-python could not be built: the llama.cpp comparison tests will skip"
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
