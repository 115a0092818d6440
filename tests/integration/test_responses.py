"""The Responses API, driven by the official `openai` package against real workers: background
mode, streams and their resume, cancel, conversations, store: false, refused fields."""

from __future__ import annotations

import json
import time
from typing import Any

import openai
import pytest

from tests.conftest import Stack

STORY = "Tell a long story about a lighthouse keeper and a storm."


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0,
                         timeout=120)


def job_of(response_id: str) -> str:
    return response_id.removeprefix("resp_")


def tokens_of(stack: Stack, job_id: str) -> str:
    return "".join(e["text"] for e in stack.stream(job_id) if e["type"] == "token")


def until_ended(client: openai.OpenAI, response_id: str, timeout_s: float = 120) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = client.responses.retrieve(response_id)
        if response.status not in ("queued", "in_progress"):
            return response
        time.sleep(0.1)
    raise AssertionError(f"{response_id} still {response.status} after {timeout_s}s")


def test_a_background_response_is_queued_at_once_then_retrieved_completed(
    stack: Stack, client: openai.OpenAI
) -> None:
    made = client.responses.create(model="chat", input="Name three colours.",
                                   instructions="Answer in one line.", background=True,
                                   max_output_tokens=16, temperature=0,
                                   metadata={"team": "npc"})
    assert made.status == "queued" and made.background and made.output == []
    done = until_ended(client, made.id)
    job = stack.job(job_of(made.id))
    assert done.status in ("completed", "incomplete") and job["status"] == "succeeded"
    assert done.output_text == job["result"]["text"] == tokens_of(stack, job["id"])
    assert done.output_text.strip() and done.metadata == {"team": "npc"}
    assert done.usage is not None and done.usage.output_tokens == \
        job["usage"]["completion_tokens"] <= 16
    assert done.usage.input_tokens == job["usage"]["prompt_tokens"] > 5
    messages = job_messages(stack, job["id"])
    assert messages[0] == {"role": "system", "content": "Answer in one line."}
    assert messages[-1] == {"role": "user", "content": "Name three colours."}
    # stored: kept for responses_ttl_s (30 days), not the job TTL (1 day)
    assert stack.redis.ttl(stack.keys.job(job["id"])) > 86_400


def job_messages(stack: Stack, job_id: str) -> list[dict[str, str]]:
    request = stack.redis.hget(stack.keys.job(job_id), "request")
    assert request is not None
    return list(json.loads(request)["messages"])


def assert_in_order(events: list[Any]) -> str:
    """Sequence numbers 0..n, the lifecycle in order; the deltas' text."""
    assert [e.sequence_number for e in events] == list(range(len(events)))
    types = [e.type for e in events]
    assert types[:5] == ["response.created", "response.queued", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert types[-4:-1] == ["response.output_text.done", "response.content_part.done",
                            "response.output_item.done"]
    assert types[-1] in ("response.completed", "response.incomplete")
    assert set(types[5:-4]) == {"response.output_text.delta"}
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-4].text == text == events[-1].response.output[0].content[0].text
    return text


def test_a_streamed_response_sends_numbered_events_whose_deltas_are_the_job_text(
    stack: Stack, client: openai.OpenAI
) -> None:
    events = list(client.responses.create(model="chat", input="Say hello.", stream=True,
                                          max_output_tokens=24, temperature=0))
    text = assert_in_order(events)
    job = stack.job(job_of(events[0].response.id))
    assert text == job["result"]["text"] == tokens_of(stack, job["id"]) and text


def test_a_stream_broken_after_n_events_resumes_with_exactly_the_rest(
    stack: Stack, client: openai.OpenAI
) -> None:
    made = client.responses.create(model="chat", input=STORY, background=True,
                                   max_output_tokens=48, temperature=0)
    first = []
    with client.responses.retrieve(made.id, stream=True) as stream:
        for event in stream:
            first.append(event)
            if len(first) == 9:
                break  # the connection goes; a background response runs on
    n = first[-1].sequence_number
    rest = list(client.responses.retrieve(made.id, stream=True, starting_after=n))
    assert rest[0].sequence_number == n + 1
    whole = list(client.responses.retrieve(made.id, stream=True))
    as_dicts = [e.to_dict() for e in whole]
    assert [e.to_dict() for e in first + rest] == as_dicts
    assert assert_in_order(whole) == stack.job(job_of(made.id))["result"]["text"]


def test_cancelling_a_running_background_response_stops_it_within_a_token(
    stack: Stack, client: openai.OpenAI
) -> None:
    made = client.responses.create(model="chat", input=STORY, background=True,
                                   max_output_tokens=256, temperature=0.7)
    job_id = job_of(made.id)
    deadline = time.monotonic() + 60
    while len(tokens_of(stack, job_id)) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    seen = sum(e["type"] == "token" for e in stack.stream(job_id))
    assert seen >= 1
    cancelled = client.responses.cancel(made.id)
    assert cancelled.status == "cancelled"
    events = stack.stream(job_id)
    assert events[-1]["type"] == "cancelled"
    assert sum(e["type"] == "token" for e in events) <= seen + 2  # the one in flight, at most
    assert cancelled.output[0].content[0].text == tokens_of(stack, job_id)
    last = list(client.responses.retrieve(made.id, stream=True))[-1]
    # not one of the openai package's stream event types (OpenAI's webhooks have it): it
    # arrives loosely parsed, its response as a dict
    assert last.type == "response.cancelled"
    assert last.to_dict()["response"]["status"] == "cancelled"


def test_a_three_turn_conversation_carries_the_first_two_into_the_third(
    stack: Stack, client: openai.OpenAI
) -> None:
    one = client.responses.create(model="chat", input="My name is Ada.", max_output_tokens=8,
                                  temperature=0)
    two = client.responses.create(model="chat", input="I live in Lyon.", max_output_tokens=8,
                                  temperature=0, previous_response_id=one.id)
    three = client.responses.create(model="chat", input="Where do I live?",
                                    max_output_tokens=8, temperature=0,
                                    previous_response_id=two.id, instructions="Be brief.")
    assert three.previous_response_id == two.id and three.status in ("completed", "incomplete")
    prompt = job_messages(stack, job_of(three.id))
    assert prompt == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": one.output_text},
        {"role": "user", "content": "I live in Lyon."},
        {"role": "assistant", "content": two.output_text},
        {"role": "user", "content": "Where do I live?"},
    ]
    items = client.responses.input_items.list(three.id)
    assert [i.content[0].text for i in items.data] == ["Where do I live?"]
    lines = [json.loads(line) for line in
             stack.http.get(f"/v1/responses/{three.id}/export").text.splitlines()]
    assert [(ln["response_id"], ln["role"], ln["content"][0]["text"]) for ln in lines] == [
        (one.id, "user", "My name is Ada."), (one.id, "assistant", one.output_text),
        (two.id, "user", "I live in Lyon."), (two.id, "assistant", two.output_text),
        (three.id, "user", "Where do I live?"), (three.id, "assistant", three.output_text)]


def test_a_conversation_too_long_for_the_window_drops_its_oldest_turns_whole(
    stack: Stack, client: openai.OpenAI
) -> None:
    long_text = "The harbour was quiet that night. " * 80  # about 560 tokens
    one = client.responses.create(model="chat", input=long_text, max_output_tokens=4)
    two = client.responses.create(model="chat", input="Short question?", max_output_tokens=4,
                                  previous_response_id=one.id)
    three = client.responses.create(model="chat", input=long_text + "And?",
                                    max_output_tokens=200, previous_response_id=two.id)
    prompt = job_messages(stack, job_of(three.id))  # n_ctx 1024: 560 + 560 + 200 won't fit
    assert [m["content"] for m in prompt] == ["Short question?", two.output_text,
                                              long_text + "And?"]
    export = stack.http.get(f"/v1/responses/{three.id}/export").text.splitlines()
    assert json.loads(export[0])["content"][0]["text"] == long_text  # kept for the record
    with pytest.raises(openai.BadRequestError) as refused:  # "disabled": never drop a turn
        client.responses.create(model="chat", input=long_text + "And?", max_output_tokens=200,
                                previous_response_id=two.id, truncation="disabled")
    assert refused.value.body["param"] == "input"  # type: ignore[index]
    assert refused.value.body["code"] == "context_length_exceeded"  # type: ignore[index]


def test_store_false_keeps_nothing_once_answered(stack: Stack, client: openai.OpenAI) -> None:
    raw = client.responses.with_raw_response.create(model="chat", input="Hi.", store=False,
                                                    max_output_tokens=4)
    answer, job_id = raw.parse(), raw.headers["x-tokenpool-job-id"]
    assert answer.output_text is not None and answer.to_dict()["store"] is False
    assert not stack.redis.exists(stack.keys.job(job_id), stack.keys.events(job_id))
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(answer.id)
    with pytest.raises(openai.BadRequestError) as both:
        client.responses.create(model="chat", input="Hi.", store=False, background=True)
    assert both.value.body["param"] == "store"  # type: ignore[index]


@pytest.mark.parametrize(("fields", "param"), [
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input"),
    ({"temperature": 3}, "temperature"),
    ({"previous_response_id": "resp_" + "0" * 32}, "previous_response_id"),
    ({"text": {"format": {"type": "json_schema", "name": "x",
                          "schema": {"type": "object", "patternProperties": {}}}}},
     "text.format.schema.patternProperties"),
])
def test_what_tokenpool_cannot_honour_is_a_4xx_naming_the_field(
    stack: Stack, client: openai.OpenAI, fields: dict[str, Any], param: str
) -> None:
    before = stack.redis.llen(stack.keys.queue("chat"))
    body = {"model": "chat", "input": "Hi.", **fields}
    reply = stack.http.post("/v1/responses", json=body)
    assert 400 <= reply.status_code < 500, reply.text
    assert (reply.json()["error"]["param"] or "").startswith(param), reply.json()
    assert stack.redis.llen(stack.keys.queue("chat")) == before


def test_structured_output_through_text_format_is_valid_json_of_the_schema(
    client: openai.OpenAI
) -> None:
    schema = {"type": "object", "properties": {"colour": {"type": "string",
                                                          "enum": ["red", "blue"]}},
              "required": ["colour"], "additionalProperties": False}
    answer = client.responses.create(
        model="chat", input="Pick a colour.", max_output_tokens=24, temperature=0,
        text={"format": {"type": "json_schema", "name": "pick", "schema": schema}})
    assert json.loads(answer.output_text)["colour"] in ("red", "blue")
    assert answer.text is not None and answer.text.format.type == "json_schema"


def test_a_reader_that_hangs_up_on_a_foreground_stream_cancels_it(
    stack: Stack, client: openai.OpenAI
) -> None:
    stream = client.responses.create(model="chat", input=STORY, stream=True,
                                     max_output_tokens=256)
    for event in stream:
        if event.type == "response.output_text.delta":
            job_id = job_of(event.item_id.removeprefix("msg_"))
            break
    stream.close()
    deadline = time.monotonic() + 30
    while stack.job(job_id)["status"] != "cancelled":
        assert time.monotonic() < deadline, stack.job(job_id)["status"]
        time.sleep(0.1)
