"""A model's sampled token bytes to text pieces: UTF-8 across tokens, stop strings, limits."""

from __future__ import annotations

import codecs
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from workers.engine import Sampling, TextModel


class StopFilter:
    """Holds back text that could be the start of a stop string; cuts at the first stop."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        buf = self.pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buf[: min(hits)], True
        hold = self._held_suffix(buf)
        self.pending = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], False

    def _held_suffix(self, buf: str) -> int:
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class Generation:
    """What one generation produced; filled in while its pieces are consumed."""

    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str = "length"


def stream_text(
    model: TextModel, prompt_tokens: list[int], sampling: Sampling, gen: Generation
) -> Iterator[str]:
    """Yield non-empty text pieces as tokens are sampled; `gen` records counts and why it ended.

    Stops at end of generation, at a stop string (not included), at `max_tokens`, or when the
    context is full. The pieces concatenated are the whole text. A continued generation passes
    the tokens it already produced at the end of `prompt_tokens` and counted in `gen`.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stops = StopFilter(sampling.stop)
    budget = min(sampling.max_tokens,
                 model.n_ctx - len(prompt_tokens) + gen.completion_tokens)
    if gen.completion_tokens >= budget:
        gen.finish_reason = "length"
        return
    gen.finish_reason = "stop"
    # Closed as soon as we stop reading: a batched model frees the job's slot at once.
    with contextlib.closing(model.generate(prompt_tokens, sampling)) as sampled:
        for piece in sampled:
            gen.completion_tokens += 1
            text, stopped = stops.feed(decoder.decode(piece))
            if text:
                yield text
            if stopped:
                return
            if gen.completion_tokens >= budget:
                gen.finish_reason = "length"
                break
    tail, _ = stops.feed(decoder.decode(b"", final=True))
    tail += stops.flush()
    if tail:
        yield tail
