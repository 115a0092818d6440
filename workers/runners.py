"""Runners: one job on the resident model, its events through the writer, its outcome returned."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from broker.constraints import validate_output
from broker.messages import EmbedJob, GenerateJob, SummarizeJob
from broker.prompts import Prompt, render_generate, render_summary
from broker.settings import ModelSpec
from workers.engine import EmbeddingModel, Sampling, TextModel
from workers.summarize import Budget, map_reduce, summary_instruction
from workers.textgen import Generation, generate_text
from workers.writer import EventWriter

CANCEL_CHECK_EVERY = 8  # tokens between cancel checks where no events are written


class ContextOverflow(ValueError):
    pass


@dataclass
class Outcome:
    result: dict[str, Any]
    usage: dict[str, int] = field(default_factory=dict)


def sampling_of(job: GenerateJob, stop: tuple[str, ...]) -> Sampling:
    return Sampling(
        max_tokens=job.max_tokens, temperature=job.temperature, top_p=job.top_p,
        top_k=job.top_k, min_p=job.min_p, repeat_penalty=job.repeat_penalty,
        frequency_penalty=job.frequency_penalty, presence_penalty=job.presence_penalty,
        seed=job.seed, stop=stop, grammar=job.constraint(),
        logprobs=job.top_logprobs if job.logprobs else None,
    )


def checked_output(job: GenerateJob | SummarizeJob, text: str,
                   finish_reason: str) -> dict[str, Any]:
    """What a constrained job's result adds: the parsed JSON when it matches the schema, or
    why not. Output cut by `max_tokens` or the context is incomplete, never valid."""
    schema = job.output_schema()
    if schema is None:
        return {}
    if finish_reason == "length":
        return {"json": None, "valid": False,
                "invalid_reason": "incomplete: cut by max_tokens or the context"}
    value, error = validate_output(text, schema)
    if error is not None:
        return {"json": None, "valid": False, "invalid_reason": error}
    return {"json": value, "valid": True}


def prompt_tokens(model: TextModel, prompt: Prompt) -> list[int]:
    tokens = model.tokenize(prompt.text, prompt.special)
    if len(tokens) >= model.n_ctx:
        raise ContextOverflow(f"prompt is {len(tokens)} tokens; the context is {model.n_ctx}")
    return tokens


@dataclass(frozen=True)
class Published:
    """What earlier attempts of a job published: the text a new attempt goes on after, and
    (when the job asked for them) its tokens' log-probabilities. Read once, at the start."""

    text: str = ""
    logprobs: tuple[dict[str, Any], ...] = ()

    @classmethod
    def of(cls, token_events: list[dict[str, Any]]) -> Published:
        return cls("".join(e["text"] for e in token_events),
                   tuple(entry for e in token_events for entry in e.get("logprobs") or []))


NOTHING = Published()


def continued(
    model: TextModel, prompt: list[int], resume: str
) -> tuple[list[int], Generation]:
    """The context of a generation that goes on after `resume`, text an earlier attempt
    already published, and its counts so far (the published text re-tokenized)."""
    done = model.tokenize(resume, False, add_bos=False) if resume else []
    return prompt + done, Generation(prompt_tokens=len(prompt), completion_tokens=len(done))


def run_generate(
    job: GenerateJob, model: TextModel, spec: ModelSpec, out: EventWriter,
    earlier: Published = NOTHING,
) -> Outcome:
    prompt = render_generate(job, spec.chat_format)
    context, gen = continued(model, prompt_tokens(model, prompt), earlier.text)
    pieces = [earlier.text]
    sent = 0  # token log-probabilities already sent with a token event

    def emit(text: str) -> None:
        nonlocal sent
        pieces.append(text)
        logprobs, sent = gen.logprobs[sent:] or None, len(gen.logprobs)
        out.token_later(text, logprobs)

    generate_text(model, context, sampling_of(job, prompt.stop), gen, emit, out.settle,
                  out.send)
    text = "".join(pieces)
    result = {"text": text, "finish_reason": gen.finish_reason,
              **checked_output(job, text, gen.finish_reason)}
    if job.logprobs:  # those of an earlier attempt's tokens came with its token events
        result["logprobs"] = [*earlier.logprobs, *gen.logprobs]
    return Outcome(
        result=result,
        usage={"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens},
    )


class _SummaryCalls:
    """One summary call on the model; the final one streams tokens, map calls stay silent."""

    def __init__(self, job: SummarizeJob, model: TextModel, spec: ModelSpec, out: EventWriter,
                 resume: str = ""):
        self.job, self.model, self.spec, self.out = job, model, spec, out
        self.resume = resume  # the final call's text an earlier attempt already published
        self.instruction = summary_instruction(job.instructions)
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0}
        self.finish_reason = "stop"

    def overhead_tokens(self) -> int:
        prompt = render_summary(self.instruction, "", self.spec.chat_format)
        return len(self.model.tokenize(prompt.text, prompt.special)) + 8

    def __call__(self, text: str, max_tokens: int, final: bool) -> str:
        prompt = render_summary(self.instruction, text, self.spec.chat_format)
        resume = self.resume if final else ""
        context, gen = continued(self.model, prompt_tokens(self.model, prompt), resume)
        sampling = Sampling(max_tokens=max_tokens, temperature=self.job.temperature,
                            seed=self.job.seed, stop=prompt.stop,
                            grammar=self.job.constraint() if final else None)
        pieces = [resume]
        checked = gen.completion_tokens

        def emit(text: str) -> None:
            nonlocal checked
            pieces.append(text)
            if final:
                self.out.token_later(text)
            elif gen.completion_tokens - checked >= CANCEL_CHECK_EVERY:
                checked = gen.completion_tokens
                self.out.check_cancel()

        generate_text(self.model, context, sampling, gen, emit, self.out.settle, self.out.send)
        if final:
            self.finish_reason = gen.finish_reason
        self.usage["prompt_tokens"] += gen.prompt_tokens
        self.usage["completion_tokens"] += gen.completion_tokens
        return "".join(pieces)


def run_summarize(
    job: SummarizeJob, model: TextModel, spec: ModelSpec, out: EventWriter, overlap: int,
    resume: str = "",
) -> Outcome:
    calls = _SummaryCalls(job, model, spec, out, resume)
    budget = Budget(n_ctx=model.n_ctx, prompt_overhead=calls.overhead_tokens(),
                    max_tokens=job.max_tokens)
    summary, parts = map_reduce(
        job, budget, overlap,
        tokenize=lambda text: model.tokenize(text, False, add_bos=False),
        detokenize=model.detokenize,
        summarize_once=calls,
        on_stage=out.stage,
    )
    return Outcome(result={"summary": summary, "parts": parts,
                           **checked_output(job, summary, calls.finish_reason)},
                   usage=calls.usage)


def run_embed(job: EmbedJob, model: EmbeddingModel, out: EventWriter) -> Outcome:
    del out  # an embedding is one step: started, then done
    vectors = model.embed(list(job.texts), job.normalize)
    return Outcome(result={"embeddings": vectors, "dimensions": model.dimensions},
                   usage={"prompt_tokens": model.count_tokens(list(job.texts)),
                          "completion_tokens": 0})

