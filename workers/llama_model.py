"""The llama.cpp text model (llama-cpp-python), resident for the life of the worker."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

from workers.engine import Sampling


class LlamaModel:
    def __init__(
        self, path: Path, n_ctx: int, n_gpu_layers: int, n_threads: int | None
    ) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_gpu_layers=n_gpu_layers,
            n_threads=n_threads or os.cpu_count() or 1,
            n_threads_batch=n_threads or os.cpu_count() or 1,
            verbose=False,
        )
        self.n_ctx = self.llm.n_ctx()

    def tokenize(self, text: str, special: bool, add_bos: bool = True) -> list[int]:
        return list(self.llm.tokenize(text.encode(), add_bos=add_bos, special=special))

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.llm.detokenize(list(tokens)).decode(errors="replace")

    def generate(self, tokens: list[int], sampling: Sampling) -> Iterator[bytes]:
        from llama_cpp import llama_cpp

        seed = sampling.seed if sampling.seed is not None else random.randrange(2**32)
        self.llm.set_seed(seed)
        vocab = self.llm._model.vocab
        context = list(tokens)
        for token in self.llm.generate(
            tokens,
            temp=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            min_p=sampling.min_p,
            repeat_penalty=sampling.repeat_penalty,
        ):
            if llama_cpp.llama_vocab_is_eog(vocab, token) or len(context) >= self.n_ctx:
                return
            yield self.llm.detokenize([token], prev_tokens=context)
            context.append(token)

    def close(self) -> None:
        self.llm.close()
