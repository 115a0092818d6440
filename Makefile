# The two commands for a fresh machine:
#   make up     install, then run the whole system on its embedded defaults
#   make test   install, then run the linters and every test (what CI runs)
# and, while developing: make test-fast (skips the tests marked slow: load and long chaos runs)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU hosts: this takes the CPU build of torch (from local disk here). On a GPU host use
# `make TORCH=torch ...` to get the CUDA build, and CMAKE_ARGS=-DGGML_CUDA=on for llama.cpp.
TORCH ?= torch==2.13.0

.PHONY: install sysdeps up test test-fast bench
install: $(VENV)/.installed

# Debian's Chromium, for the Flower test in a real headless browser (apt; needs root).
sysdeps:
	@command -v chromium >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# llama-cpp-python builds from source once (about 4 minutes on 2 cores); pip caches the wheel.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

up: install
	$(BIN)/tokenpool up

test: install sysdeps
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

test-fast: install sysdeps
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -m "not slow"

bench: install
	$(BIN)/python -m bench.overhead
