"""Tool calls on chat completions, as llama.cpp's generic tool format does them: the functions
go into the system prompt, and the answer is sampled under a JSON schema, either
`{"tool_calls": [{"name", "arguments"}]}` or `{"response": "text"}`; `tool_choice` picks which
the schema allows (`auto` both, `required` or a named function only calls, `none` plain text,
no tools shown). The reply's JSON becomes OpenAI's `tool_calls` (ids `call_<job>_<i>`) or
its content. Tool results (`role: "tool"`) and earlier assistant calls go back into the
conversation as text the model reads.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.errors import ApiError

TOOL_PROMPT = (
    "You can call these functions:\n{functions}\n\nAnswer with JSON only. To call functions: "
    '{{"tool_calls": [{{"name": "<function name>", "arguments": {{...}}}}]}}. '
    'To answer directly: {{"response": "<your answer>"}}.'
)


class Lenient(BaseModel):
    """OpenAI's request objects: fields we do not use are ignored, as llama-server does."""

    model_config = ConfigDict(extra="ignore")


class Function(Lenient):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object",
                                                                "properties": {}})
    strict: bool | None = None


class Tool(Lenient):
    type: Literal["function"]
    function: Function


class NamedChoice(Lenient):
    type: Literal["function"]
    function: dict[str, str]


class CalledFunction(Lenient):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(Lenient):
    """An assistant's earlier call, sent back in `messages`."""

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


ToolChoice = Literal["none", "auto", "required"] | NamedChoice


def chosen(tools: list[Tool], choice: ToolChoice | None) -> list[Function] | None:
    """The functions the answer may call (None: tool_choice none, a plain answer)."""
    if choice == "none" or not tools:
        return None
    if isinstance(choice, NamedChoice):
        name = choice.function.get("name")
        found = [tool.function for tool in tools if tool.function.name == name]
        if not found:
            raise ApiError(400, "invalid_request", f"tool_choice: no tool named {name!r}",
                           "tool_choice")
        return found
    return [tool.function for tool in tools]


def answer_schema(functions: list[Function], choice: ToolChoice | None,
                  parallel: bool) -> dict[str, Any]:
    """The JSON schema of an answer that calls `functions` (or, with `auto`, answers)."""
    call = {"anyOf": [{"type": "object", "properties": {
        "name": {"const": f.name}, "arguments": f.parameters}, "required": ["name", "arguments"]}
        for f in functions]}
    calls: dict[str, Any] = {"type": "array", "items": call, "minItems": 1}
    if not parallel:
        calls["maxItems"] = 1
    calling = {"type": "object", "properties": {"tool_calls": calls},
               "required": ["tool_calls"]}
    if choice is None or choice == "auto":
        answering = {"type": "object", "properties": {"response": {"type": "string"}},
                     "required": ["response"]}
        return {"anyOf": [calling, answering]}
    return calling


def system_prompt(tools: list[Tool]) -> str:
    functions = [{"name": t.function.name, "description": t.function.description or "",
                  "parameters": t.function.parameters} for t in tools]
    return TOOL_PROMPT.format(functions=json.dumps(functions, indent=1))


def with_tools(messages: list[dict[str, str]], tools: list[Tool]) -> list[dict[str, str]]:
    """The conversation with the functions described in its system message."""
    prompt = system_prompt(tools)
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{prompt}"},
                *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def calls_of(job_id: str, text: str) -> tuple[list[dict[str, Any]] | None, str | None]:
    """(OpenAI tool_calls, None) or (None, the content) from a tools answer's JSON text."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None, text  # cut by max_tokens: what there is, as content
    if isinstance(value, dict) and isinstance(value.get("tool_calls"), list):
        return [{"id": f"call_{job_id}_{i}", "type": "function",
                 "function": {"name": call["name"],
                              "arguments": json.dumps(call["arguments"])}}
                for i, call in enumerate(value["tool_calls"])], None
    if isinstance(value, dict) and isinstance(value.get("response"), str):
        return None, value["response"]
    return None, text


def call_text(calls: list[ToolCall]) -> str:
    """An earlier assistant turn's tool calls, as the JSON the model itself would write."""
    return json.dumps({"tool_calls": [
        {"name": call.function.name, "arguments": _json_or_text(call.function.arguments)}
        for call in calls]})


def _json_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments
