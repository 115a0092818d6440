"""Sampling among a superset of the reachable logits picks exactly what llama.cpp's sampler picks
from the whole vocabulary (the real Gemma 270M, in this process)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import pytest

import workers.llama_model as llama_model
from bench.sampling import Unfed
from broker.settings import Settings
from broker.sources import resolve
from workers.batching import Request
from workers.engine import Sampling
from workers.llama_model import LlamaBackend

PROMPTS = ["Story 1. Once upon a time, a fox ", "The three rules of the sea are",
           "def fibonacci(n):"]
STEPS = 40
SHORTCUT = {  # sampling -> whether the shortcut may take it
    "top-k, no penalty": (Sampling(64, temperature=0.8, top_k=40, repeat_penalty=1.0), True),
    "defaults": (Sampling(64), True),
    "greedy, penalised": (Sampling(64, temperature=0, repeat_penalty=1.3,
                                   frequency_penalty=0.5), True),
    "hot, wide top-k": (Sampling(64, temperature=1.5, top_k=200, top_p=1.0, min_p=0.0), True),
    "no top-k": (Sampling(64, top_k=0), False),
    "a raising penalty": (Sampling(64, presence_penalty=-0.5), False),
}


@pytest.fixture(scope="module")
def backend() -> Iterator[LlamaBackend]:
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    settings = Settings()
    gguf = resolve(settings.models["chat"].source, settings.cache_dir)
    backend = LlamaBackend(gguf, 256, len(PROMPTS), 0, None, 512)
    yield backend
    backend.close()


def generate(backend: LlamaBackend, sampling: Sampling, shortcut: bool) -> list[list[int]]:
    """Every prompt decoded side by side in one batch per step, each with its own seed."""
    backend.shortcut = shortcut
    prompts = [list(backend.model.tokenize(p.encode(), True, False)) for p in PROMPTS]
    requests = [Request(tokens=t, sampling=dataclasses.replace(sampling, seed=11 + s),
                        max_new=STEPS, sink=Unfed()) for s, t in enumerate(prompts)]
    for seq in range(len(prompts)):
        backend.forget(seq, 0)
    entries = [(tok, i, seq, i == len(t) - 1) for seq, t in enumerate(prompts)
               for i, tok in enumerate(t)]
    rows = [i for i, e in enumerate(entries) if e[3]]
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(STEPS):
        backend.decode(entries)
        for seq, (request, row) in enumerate(zip(requests, rows, strict=True)):
            out[seq].append(backend.sample(request, row))
        entries = [(out[seq][-1], len(t) + len(out[seq]) - 1, seq, True)
                   for seq, t in enumerate(prompts)]
        rows = list(range(len(prompts)))
    return out


@pytest.mark.parametrize("name", list(SHORTCUT))
def test_the_shortcut_samples_the_same_tokens_as_the_whole_vocabulary(
        backend: LlamaBackend, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    sampling, applies = SHORTCUT[name]
    taken = []
    superset = llama_model.top_superset

    def counted(row, k):  # type: ignore[no-untyped-def]
        ids = superset(row, k)
        taken.append(ids is not None)
        return ids

    monkeypatch.setattr(llama_model, "top_superset", counted)
    whole = generate(backend, sampling, shortcut=False)
    assert taken == []  # the reference run samples from all 262,144 logits
    fast = generate(backend, sampling, shortcut=True)
    assert fast == whole
    assert len(taken) == (STEPS * len(PROMPTS) if applies else 0) and all(taken)
    assert len({tuple(seq) for seq in whole}) == len(PROMPTS)  # three different continuations
