"""llama.cpp inside our processes: loaded before anything else, its log routed to Python's.

Both are the first thing a worker (and the API, which counts prompt tokens with a
vocabulary-only llama.cpp model) does after pinning its GPU.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from typing import Any

log = logging.getLogger("tokenpool.llama")

# ggml.h's enum ggml_log_level. llama-cpp-python's own callback maps an older numbering
# (its DEBUG is ggml's ERROR), so its filter let every debug line through to stderr: on CUDA,
# one "CUDA Graph id N reused" line per decode step.
GGML_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
GGML_CONT = 5  # the rest of the previous line
_callback: Any = None  # the ctypes callback, kept alive as long as llama.cpp may call it


def load_llama_first() -> None:
    """Import llama_cpp, which loads libllama and its ggml libraries, before numpy can load.

    On a CUDA build (llama-cpp-python 0.3.36, sm_90, shared libraries, an H200), a process
    that imported numpy first died with SIGSEGV inside the first model load (`LlamaModel`
    in llama_cpp/_internals.py), with n_gpu_layers 0 too; imported first (or LD_PRELOADed),
    libllama loads the model fine. Preloading numpy's OpenBLAS or libgfortran alone did not
    crash, and preloading libggml-base or libggml-cpu did not help; the root cause inside the
    two libraries' load order is not established. llama_cpp's own package imports numpy only
    after its ctypes module has loaded the libraries, so importing it first is enough.
    tests/integration/test_native.py checks the order in a real worker process."""
    if "numpy" in sys.modules and "llama_cpp" not in sys.modules:
        log.warning("numpy was imported before llama.cpp; CUDA builds have crashed that way")
    import llama_cpp  # noqa: F401


class LineLog:
    """llama.cpp's log pieces joined into lines, each one record of `logger` at its level;
    a level the logger does not show costs one comparison, not a decode."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.level = logging.DEBUG
        self.parts: list[str] = []

    def __call__(self, ggml_level: int, text: bytes) -> None:
        if ggml_level != GGML_CONT:
            self.flush()
            self.level = GGML_LEVELS.get(ggml_level, logging.INFO)
        if not self.logger.isEnabledFor(self.level):
            return
        piece = text.decode("utf-8", "replace")
        self.parts.append(piece)
        if piece.endswith("\n"):
            self.flush()

    def flush(self) -> None:
        line = "".join(self.parts).rstrip()
        self.parts = []
        if line:
            self.logger.log(self.level, "%s", line)


def route_llama_log(worker_level: int) -> None:
    """llama.cpp's log through the `tokenpool.llama` logger: warnings and errors always,
    info and debug only when the process logs at DEBUG."""
    global _callback
    import llama_cpp

    log.setLevel(logging.DEBUG if worker_level <= logging.DEBUG else logging.WARNING)
    lines = LineLog(log)

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines(level, text)

    _callback = callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
