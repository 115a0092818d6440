"""Structured output, tool calls and logprobs on the real model: the official `openai`
package's parse and tools, native jobs with a schema, and constrained jobs sharing a batch
with free ones whose text their company does not change."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.conftest import Stack

PERSON_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0,
                                                         "maximum": 150}},
    "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=150)


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0,
                         timeout=120)


ADA = [{"role": "user", "content": "Ada Lovelace was 36 years old. Give her name and age."}]


def test_the_openai_parse_helper_gets_an_object_of_the_pydantic_model(stack, client) -> None:
    raw = client.chat.completions.with_raw_response.parse(
        model="chat", messages=ADA, response_format=Person, temperature=0, max_tokens=64)
    reply = raw.parse()
    person = reply.choices[0].message.parsed
    assert isinstance(person, Person), reply
    job = stack.job(raw.headers["x-tokenpool-job-id"])
    assert job["result"]["valid"] is True
    assert job["result"]["json"] == person.model_dump()
    assert reply.choices[0].message.content == job["result"]["text"]


def test_a_native_job_with_a_schema_carries_the_parsed_json_beside_the_text(stack) -> None:
    job_id = stack.submit({"kind": "generate", "messages": ADA, "max_tokens": 64,
                           "temperature": 0, "response_format": {
                               "type": "json_schema",
                               "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}})
    record = stack.wait_final(job_id)
    result = record["result"]
    assert record["status"] == "succeeded" and result["valid"] is True, result
    assert json.loads(result["text"]) == result["json"]
    jsonschema.validate(result["json"], PERSON_SCHEMA)
    events = stack.stream(job_id)
    assert "".join(e["text"] for e in events if e["type"] == "token") == result["text"]


def test_output_cut_by_max_tokens_is_reported_incomplete_never_valid(stack) -> None:
    job_id = stack.submit({"kind": "generate", "messages": ADA, "max_tokens": 3,
                           "temperature": 0, "response_format": {"type": "json_object"}})
    result = stack.wait_final(job_id)["result"]
    assert result["finish_reason"] == "length"
    assert result["valid"] is False and result["json"] is None
    assert result["invalid_reason"].startswith("incomplete")


@pytest.mark.parametrize("body", [
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}}}},
    {"grammar": "root ::= undefined-rule"},
])
def test_a_constraint_that_cannot_be_enforced_is_a_400_naming_the_field(stack, body) -> None:
    reply = stack.http.post("/v1/jobs", json={"kind": "generate", "prompt": "x", **body})
    assert reply.status_code == 400, reply.text
    field = reply.json()["error"]["field"]
    assert field == ("grammar" if "grammar" in body else
                     "response_format.json_schema.schema.properties.tags.uniqueItems")


def test_openai_clients_get_the_unsupported_schema_as_an_invalid_request(client) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="chat", messages=ADA, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {
                "type": "object", "patternProperties": {"^a": {"type": "string"}}}}})
    assert caught.value.body["param"] == "response_format.json_schema.schema.patternProperties"


def check_call(call: Any) -> None:
    assert call.type == "function" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Oslo?"}]


def test_tool_choice_required_returns_a_call_whose_arguments_match_the_function(client) -> None:
    reply = client.chat.completions.create(
        model="chat", messages=WEATHER_QUESTION, tools=[WEATHER], tool_choice="required",
        parallel_tool_calls=False, temperature=0, max_tokens=96)  # 270M repeats parallel calls
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    for call in choice.message.tool_calls:
        check_call(call)
    # the result goes back, and the model answers (tool_choice none: plain text)
    follow_up = client.chat.completions.create(
        model="chat", tool_choice="none", tools=[WEATHER], temperature=0, max_tokens=16,
        messages=[*WEATHER_QUESTION, choice.message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id,
                   "content": "12 degrees, raining"}])
    assert follow_up.choices[0].message.content and not follow_up.choices[0].message.tool_calls


def test_a_streamed_tool_call_arrives_in_openais_chunk_format(client) -> None:
    stream = client.chat.completions.create(
        model="chat", messages=WEATHER_QUESTION, tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False, temperature=0, max_tokens=96, stream=True)
    calls: dict[int, dict[str, str]] = {}
    reasons = []
    for chunk in stream:
        for choice in chunk.choices:
            reasons.append(choice.finish_reason)
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
    assert reasons[-1] == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["function"]["parameters"])


def assert_logprobs_consistent(entries: list[Any], text: str) -> None:
    """Finite, at most 0, top ones sorted, and the greedy token the likeliest of them."""
    assert entries and "".join(e.token for e in entries) == text
    for entry in entries:
        assert math.isfinite(entry.logprob) and entry.logprob <= 0
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry.top_logprobs[0].token == entry.token  # greedy took the likeliest
        assert math.isclose(tops[0], entry.logprob, abs_tol=1e-6)
        assert bytes(entry.bytes) == entry.token.encode()


def test_logprobs_are_finite_sorted_and_consistent_with_the_sampled_token(client) -> None:
    reply = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "Say hello."}], max_tokens=12,
        temperature=0, logprobs=True, top_logprobs=3)
    choice = reply.choices[0]
    assert_logprobs_consistent(choice.logprobs.content, choice.message.content)
    streamed = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "Say hello."}], max_tokens=12,
        temperature=0, logprobs=True, top_logprobs=3, stream=True)
    entries = [e for chunk in streamed for c in chunk.choices
               for e in (c.logprobs.content if c.logprobs else [])]
    assert [e.model_dump() for e in entries] == \
        [e.model_dump() for e in choice.logprobs.content]
    legacy = client.completions.create(model="chat", prompt="Once upon a time", max_tokens=6,
                                       temperature=0, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert "".join(lp.tokens) == legacy.choices[0].text
    assert all(len(top) == 2 for top in lp.top_logprobs)


def test_constrained_and_free_jobs_share_a_batch_and_the_free_text_is_unchanged(stack) -> None:
    free = {"kind": "generate", "prompt": "The river ran past the old mill and",
            "max_tokens": 40, "temperature": 0, "repeat_penalty": 1.0}
    alone = stack.wait_final(stack.submit(free))["result"]["text"]
    constrained = [{"kind": "generate", "messages": ADA, "max_tokens": 48, "temperature": 0,
                    "response_format": {"type": "json_schema", "json_schema": {
                        "name": "person", "schema": PERSON_SCHEMA}}} for _ in range(3)]
    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(stack.submit, [*constrained, free]))
    records = [stack.wait_final(job_id) for job_id in ids]
    assert records[-1]["result"]["text"] == alone
    assert all(r["result"]["valid"] for r in records[:-1]), [r["result"] for r in records]


TICKET_SCHEMA = {"type": "object", "properties": {
    "topic": {"type": "string", "maxLength": 24}, "urgent": {"type": "boolean"}},
    "required": ["topic", "urgent"], "additionalProperties": False}


def test_a_batch_with_a_schema_yields_a_valid_object_for_every_item(stack) -> None:
    items = [{"id": f"t-{i}", "text": f"Ticket {i}: the printer on floor {i % 7} is jammed "
              f"again and {'nobody can print' if i % 2 else 'it can wait'}."}
             for i in range(50)]
    reply = stack.http.post("/v1/batches", json={
        "kind": "summarize", "items": items, "options": {
            # a token holds at least one character: the longest answer fits in 64
            "max_tokens": 64, "temperature": 0, "response_format": {
                "type": "json_schema", "json_schema": {"name": "ticket",
                                                       "schema": TICKET_SCHEMA}}}})
    assert reply.status_code == 202, reply.text
    batch_id = reply.json()["id"]
    lines = [json.loads(line) for line in stack.http.get(
        f"/v1/batches/{batch_id}/results", timeout=600).text.splitlines()]
    assert [line["id"] for line in lines] == [item["id"] for item in items]
    for line in lines:
        assert line["status"] == "succeeded" and line["result"]["valid"] is True, line
        jsonschema.validate(line["result"]["json"], TICKET_SCHEMA)
    report = stack.http.get(f"/v1/batches/{batch_id}").json()
    assert report["output"] == {"valid": 50, "invalid": 0}


def test_an_embed_batch_refuses_a_response_format_naming_it(stack) -> None:
    reply = stack.http.post("/v1/batches", json={
        "kind": "embed", "items": [{"id": "a", "text": "x"}],
        "options": {"response_format": {"type": "json_object"}}})
    assert reply.status_code == 422 and "response_format" in reply.json()["error"]["message"]


def test_native_token_events_carry_the_logprobs_of_their_tokens(stack) -> None:
    job_id = stack.submit({"kind": "generate", "prompt": "The capital of France is",
                           "max_tokens": 10, "temperature": 0, "logprobs": True,
                           "top_logprobs": 2})
    result = stack.wait_final(job_id)["result"]
    tokens = [e for e in stack.stream(job_id) if e["type"] == "token"]
    assert all("".join(lp["token"] for lp in e["logprobs"]) == e["text"] for e in tokens)
    assert [lp for e in tokens for lp in e["logprobs"]] == result["logprobs"]
    assert all(len(lp["top_logprobs"]) == 2 and lp["logprob"] <= 0
               for lp in result["logprobs"])


def test_a_function_whose_parameters_cannot_be_enforced_is_refused_naming_tools(client) -> None:
    bad = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "format": "email"}}}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="chat", messages=ADA, tools=[bad])
    assert caught.value.body["param"] == "tools"
