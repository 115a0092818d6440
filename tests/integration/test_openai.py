"""The OpenAI-compatible routes, driven by the official `openai` package against real workers."""

from __future__ import annotations

import math
import time

import httpx
import openai
import pytest

from tests.conftest import Stack


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0,
                         timeout=120)


def tokens_of(stack: Stack, job_id: str) -> str:
    return "".join(e["text"] for e in stack.stream(job_id) if e["type"] == "token")


def test_a_chat_completion_is_a_queued_job_whose_text_and_usage_come_back(
    stack: Stack, client: openai.OpenAI
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "Name three colours."}],
        max_tokens=12, temperature=0, seed=1,
    )
    reply = raw.parse()
    job_id = raw.headers["x-tokenpool-job-id"]
    job = stack.job(job_id)
    assert job["status"] == "succeeded" and job["kind"] == "generate"
    assert reply.id == f"chatcmpl-{job_id}"
    assert reply.object == "chat.completion" and reply.model == "chat"
    message = reply.choices[0].message
    assert message.role == "assistant"
    assert message.content == job["result"]["text"] == tokens_of(stack, job_id)
    assert message.content.strip()
    assert reply.choices[0].finish_reason == job["result"]["finish_reason"]
    assert reply.usage is not None
    assert reply.usage.completion_tokens == job["usage"]["completion_tokens"] <= 12
    assert reply.usage.prompt_tokens == job["usage"]["prompt_tokens"] > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_a_streamed_chat_sends_chunks_that_add_up_to_the_job_text_then_done(
    stack: Stack, client: openai.OpenAI
) -> None:
    stream = client.chat.completions.create(
        model="chat", messages=[{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Say hello."}],
        max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    job_id = chunks[0].id.removeprefix("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and text == stack.job(job_id)["result"]["text"] == tokens_of(stack, job_id)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] in ("stop", "length") and not any(reasons[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == stack.job(job_id)["usage"]["completion_tokens"]


def test_the_raw_stream_ends_with_data_done(stack: Stack) -> None:
    body = {"model": "chat", "prompt": "One, two,", "max_tokens": 4, "stream": True}
    with stack.http.stream("POST", "/v1/completions", json=body, timeout=60) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in reply.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith('data: {"id": "cmpl-') for line in lines[:-1])


def test_a_plain_completion_continues_the_prompt_and_streams_the_same_way(
    stack: Stack, client: openai.OpenAI
) -> None:
    whole = client.completions.create(model="chat", prompt="The capital of France is",
                                      max_tokens=6, temperature=0)
    assert whole.object == "text_completion"
    assert whole.choices[0].text == stack.job(whole.id.removeprefix("cmpl-"))["result"]["text"]
    assert whole.usage is not None and whole.usage.completion_tokens <= 6
    parts = list(client.completions.create(model="chat", prompt="The capital of France is",
                                           max_tokens=6, temperature=0, stream=True))
    streamed = "".join(p.choices[0].text for p in parts)
    assert streamed == stack.job(parts[0].id.removeprefix("cmpl-"))["result"]["text"]
    assert streamed.strip()


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.hypot(*a) / math.hypot(*b)


def test_embeddings_come_back_in_order_with_sensible_similarities(
    stack: Stack, client: openai.OpenAI
) -> None:
    texts = ["A cat sits on the mat.", "A kitten rests on a rug.", "Stock markets fell today."]
    # The openai package asks for base64 by default and decodes it; float is asked for here.
    as_float = client.embeddings.create(model="embed", input=texts, encoding_format="float")
    as_base64 = client.embeddings.create(model="embed", input=texts)
    vectors = [d.embedding for d in as_float.data]
    assert [d.index for d in as_float.data] == [0, 1, 2]
    assert all(len(v) == 384 for v in vectors)
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.2
    for a, b in zip(vectors, (d.embedding for d in as_base64.data), strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-6
    assert as_float.usage.prompt_tokens > len(texts)
    single = client.embeddings.create(model="embed", input=texts[2], encoding_format="float")
    assert cosine(single.data[0].embedding, vectors[2]) > 0.999


def test_models_are_listed_the_openai_way(client: openai.OpenAI) -> None:
    ids = {m.id: m for m in client.models.list()}
    assert {"chat", "summary", "embed"} <= set(ids)
    assert ids["chat"].object == "model" and ids["chat"].owned_by == "tokenpool"


@pytest.mark.parametrize(("kwargs", "status", "param"), [
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": "chat", "messages": []}, 400, "messages"),
    ({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6},
     422, "max_tokens"),
    ({"model": "embed", "messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
])
def test_bad_chat_requests_get_openai_errors_naming_the_parameter(
    stack: Stack, client: openai.OpenAI, kwargs: dict[str, object], status: int, param: str
) -> None:
    before = stack.redis.dbsize()
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    assert caught.value.status_code == status
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param in error["message"] or error["code"] == "model_not_found"
    assert stack.redis.dbsize() == before  # nothing stored, nothing queued


def test_token_arrays_are_refused_naming_input(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="embed", input=[[1, 2, 3]], encoding_format="float")
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "input"


def test_a_client_that_hangs_up_cancels_its_job(stack: Stack) -> None:
    body = {"model": "chat", "prompt": "Write a very long story about a dragon.",
            "max_tokens": 250, "stream": True, "temperature": 0.9}
    with stack.http.stream("POST", "/v1/completions", json=body, timeout=60) as reply:
        job_id = reply.headers["x-tokenpool-job-id"]
        for line in reply.iter_lines():
            if line.startswith("data: ") and '"text": "' in line:
                break  # first token seen: hang up
    final = stack.wait_final(job_id, timeout_s=30)
    assert final["status"] == "cancelled"
    assert stack.stream(job_id)[-1]["type"] == "cancelled"
    assert final["usage"] is None or final["usage"]["completion_tokens"] < 250


def test_a_waiting_non_streamed_client_that_hangs_up_cancels_its_job(stack: Stack) -> None:
    marker = f"story number {time.time_ns()}"
    body = {"model": "chat", "messages": [{"role": "user", "content": f"Tell {marker}."}],
            "max_tokens": 250, "temperature": 0.9}
    with pytest.raises(httpx.ReadTimeout):
        stack.http.post("/v1/chat/completions", json=body, timeout=1.5)
    job_id = job_with(stack, marker)
    final = stack.wait_final(job_id, timeout_s=30)
    assert final["status"] == "cancelled"
    assert stack.stream(job_id)[-1]["type"] == "cancelled"


def job_with(stack: Stack, marker: str) -> str:
    """The id of the job whose request holds `marker` (the API never answered with it)."""
    for key in stack.redis.scan_iter(match=stack.keys.job("*"), count=10_000):
        job_id = key.decode().rsplit(":", 1)[-1]
        if (key == stack.keys.job(job_id).encode() and stack.redis.type(key) == b"hash"
                and marker in (stack.redis.hget(key, "request") or b"").decode()):
            return job_id
    raise AssertionError(f"no job holds {marker!r}")
