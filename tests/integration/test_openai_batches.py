"""OpenAI's Batch and Files API through the official `openai` package, on real workers: a
100-line chat batch and a 100-line embeddings batch end to end, and a file with bad lines."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import openai
import pytest

from tests.conftest import Stack


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=2,
                         timeout=60)


def upload(client: openai.OpenAI, lines: list[dict[str, Any]]) -> str:
    body = "".join(json.dumps(line) + "\n" for line in lines).encode()
    made = client.files.create(file=("requests.jsonl", io.BytesIO(body)), purpose="batch")
    assert made.bytes == len(body) and made.purpose == "batch"
    assert client.files.content(made.id).content == body
    return made.id


def until_done(client: openai.OpenAI, batch_id: str, timeout_s: float = 400) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        time.sleep(0.5)
    raise AssertionError(f"batch {batch_id} still {batch.status}")


def output_of(client: openai.OpenAI, file_id: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_a_hundred_line_chat_batch_answers_every_custom_id_once(
    stack: Stack, client: openai.OpenAI
) -> None:
    lines = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "chat", "max_tokens": 3, "temperature": 0,
                       "messages": [{"role": "user", "content": f"Count to {i}."}]}}
             for i in range(100)]
    batch = client.batches.create(input_file_id=upload(client, lines),
                                  endpoint="/v1/chat/completions", completion_window="24h",
                                  metadata={"run": "nightly"})
    assert batch.status in ("in_progress", "completed") and batch.request_counts.total == 100
    done = until_done(client, batch.id)
    assert done.status == "completed" and done.error_file_id is None
    assert done.request_counts.completed == 100 and done.request_counts.failed == 0
    assert done.metadata == {"run": "nightly"} and done.completed_at is not None
    out = output_of(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in out) == sorted(f"req-{i}" for i in range(100))
    for line in out[:10]:
        job = stack.job(line["response"]["request_id"])
        body = line["response"]["body"]
        assert line["response"]["status_code"] == 200 and line["error"] is None
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] == job["result"]["text"]
    listed = [b.id for b in client.batches.list(limit=5)]
    assert done.id in listed


def test_a_hundred_line_embeddings_batch_gives_every_vector(
    client: openai.OpenAI
) -> None:
    lines = [{"custom_id": f"doc-{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "embed", "input": f"document number {i}"}} for i in range(100)]
    batch = client.batches.create(input_file_id=upload(client, lines),
                                  endpoint="/v1/embeddings", completion_window="24h")
    done = until_done(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 100
    out = {line["custom_id"]: line for line in output_of(client, done.output_file_id)}
    assert set(out) == {f"doc-{i}" for i in range(100)}
    vectors = [out[f"doc-{i}"]["response"]["body"]["data"][0]["embedding"] for i in range(100)]
    assert all(len(v) == 384 for v in vectors)


def test_bad_lines_fail_the_batch_each_named_by_its_line_and_nothing_runs(
    stack: Stack, client: openai.OpenAI
) -> None:
    good = {"custom_id": "a", "method": "POST", "url": "/v1/embeddings",
            "body": {"model": "embed", "input": "fine"}}
    body = (json.dumps(good) + "\n" + "{not json\n"
            + json.dumps({**good, "custom_id": "b", "url": "/v1/completions"}) + "\n"
            + json.dumps({**good, "custom_id": "c", "body": {"model": "nope", "input": "x"}})
            + "\n" + json.dumps({**good}) + "\n").encode()
    file_id = client.files.create(file=("bad.jsonl", io.BytesIO(body)), purpose="batch").id
    before = stack.redis.llen(stack.keys.queue("embed"))
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/embeddings",
                                  completion_window="24h")
    assert batch.status == "failed" and batch.errors is not None
    errors = {e.line: e for e in batch.errors.data}
    assert sorted(errors) == [2, 3, 4, 5]
    assert errors[3].param == "url" and errors[4].param == "model"
    assert errors[5].code == "duplicate_custom_id"
    assert stack.redis.llen(stack.keys.queue("embed")) == before
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-" + "0" * 32, endpoint="/v1/embeddings",
                              completion_window="24h")
    assert client.files.delete(file_id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(file_id)
