"""The small interfaces a worker's resident model offers; real ones and fakes implement them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    grammar: str | None = None  # GBNF: every sampled token keeps the text inside it
    logprobs: int | None = None  # each token's log-probability and this many top ones
    resumed: int = 0  # the last tokens of the context an earlier attempt sampled: the
    # grammar has to have read them


TokenLogprob = dict  # {"token", "logprob", "bytes", "top_logprobs": [{"token", ...}]}


class Sink(Protocol):
    """Where a generation's sampled pieces go, in one thread for all of a batch engine's jobs
    (its feeder's, while the next step decodes: one wakeup per step, not one per token in each
    job's thread). No piece comes after the generation returned."""

    def feed(self, piece: bytes, logprob: TokenLogprob | None = None) -> bool:
        """One sampled token's bytes (and its log-probabilities, when the sampling asks);
        False: generate no more (a stop, or an error it keeps)."""
        ...

    def flush(self) -> bool:
        """After each step that fed it, once every piece of the step is fed: what the step
        queued goes out now (one round trip for all of them; its answers may be read later,
        with the next step's). False: generate no more."""
        ...


class TextModel(Protocol):
    """A llama.cpp-style model: tokens in, one sampled token's bytes out at a time."""

    n_ctx: int

    def tokenize(self, text: str, special: bool, add_bos: bool = True) -> list[int]: ...

    def detokenize(self, tokens: Sequence[int]) -> str: ...

    def generate(self, tokens: list[int], sampling: Sampling, sink: Sink) -> None:
        """Evaluate `tokens`, then feed each sampled token's bytes to `sink` (and flush it)
        until end of generation, `max_tokens`, or the sink says no more; returns then."""
        ...

    def close(self) -> None: ...


class EmbeddingModel(Protocol):
    dimensions: int

    def embed(self, texts: list[str], normalize: bool) -> list[list[float]]: ...

    def count_tokens(self, texts: list[str]) -> int: ...

    def close(self) -> None: ...
