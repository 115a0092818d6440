"""How much memory a model will take once loaded: checked before a swap loads it.

llm: the GGUF file plus its KV cache (n_ctx tokens per sequence times max_batch sequences,
f16 keys and values for every layer, read from the file's metadata without loading weights).
embedding: the model directory's files. An estimate, on the safe side of what llama.cpp and
torch allocate; compute buffers are small next to these on the models we serve.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from broker.settings import ModelSpec

F16_BYTES = 2


def kv_cache_bytes(metadata: dict[str, Any], n_tokens: int) -> int:
    arch = metadata.get("general.architecture", "llama")

    def field(name: str, default: int) -> int:
        return int(metadata.get(f"{arch}.{name}", default))

    n_layer = field("block_count", 0)
    n_head = field("attention.head_count", 1)
    n_head_kv = field("attention.head_count_kv", n_head)
    head_dim = field("embedding_length", 0) // max(n_head, 1)
    key_len, value_len = field("attention.key_length", head_dim), field(
        "attention.value_length", head_dim)
    return n_tokens * n_layer * n_head_kv * (key_len + value_len) * F16_BYTES


def gguf_metadata(path: Path) -> dict[str, Any]:
    from llama_cpp import Llama

    vocab = Llama(str(path), vocab_only=True, verbose=False)
    try:
        return dict(vocab.metadata)
    finally:
        vocab.close()


def model_bytes(spec: ModelSpec, path: Path) -> int:
    if spec.kind == "embedding":
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        return sum(p.stat().st_size for p in files)
    tokens = spec.n_ctx * spec.max_batch
    return path.stat().st_size + kv_cache_bytes(gguf_metadata(path), tokens)
