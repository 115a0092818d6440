"""What a worker reports about its machine: VRAM (nvidia-ml-py), RSS and host memory (psutil),
and its recent token rate. No GPU, no NVML, no driver: reported as CPU, never a crash."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Any

import psutil

log = logging.getLogger("tokenpool.worker")
_nvml_lock = threading.Lock()
_nvml_ready: bool | None = None


def _nvml() -> Any | None:
    """The pynvml module once initialised, or None where there is no NVIDIA driver."""
    global _nvml_ready
    with _nvml_lock:
        try:
            import pynvml
        except ImportError:
            return None
        if _nvml_ready is None:
            try:
                pynvml.nvmlInit()
                _nvml_ready = True
            except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
                log.info("no NVML here (%s); reporting as CPU", exc)
                _nvml_ready = False
        return pynvml if _nvml_ready else None


def gpu_memory(gpu: str, pid: int | None = None) -> dict[str, Any]:
    """`device` cuda with the GPU's VRAM used/total/free and this process's own use
    (`vram_process_bytes`, from NVML's per-process accounting: several workers can share one
    GPU, and the device's `used` counts them all), or `device` cpu."""
    if gpu == "cpu":
        return {"device": "cpu"}
    nvml = _nvml()
    if nvml is None:
        return {"device": "cpu", "gpu_error": "NVML unavailable"}
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(int(gpu))
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
    except Exception as exc:
        return {"device": "cpu", "gpu_error": f"{type(exc).__name__}: {exc}"}
    return {"device": "cuda", "vram_used_bytes": int(info.used),
            "vram_total_bytes": int(info.total), "vram_free_bytes": int(info.free),
            "vram_process_bytes": process_vram(nvml, handle, os.getpid() if pid is None else pid)}


def process_vram(nvml: Any, handle: Any, pid: int) -> int | None:
    """VRAM this process holds on the device: the sum of its compute (CUDA) and graphics
    contexts as NVML lists them; None where NVML cannot tell (a driver without per-process
    accounting, or a container whose PID namespace hides our pid from NVML)."""
    total, found = 0, False
    for name in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        try:
            processes = getattr(nvml, name)(handle)
        except Exception:
            continue
        for proc in processes:
            used = getattr(proc, "usedGpuMemory", None)
            if proc.pid == pid and isinstance(used, int):
                total, found = total + used, True
    return total if found else None


def host_memory() -> dict[str, int]:
    vm = psutil.virtual_memory()
    return {"rss_bytes": psutil.Process().memory_info().rss,
            "host_memory_total_bytes": vm.total, "host_memory_available_bytes": vm.available}


def free_memory_bytes(gpu: str) -> tuple[int, str]:
    """Memory a new model can use on this worker's device: (bytes, 'vram' or 'ram')."""
    memory = gpu_memory(gpu)
    if memory["device"] == "cuda":
        return int(memory["vram_free_bytes"]), "vram"
    return int(psutil.virtual_memory().available), "ram"


class TokenRate:
    """Tokens per second over the last `window_s` seconds, from every job of the worker."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._ticks: deque[float] = deque()
        self._lock = threading.Lock()

    def add(self) -> None:
        now = time.monotonic()
        with self._lock:
            self._ticks.append(now)
            self._trim(now)

    def rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return round(len(self._ticks) / self.window_s, 2)

    def _trim(self, now: float) -> None:
        while self._ticks and self._ticks[0] < now - self.window_s:
            self._ticks.popleft()
