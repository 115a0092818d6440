"""Map-reduce summarisation: split a long text by tokens, summarise parts, then the summaries."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from broker.messages import SummarizeJob

MAX_ROUNDS = 6


def summary_instruction(instructions: str | None) -> str:
    ask = f" ({instructions.strip()})" if instructions and instructions.strip() else ""
    return f"Summarize the following text{ask}. Reply with the summary only.\n\n"


def chunk_tokens(tokens: Sequence[int], size: int, overlap: int) -> list[list[int]]:
    """Consecutive windows of at most `size` tokens, each sharing `overlap` with the previous."""
    if size <= 0:
        raise ValueError("chunk size must be positive")
    overlap = min(overlap, size // 4)
    step = size - overlap
    chunks = []
    for start in range(0, len(tokens), step):
        chunks.append(list(tokens[start : start + size]))
        if start + size >= len(tokens):
            break
    return chunks


@dataclass(frozen=True)
class Budget:
    """Token budget of one summarisation call on a model with `n_ctx` tokens of context."""

    n_ctx: int
    prompt_overhead: int  # tokens of the instruction and chat template around the text
    max_tokens: int

    @property
    def text_tokens(self) -> int:
        return self.n_ctx - self.prompt_overhead - self.max_tokens

    @property
    def map_max_tokens(self) -> int:
        """Partial summaries stay well under a chunk, so every reduce round shrinks the text."""
        return max(16, min(self.max_tokens, self.text_tokens // 3))


# Callables a runner hands in: count/split by the model's tokenizer, and one summary call.
Tokenize = Callable[[str], list[int]]
Detokenize = Callable[[list[int]], str]
SummarizeOnce = Callable[[str, int, bool], str]  # (text, max_tokens, final) -> summary
OnStage = Callable[[str, int | None, int | None], None]  # (stage, part, parts)


def map_reduce(
    job: SummarizeJob,
    budget: Budget,
    overlap: int,
    tokenize: Tokenize,
    detokenize: Detokenize,
    summarize_once: SummarizeOnce,
    on_stage: OnStage,
) -> tuple[str, int]:
    """The final summary and how many parts the first map stage had (1: no split)."""
    if budget.text_tokens < 32:
        raise ValueError(
            f"n_ctx {budget.n_ctx} leaves no room for text beside max_tokens {budget.max_tokens}"
        )
    text, first_parts = job.text, 1
    for round_ in range(MAX_ROUNDS):
        tokens = tokenize(text)
        if len(tokens) <= budget.text_tokens:
            on_stage("single" if round_ == 0 else "reduce", None, None)
            return summarize_once(text, job.max_tokens, True), first_parts
        chunks = chunk_tokens(tokens, budget.text_tokens, overlap)
        first_parts = len(chunks) if round_ == 0 else first_parts
        partials = []
        for i, chunk in enumerate(chunks, start=1):
            on_stage("map", i, len(chunks))
            partials.append(summarize_once(detokenize(chunk), budget.map_max_tokens, False).strip())
        text = "\n\n".join(p for p in partials if p) or detokenize(chunks[0])
    raise RuntimeError(f"summary did not fit the context after {MAX_ROUNDS} rounds")
