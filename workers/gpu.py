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


def torch_device(gpu: str) -> str:
    """After pin(), the one visible GPU is cuda:0."""
    return "cpu" if gpu == "cpu" else "cuda"
