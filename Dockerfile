# tokenpool, CPU build: the API, Flower, beat and CPU workers (GPU workers: Dockerfile.cuda).
#   docker build -t tokenpool:cpu .
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
    TOKENPOOL_CACHE_DIR=/models/cache TOKENPOOL_DATA_DIR=/data
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# torch's CPU build first, so sentence-transformers does not pull the CUDA one.
RUN pip install torch --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY api api
COPY broker broker
COPY tasks tasks
COPY workers workers
COPY schedules schedules
COPY cli cli
# llama.cpp builds native, but without its AMX kernels, which crash in their first matmul on
# Sapphire Rapids and newer Xeons (ggml-org/llama.cpp#20824).
RUN if [ "$(uname -m)" = x86_64 ]; then export CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" \
    && export CXXFLAGS="$CFLAGS"; fi && pip install .
ENTRYPOINT ["tokenpool"]
CMD ["up"]
