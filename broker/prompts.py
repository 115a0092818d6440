"""How a job becomes model input: one function for the API's admission check and the worker.

Chat messages go through llama-cpp-python's chat formatter named by the model's `chat_format`
(Gemma's own GGUF carries no template). A system message, which Gemma's format has no turn for,
is folded into the first user turn, as Gemma's official template does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from broker.messages import ChatMessage, GenerateJob


@dataclass(frozen=True)
class Prompt:
    text: str
    special: bool  # parse control tokens (<start_of_turn>…): only in templates we render
    stop: tuple[str, ...]


@cache
def chat_formatter(name: str) -> Callable[..., Any]:
    from llama_cpp import llama_chat_format

    for candidate in (name.replace("-", "_"), name.replace("-", "")):
        found = getattr(llama_chat_format, f"format_{candidate}", None)
        if found is not None:
            return found
    raise ValueError(f"unknown chat_format {name!r}")


def fold_system(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    system = "\n\n".join(m.content for m in messages if m.role == "system")
    out = [{"role": m.role, "content": m.content} for m in messages if m.role != "system"]
    if system:
        first_user = next((m for m in out if m["role"] == "user"), None)
        if first_user is None:
            out.insert(0, {"role": "user", "content": system})
        else:
            first_user["content"] = f"{system}\n\n{first_user['content']}"
    return out


def render_chat(messages: Sequence[ChatMessage], chat_format: str) -> Prompt:
    formatted = chat_formatter(chat_format)(messages=fold_system(messages))
    stop = formatted.stop
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    return Prompt(text=formatted.prompt, special=True, stop=stops)


def render_generate(job: GenerateJob, chat_format: str) -> Prompt:
    """The prompt of a generate job; the job's own stop strings come after the format's."""
    if job.messages is not None:
        chat = render_chat(job.messages, chat_format)
        return Prompt(chat.text, chat.special, chat.stop + tuple(job.stop))
    return Prompt(text=job.prompt or "", special=False, stop=tuple(job.stop))


def render_summary(instruction: str, text: str, chat_format: str) -> Prompt:
    return render_chat([ChatMessage(role="user", content=instruction + text)], chat_format)
