"""GPU pinning: must run before anything in the process touches CUDA."""

from __future__ import annotations

import os


def pin(gpu: str) -> None:
    """Expose only GPU `gpu` (an index) to this process, or none for `cpu`."""
    if gpu == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return
    if not gpu.isdigit():
        raise ValueError(f"--gpu takes a GPU index or 'cpu', not {gpu!r}")
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")


def layers_on(gpu: str, n_gpu_layers: int) -> int:
    """llama.cpp layers to offload: none on the CPU."""
    return 0 if gpu == "cpu" else n_gpu_layers


CPU_PROMPT_CHUNK = 128  # a big prompt chunk would stall the jobs decoding beside it
# llama-server's default batch (-b 2048): a GPU computes a step of many prompt tokens in about
# the time of a step of few, so joining jobs' prompts go in one step, not one 128-token chunk
# per step (issue 22: with 128, 64 jobs joining at once waited 0.95 s for their first tokens
# on an H200, 0.56 s with llama-server).
GPU_PROMPT_CHUNK = 2048


def prompt_chunk(configured: int | None, layers: int) -> int:
    """Prompt tokens a step may take: as configured, else by where the layers run."""
    if configured is not None:
        return configured
    return GPU_PROMPT_CHUNK if layers else CPU_PROMPT_CHUNK


def torch_device(gpu: str) -> str:
    """After pin(), the one visible GPU is cuda:0."""
    return "cpu" if gpu == "cpu" else "cuda"
