"""A model's sampled token bytes to text pieces: UTF-8 across tokens, stop strings, limits."""

from __future__ import annotations

import codecs
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from workers.engine import Sampling, TextModel, TokenLogprob


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
    logprobs: list[TokenLogprob] = field(default_factory=list)  # when the sampling asks


class TextSink:
    """The sink of one generation: sampled token bytes to text pieces (UTF-8 across tokens,
    stop strings, the token budget), each piece to `emit`; after each step `send` (what the
    step queued goes out, its answer read with the next step's), `settle` at the end.

    A batch engine calls it in its own thread, so an error here (a cancel, a deadline, the job
    gone) is kept and the generation stopped; `finish`, back in the job's thread, raises it.
    """

    def __init__(self, budget: int, sampling: Sampling, gen: Generation,
                 emit: Callable[[str], None], settle: Callable[[], None],
                 send: Callable[[], None] | None = None) -> None:
        self.budget, self.gen, self.emit, self.settle = budget, gen, emit, settle
        self.send = send or settle
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = StopFilter(sampling.stop)
        self.stopped = False
        self.error: Exception | None = None

    def feed(self, piece: bytes, logprob: TokenLogprob | None = None) -> bool:
        try:
            self.gen.completion_tokens += 1
            if logprob is not None:
                self.gen.logprobs.append(logprob)
            text, self.stopped = self.stops.feed(self.decoder.decode(piece))
            if text:
                self.emit(text)
            if self.stopped:
                return False
            if self.gen.completion_tokens >= self.budget:
                self.gen.finish_reason = "length"
                return False
            return True
        except Exception as exc:
            self.error = exc
            return False

    def flush(self) -> bool:
        try:
            self.send()
            return self.error is None
        except Exception as exc:
            self.error = exc
            return False

    def finish(self) -> None:
        """Once the model returned: raise a kept error, else emit what was held back."""
        if self.error is not None:
            raise self.error
        if not self.stopped:
            tail, _ = self.stops.feed(self.decoder.decode(b"", final=True))
            tail += self.stops.flush()
            if tail:
                self.emit(tail)
        self.settle()


def generate_text(
    model: TextModel, prompt_tokens: list[int], sampling: Sampling, gen: Generation,
    emit: Callable[[str], None], settle: Callable[[], None] = lambda: None,
    send: Callable[[], None] | None = None,
) -> None:
    """Generate, handing non-empty text pieces to `emit` as tokens are sampled (`send` after
    each decode step, `settle` at the end; `send` defaults to `settle`); `gen` records counts
    and why it ended.

    Stops at end of generation, at a stop string (not included), at `max_tokens`, or when the
    context is full. The pieces concatenated are the whole text. A continued generation passes
    the tokens it already produced at the end of `prompt_tokens` and counted in `gen`.
    """
    budget = min(sampling.max_tokens,
                 model.n_ctx - len(prompt_tokens) + gen.completion_tokens)
    if gen.completion_tokens >= budget:
        gen.finish_reason = "length"
        return
    gen.finish_reason = "stop"
    sink = TextSink(budget, sampling, gen, emit, settle, send)
    model.generate(prompt_tokens, replace(sampling, resumed=gen.completion_tokens), sink)
    sink.finish()
