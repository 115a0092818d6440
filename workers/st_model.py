"""The sentence-transformers embedding model, resident for the life of the worker."""

from __future__ import annotations

from pathlib import Path


class SentenceTransformerModel:
    def __init__(self, path: Path, device: str) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(path), device=device)
        self.dimensions = len(self.model.encode(["dimensions"])[0])

    def embed(self, texts: list[str], normalize: bool) -> list[list[float]]:
        vectors = self.model.encode(
            texts, normalize_embeddings=normalize, convert_to_numpy=True, show_progress_bar=False
        )
        return [[float(x) for x in row] for row in vectors]

    def count_tokens(self, texts: list[str]) -> int:
        limit = self.model.max_seq_length
        ids = self.model.tokenizer(texts, truncation=True, max_length=limit)["input_ids"]
        return sum(len(row) for row in ids)

    def close(self) -> None:
        del self.model
