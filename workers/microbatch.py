"""Embedding micro-batching: jobs that arrive within a few milliseconds share one `encode`.

The embedding worker runs `max_batch` Celery threads; each calls `embed` here. The first
caller of a round becomes its leader: it waits `wait_s` (or until `max_texts` texts are
gathered), takes everything gathered so far, runs one encode per `normalize` flag, and hands
each caller its own rows back. Results and errors reach exactly the callers they belong to.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from workers.engine import EmbeddingModel


@dataclass(eq=False)
class _Call:
    texts: list[str]
    normalize: bool
    done: threading.Event = field(default_factory=threading.Event)
    vectors: list[list[float]] | None = None
    error: Exception | None = None


class MicroBatcher:
    """An EmbeddingModel that gathers concurrent calls into batched calls of another."""

    def __init__(self, model: EmbeddingModel, wait_s: float, max_texts: int) -> None:
        self.model, self.wait_s, self.max_texts = model, wait_s, max_texts
        self.dimensions = model.dimensions
        self._lock = threading.Lock()
        self._gathered: list[_Call] = []
        self._full = threading.Event()
        self._encode_lock = threading.Lock()
        self.batches = 0  # encode calls made (fewer than jobs when they were gathered)

    def embed(self, texts: list[str], normalize: bool) -> list[list[float]]:
        call = _Call(list(texts), normalize)
        with self._lock:
            self._gathered.append(call)
            leader = len(self._gathered) == 1
            if sum(len(c.texts) for c in self._gathered) >= self.max_texts:
                self._full.set()
        if leader:
            self._lead()
        call.done.wait()
        if call.error is not None:
            raise call.error
        assert call.vectors is not None
        return call.vectors

    def _lead(self) -> None:
        self._full.wait(self.wait_s)
        with self._encode_lock:  # one encode at a time; the next round gathers meanwhile
            with self._lock:
                calls, self._gathered = self._gathered, []
                self._full.clear()
            for normalize in (True, False):
                group = [c for c in calls if c.normalize is normalize]
                if group:
                    self._encode(group, normalize)

    def _encode(self, calls: list[_Call], normalize: bool) -> None:
        texts = [text for call in calls for text in call.texts]
        try:
            vectors = self.model.embed(texts, normalize)
            self.batches += 1
        except Exception as exc:
            for call in calls:
                call.error = exc
                call.done.set()
            return
        start = 0
        for call in calls:
            call.vectors = vectors[start:start + len(call.texts)]
            start += len(call.texts)
            call.done.set()

    def count_tokens(self, texts: list[str]) -> int:
        # Hugging Face tokenizers are not thread-safe: never beside an encode on another thread.
        with self._encode_lock:
            return self.model.count_tokens(texts)

    def close(self) -> None:
        self.model.close()

