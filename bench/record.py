"""Each benchmark's latest result, written where the docs' benchmarks page includes it:
`bench/results/<name>.md`, with the machine, the date and the command that made it.

    with recorded("overhead"):
        report(...)          # whatever this prints goes to the terminal and into the file
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path

# TOKENPOOL_BENCH_RESULTS: another folder (bench/gpu/run.sh writes a GPU host's tables to the
# folder its caller collects).
RESULTS = Path(os.environ.get("TOKENPOOL_BENCH_RESULTS")
               or Path(__file__).resolve().parent / "results")
# TOKENPOOL_BENCH_TAG: results named NAME-TAG.md (bench/gpu/run.sh's GPU-like run on a CPU
# keeps its tables beside the CPU ones, not over them).
TAG = os.environ.get("TOKENPOOL_BENCH_TAG", "")


def machine() -> str:
    """The CPU model and core count (or the GPU named by the caller), and the OS."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores, {platform.system()}"


def gpu_machine(index: int) -> str | None:
    """GPU `index` (NVML's numbering, which CUDA_VISIBLE_DEVICES does not change) by name and
    memory, then the host as machine() says; None without NVML or that GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no such GPU: the caller says CPU
        return None
    name = name.decode() if isinstance(name, bytes) else name
    return f"{name} (GPU {index}, {int(total) / 2**30:.0f} GiB) on {machine()}"


class _Tee(io.TextIOBase):
    def __init__(self, *streams: io.TextIOBase | object) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)  # type: ignore[attr-defined]
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()  # type: ignore[attr-defined]


@contextlib.contextmanager
def recorded(name: str, gpu: str = "cpu") -> Iterator[None]:
    """Tee what the block prints; if it ends well, write it as `name`'s latest result, or on
    GPU N (`gpu`, an index) as `name-gpuN`'s, headed with that GPU: each keeps its own."""
    where = None
    if gpu != "cpu":
        name, where = f"{name}-gpu{gpu}", gpu_machine(int(gpu))
    if TAG:
        name = f"{name}-{TAG}"
    captured = io.StringIO()
    real = sys.stdout
    sys.stdout = _Tee(real, captured)  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout = real
    command = " ".join(["python -m", sys.modules["__main__"].__spec__.name  # type: ignore[union-attr]
                        if sys.modules["__main__"].__spec__ else sys.argv[0], *sys.argv[1:]])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.md").write_text(
        f"_{time.strftime('%Y-%m-%d')}, {where or machine()}: `{command}`_\n\n"
        f"```text\n{captured.getvalue().strip()}\n```\n")
