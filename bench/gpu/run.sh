#!/usr/bin/env bash
# The GPU benchmarks (issue 22's table) on a host that can download nothing, from the bundle
# that `python -m bench.gpu.bundle` gathers into .gpu/ on a machine with the registries:
#   bash bench/gpu/run.sh              # GPU 0; tables to $OUT if set, else bench/results/
#   GPU=cpu PY=... bash bench/gpu/run.sh   # every step on a CPU box: a GPU-like run (below)
#   GPU=cpu PY=.venv/bin/python SITE=venv bash bench/gpu/run.sh   # the same with our venv
# GPU=cpu is a GPU-like run: a 20M-parameter body on one llama.cpp thread decodes a token in
# about the time a GPU takes for a real model's (1-2 ms), so the queue's own costs per step
# and per job weigh as they do on a GPU; both sides without batch invariance, as on a GPU.
# Its tables are recorded as NAME-gpulike.md, beside (never over) the CPU ones.
# Steps, each skipped when its output is already there (a warm host runs again in seconds):
# the bundle's wheels into build/gpu/site; llama-cpp-python's sdist unpacked; ONE CMake build
# of its vendored llama.cpp for this GPU, giving both the libraries the worker loads
# (LLAMA_CPP_LIB_PATH) and llama-server, so both sides run the same kernels; a random-weights
# llama GGUF and MiniLM (bench/gpu/models.py); then bench.batching (against llama-server),
# bench.overhead, bench.embeddings and bench.ttft (where a burst's worst first token goes). Everything prints to one log, $RESULTS/gpu-run.log.
set -euo pipefail
cd "$(dirname "$0")/../.."
GPU=${GPU:-0}
PY=${PY:-python3}
BUNDLE=${BUNDLE:-.gpu}
WORK=${WORK:-build/gpu}
RESULTS=${OUT:-bench/results}
SITE=${SITE:-bundle}  # bundle: the bundle's wheels; venv: the packages PY already has
LEVELS=${LEVELS:-1,8,16,32,64}
ROUNDS=${ROUNDS:-3}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-240}  # each benchmark at most, and all of it within DEADLINE
DEADLINE=${DEADLINE:-570}            # seconds: inside the device tool's 600 s per call
mkdir -p "$WORK" "$RESULTS"
export TOKENPOOL_BENCH_RESULTS=$(cd "$RESULTS" && pwd)
exec > >(tee -a "$RESULTS/gpu-run.log") 2>&1
log() { echo "[$(date +%T) +${SECONDS}s] $*"; }
test -d "$BUNDLE/whl" || { echo "no $BUNDLE/whl: run python -m bench.gpu.bundle first"; exit 2; }
LIKE=()
if [ "$GPU" = cpu ]; then
  export TOKENPOOL_BENCH_TAG=gpulike TOKENPOOL_MODELS__CHAT__N_THREADS=1
  export TOKENPOOL_MODELS__CHAT__BATCH_INVARIANT=false TOKENPOOL_MODELS__CHAT__PROMPT_CHUNK_TOKENS=2048
  LIKE=(--fast --threads 1)
fi
ROOT=$PWD
W=$ROOT/$WORK
if [ "$GPU" != cpu ]; then
  nvidia-smi --query-gpu=index,name,memory.total,driver_version,compute_cap --format=csv
fi
$PY --version

log "wheels"
if [ "$SITE" = bundle ] && [ ! -e "$W/site/.done" ]; then
  rm -rf "$W/site"
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$W/site" "$BUNDLE"/whl/*.whl
  touch "$W/site/.done"
fi

log "llama.cpp build"
SRC=$W/llama-cpp-python
if [ ! -e "$SRC/.done" ]; then
  rm -rf "$SRC" && mkdir -p "$SRC"
  tar xzf "$BUNDLE/llama_cpp_python.tar.gz" -C "$SRC" --strip-components=1
  touch "$SRC/.done"
fi
CMAKE_ARGS=(-DGGML_CUDA=OFF)
if [ "$GPU" != cpu ]; then
  command -v nvcc >/dev/null || export PATH=/usr/local/cuda/bin:$PATH
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader -i "$GPU" | tr -d '. ')
  CMAKE_ARGS=(-DGGML_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=${arch:-90}")
  if ! ls /usr/local/cuda/lib64/libcublas.so >/dev/null 2>&1; then
    # No cuBLAS in the toolkit folder: the one from the Python environment's nvidia wheels
    # (torch's), through unversioned links CMake can find.
    cublas=$($PY -c 'import glob, site; print(next(iter(sorted(p for b in site.getsitepackages()
for p in glob.glob(b + "/nvidia/**/libcublas.so.*", recursive=True))), ""))')
    test -n "$cublas" || { echo "no cuBLAS found"; exit 3; }
    lib=$(dirname "$cublas")
    mkdir -p "$W/cublas"
    ln -sf "$cublas" "$W/cublas/libcublas.so"
    ln -sf "$(ls "$lib"/libcublasLt.so.* | head -1)" "$W/cublas/libcublasLt.so"
    CMAKE_ARGS+=("-DCUDA_cublas_LIBRARY=$W/cublas/libcublas.so"
                 "-DCUDA_cublasLt_LIBRARY=$W/cublas/libcublasLt.so")
    export LD_LIBRARY_PATH=$lib:${LD_LIBRARY_PATH:-}
  fi
fi
if [ "$(uname -m)" = x86_64 ]; then  # as the Makefile: AMX kernels crash (llama.cpp#20824)
  export CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  export CXXFLAGS=$CFLAGS
fi
if [ ! -x "$W/llama/bin/llama-server" ]; then
  cmake -S "$SRC/vendor/llama.cpp" -B "$W/llama" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF "${CMAKE_ARGS[@]}" > "$W/cmake.log" || { tail -40 "$W/cmake.log"; exit 4; }
  cmake --build "$W/llama" --target llama llama-server -j "$(nproc)" > "$W/build.log" \
    || { tail -40 "$W/build.log"; exit 5; }
fi
export LLAMA_CPP_LIB_PATH=$W/llama/bin
export LD_LIBRARY_PATH=$W/llama/bin:${LD_LIBRARY_PATH:-}
if [ "$SITE" = bundle ]; then export PYTHONPATH=$W/site:$SRC:$ROOT; else export PYTHONPATH=$ROOT; fi
export HF_HUB_OFFLINE=1 TOKENPOOL_MODELS__EMBED__ENABLED=false PYTHONUNBUFFERED=1
$PY -c 'import llama_cpp, celery, pydantic; print("llama_cpp", llama_cpp.__version__, "from",
llama_cpp.__file__, "| celery", celery.__version__, "| pydantic", pydantic.__version__)'

log "timing models"
if [ "$GPU" = cpu ]; then  # GPU-like: a small body, 1-2 ms a token on one thread
  SHAPE=(--embd 256 --layers 4 --heads 4 --kv-heads 2 --ff 1024)
else
  SHAPE=()
fi
GGUF=$W/random-llama-f16.gguf
if [ ! -s "$GGUF" ]; then
  $PY -m bench.gpu.models gguf "$GGUF.part" "${SHAPE[@]}" \
    --vocab "$SRC/vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf" \
    --gguf-py "$SRC/vendor/llama.cpp/gguf-py" && mv "$GGUF.part" "$GGUF"
fi
MINILM=$W/minilm
if [ ! -s "$MINILM/model.safetensors" ]; then
  rm -rf "$MINILM" && cp -r "$BUNDLE/minilm" "$MINILM"
  $PY -m bench.gpu.models minilm "$MINILM"
fi

bench() {  # name, args: one benchmark, bounded; a failure is logged and the next one runs
  local name=$1; shift
  local left=$((DEADLINE - SECONDS - 5))
  local limit=$((left < BENCH_TIMEOUT ? left : BENCH_TIMEOUT))
  if [ "$limit" -lt 30 ]; then log "bench.$name skipped: ${left}s left of ${DEADLINE}s"; return; fi
  log "bench.$name (at most ${limit}s) $*"
  timeout -s INT -k 10 "$limit" "$PY" -m "bench.$name" "$@" \
    || log "bench.$name failed or ran past ${limit}s"
}
bench batching --gpu "$GPU" --model "$GGUF" --llama-server "$W/llama/bin/llama-server" \
  --levels "$LEVELS" --max-tokens 128 --rounds "$ROUNDS" "${LIKE[@]}"
bench overhead --gpu "$GPU" --model "$GGUF"
if [ "$GPU" != cpu ]; then  # a GPU-like run has no per-step cost to show here: embeddings.md
  TOKENPOOL_MODELS__EMBED__ENABLED=true bench embeddings --gpu "$GPU" --model "$MINILM" --max-batch 64
  bench ttft --gpu "$GPU" --model "$GGUF" --jobs 64
else
  bench ttft --gpu "$GPU" --model "$GGUF" --jobs 16 --threads 1
fi
log "done"
