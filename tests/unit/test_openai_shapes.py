"""Pure mapping of the OpenAI-compatible routes: messages, encodings, error bodies, chunks."""

from __future__ import annotations

import base64
import json
import struct

import pytest
from pydantic import ValidationError

from api.errors import ApiError
from api.openai_compat import ChatRequest, CompletionRequest, Message, Shape, encoded, openai_error


def test_developer_messages_become_system_and_text_parts_are_joined() -> None:
    message = Message.model_validate({"role": "developer", "content": [
        {"type": "text", "text": "one"}, {"type": "text", "text": "two"}]})
    assert message.plain() == {"role": "system", "content": "one\ntwo"}


def test_image_parts_are_refused_and_tool_turns_become_text_the_model_reads() -> None:
    with pytest.raises(ValidationError):
        Message.model_validate({"role": "user", "content": [{"type": "image_url"}]})
    result = Message.model_validate({"role": "tool", "content": "21 C", "tool_call_id": "c1"})
    assert result.plain() == {"role": "user", "content": "Result of tool call c1:\n21 C"}
    call = Message.model_validate({"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]})
    assert json.loads(call.plain()["content"]) == {
        "tool_calls": [{"name": "weather", "arguments": {"city": "Oslo"}}]}


def test_unknown_openai_fields_are_ignored_but_unsupported_ones_refused() -> None:
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "user": "u1",
            "metadata": {"a": "b"}}
    assert ChatRequest.model_validate(body).job_fields() == {}
    for bad in ({"n": 3}, {"tools": [{"type": "function"}]},
                {"response_format": {"type": "xml"}}, {"top_logprobs": 21}):
        with pytest.raises(ValidationError):
            ChatRequest.model_validate(body | bad)
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "chat", "prompt": ["a", "b"]})
    assert CompletionRequest.model_validate({"model": "chat", "prompt": ["a"]}).prompt == "a"


def test_extras_pass_through_to_the_job() -> None:
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "priority": 9,
            "top_k": 5, "temperature": 0, "stop": "\n"}
    assert ChatRequest.model_validate(body).job_fields() == {
        "priority": 9, "top_k": 5, "temperature": 0, "stop": "\n"}


def test_base64_embeddings_are_little_endian_float32() -> None:
    vector = [0.5, -1.25, 3.0]
    raw = base64.b64decode(encoded(vector, "base64"))  # type: ignore[arg-type]
    assert list(struct.unpack("<3f", raw)) == vector
    assert encoded(vector, "float") == vector


def test_errors_take_openais_shape_and_unknown_models_are_404() -> None:
    body = json.loads(openai_error(ApiError(400, "unknown_model", "no model 'x'", "model")).body)
    assert body == {"error": {"message": "no model 'x'", "type": "invalid_request_error",
                              "param": "model", "code": "model_not_found"}}
    assert openai_error(ApiError(400, "unknown_model", "m", "model")).status_code == 404
    server = json.loads(openai_error(ApiError(500, "worker_lost", "lost")).body)
    assert server["error"]["type"] == "server_error"


def test_chat_chunks_open_with_the_role_and_close_with_an_empty_delta() -> None:
    shape = Shape("abc", "chat", chat=True)
    first = json.loads(shape.chunk([shape.choice("", None, first=True)])[6:])
    last = json.loads(shape.chunk([shape.choice(None, "length")])[6:])
    assert first["id"] == "chatcmpl-abc" and first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert last["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                  "finish_reason": "length"}
