"""Checks a job must pass before it is queued: model, kind, limits, and prompt length in tokens."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import anyio

from api.errors import ApiError
from broker.constraints import ConstraintError
from broker.messages import MODEL_KIND_OF_JOB, EmbedJob, GenerateJob, SummarizeJob
from broker.prompts import render_generate
from broker.settings import ModelSpec, Settings
from broker.sources import resolve
from broker.webhooks import UnsafeTarget, check_target


class Vocabularies:
    """Vocabulary-only llama.cpp models (no weights), loaded once per model, to count tokens."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self._loaded: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _vocab(self, spec: ModelSpec) -> Any:
        with self._lock:
            vocab = self._loaded.get(spec.source)
            if vocab is None:
                from llama_cpp import Llama

                path = resolve(spec.source, self.cache_dir)
                vocab = Llama(str(path), vocab_only=True, verbose=False)
                self._loaded[spec.source] = vocab
        return vocab

    def count(self, spec: ModelSpec, text: str, special: bool) -> int:
        return len(self._vocab(spec).tokenize(text.encode(), add_bos=True, special=special))

    def grammar_parses(self, spec: ModelSpec, grammar: str) -> bool:
        """Whether llama.cpp's grammar sampler takes `grammar` (as the worker's will)."""
        import llama_cpp

        sampler = llama_cpp.llama_sampler_init_grammar(
            self._vocab(spec)._model.vocab, grammar.encode(), b"root")
        if not sampler:
            return False
        llama_cpp.llama_sampler_free(sampler)
        return True


def model_for(job: GenerateJob | SummarizeJob | EmbedJob, settings: Settings) -> ModelSpec:
    spec = settings.models.get(job.model)
    if spec is None:
        known = ", ".join(sorted(settings.models))
        raise ApiError(
            400, "unknown_model", f"no model {job.model!r}; configured: {known}", "model"
        )
    if MODEL_KIND_OF_JOB[job.kind] != spec.kind:
        raise ApiError(
            400, "wrong_model_kind",
            f"model {job.model!r} is an {spec.kind} model; {job.kind} needs an "
            f"{MODEL_KIND_OF_JOB[job.kind]} model", "model",
        )
    return spec


def check_generate_limits(job: GenerateJob, settings: Settings) -> None:
    """Stop strings and chat messages: bounded by settings, named when over."""
    for i, stop in enumerate(job.stop):
        if len(stop) > settings.max_stop_chars:
            raise ApiError(413, "stop_too_long", f"stop[{i}] has {len(stop)} characters; at "
                           f"most {settings.max_stop_chars} (max_stop_chars)", f"stop[{i}]")
    if job.messages is not None and len(job.messages) > settings.max_messages:
        raise ApiError(413, "too_many_messages", f"{len(job.messages)} messages; at most "
                       f"{settings.max_messages} (max_messages)", "messages")


def check_limits(job: GenerateJob | SummarizeJob | EmbedJob, spec: ModelSpec) -> None:
    if isinstance(job, EmbedJob):
        if len(job.texts) > spec.max_texts:
            raise ApiError(413, "too_many_texts",
                           f"{len(job.texts)} texts; at most {spec.max_texts}", "texts")
        for i, text in enumerate(job.texts):
            if len(text) > spec.max_text_chars:
                raise ApiError(413, "text_too_long",
                               f"texts[{i}] has {len(text)} characters; at most "
                               f"{spec.max_text_chars}", f"texts[{i}]")
            if not text.strip():
                raise ApiError(422, "invalid_request", f"texts[{i}] is empty", f"texts[{i}]")
        return
    if job.max_tokens > spec.max_tokens:
        raise ApiError(422, "max_tokens_too_large",
                       f"max_tokens {job.max_tokens} is over this model's cap of "
                       f"{spec.max_tokens}", "max_tokens")


def check_timeout(job: GenerateJob | SummarizeJob | EmbedJob, settings: Settings) -> None:
    if job.timeout_s is not None and job.timeout_s > settings.max_job_timeout_s:
        raise ApiError(422, "timeout_too_large", f"timeout_s {job.timeout_s:g} is over the cap "
                       f"of {settings.max_job_timeout_s:g}", "timeout_s")


async def check_context(job: GenerateJob, spec: ModelSpec, vocab: Vocabularies) -> int:
    """The prompt's length in tokens; an error if it leaves no room in the context."""
    try:
        prompt = render_generate(job, spec.chat_format)
        n = await anyio.to_thread.run_sync(vocab.count, spec, prompt.text, prompt.special)
    except (OSError, ValueError) as exc:  # a misconfigured source or chat_format
        raise ApiError(503, "model_unavailable",
                       f"model {job.model!r} can't be loaded here: {type(exc).__name__}") from None
    if n >= spec.n_ctx:
        field = "prompt" if job.prompt is not None else "messages"
        raise ApiError(400, "context_length_exceeded",
                       f"{field} is {n} tokens; the model's context is {spec.n_ctx}", field)
    return n


async def check_constraint(job: GenerateJob | SummarizeJob, spec: ModelSpec,
                           vocab: Vocabularies) -> None:
    """A schema the grammar cannot enforce, or a grammar llama.cpp cannot parse: a 400 naming
    the field, now, never a failed job later."""
    try:
        grammar = job.constraint()
    except ConstraintError as exc:
        raise ApiError(400, "unsupported_schema", exc.message, exc.field) from None
    if grammar is None:
        return
    if not await anyio.to_thread.run_sync(vocab.grammar_parses, spec, grammar):
        field = "grammar" if job.grammar is not None else "response_format"
        raise ApiError(400, "invalid_grammar", f"{field}: llama.cpp cannot parse this GBNF "
                       "grammar (it needs a `root` rule; the API log has the parser's "
                       "message)", field)


async def check_webhook(url: str | None, settings: Settings) -> None:
    """A job's or batch's own webhook: only with a secret to sign it, to a safe address."""
    if url is None:
        return
    if not settings.webhook_secret:
        raise ApiError(400, "webhooks_off", "webhook: this server sends no webhooks (no "
                       "webhook_secret is set)", "webhook")
    try:
        await anyio.to_thread.run_sync(check_target, url, settings)
    except UnsafeTarget as exc:
        raise ApiError(400, "unsafe_webhook", f"webhook: {exc}", "webhook") from None


async def admit(
    job: GenerateJob | SummarizeJob | EmbedJob, settings: Settings, vocab: Vocabularies
) -> None:
    spec = model_for(job, settings)
    await check_webhook(job.webhook, settings)
    check_limits(job, spec)
    check_timeout(job, settings)
    if not isinstance(job, EmbedJob):
        await check_constraint(job, spec, vocab)
    if isinstance(job, GenerateJob):
        check_generate_limits(job, settings)
        await check_context(job, spec, vocab)
