# tokenpool image. CPU by default; for NVIDIA GPUs build with
#   docker build --build-arg CMAKE_ARGS="-DGGML_CUDA=on" --build-arg BASE=nvidia/cuda:12.6.2-devel-ubuntu24.04 .
# (a CUDA base brings nvcc for llama.cpp's CUDA build; torch then comes as its CUDA build).
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG CMAKE_ARGS=""
ARG TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
ENV PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
    TOKENPOOL_CACHE_DIR=/models/cache TOKENPOOL_DATA_DIR=/data
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake git curl \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
RUN pip install ${TORCH_SPEC}
COPY pyproject.toml README.md ./
COPY api api
COPY broker broker
COPY tasks tasks
COPY workers workers
COPY schedules schedules
COPY cli cli
RUN CMAKE_ARGS="${CMAKE_ARGS}" pip install .
ENTRYPOINT ["tokenpool"]
CMD ["up"]
