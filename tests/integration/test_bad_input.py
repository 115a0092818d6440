"""Every rejected request: a 4xx JSON error naming the field, and nothing queued or stored."""

from __future__ import annotations

import pytest

LONG_PROMPT = "word " * 1200  # over the chat model's 1024-token test context


def queued_state(stack):
    jobs = list(stack.redis.scan_iter(match=f"{stack.keys.prefix}:job:*"))
    queues = sum(stack.redis.llen(k) for k in stack.redis.scan_iter(match=f"{stack.keys.prefix}.*")
                 if stack.redis.type(k) == b"list")
    return len(jobs), queues


@pytest.mark.parametrize(("body", "status", "type_", "field"), [
    ({"kind": "generate", "model": "nope", "prompt": "x"}, 400, "unknown_model", "model"),
    ({"kind": "embed", "model": "chat", "texts": ["x"]}, 400, "wrong_model_kind", "model"),
    ({"kind": "generate", "model": "embed", "prompt": "x"}, 400, "wrong_model_kind", "model"),
    ({"kind": "generate", "prompt": ""}, 422, "invalid_request", None),
    ({"kind": "generate", "prompt": "x", "max_tokens": 257}, 422, "max_tokens_too_large",
     "max_tokens"),
    ({"kind": "generate", "prompt": LONG_PROMPT}, 400, "context_length_exceeded", "prompt"),
    ({"kind": "generate", "messages": [{"role": "user", "content": LONG_PROMPT}]}, 400,
     "context_length_exceeded", "messages"),
    ({"kind": "embed", "texts": ["t"] * 9}, 413, "too_many_texts", "texts"),
    ({"kind": "generate", "prompt": "x", "stop": ["ok", "s" * 201]}, 413, "stop_too_long",
     "stop[1]"),
    ({"kind": "generate", "messages": [{"role": "user", "content": "hi"}] * 257}, 413,
     "too_many_messages", "messages"),
    ({"kind": "embed", "texts": ["ok", "x" * 501]}, 413, "text_too_long", "texts[1]"),
    ({"kind": "embed", "texts": ["ok", " "]}, 422, "invalid_request", "texts[1]"),
    ({"kind": "generate", "prompt": "x", "temperature": -1}, 422, "invalid_request",
     "temperature"),
    ({"kind": "generate", "prompt": "x", "stop": [""]}, 422, "invalid_request", "stop"),
    ({"kind": "summarize", "text": "x", "max_tokens": 481}, 422, "max_tokens_too_large",
     "max_tokens"),
    ({"kind": "generate", "prompt": "x", "timeout_s": 0}, 422, "invalid_request", "timeout_s"),
    ({"kind": "embed", "texts": ["x"], "timeout_s": 3601}, 422, "timeout_too_large",
     "timeout_s"),
    ({"kind": "nope"}, 422, "invalid_request", "kind"),
    ([1, 2], 422, "invalid_request", None),
])
def test_bad_jobs_get_a_4xx_naming_the_field_and_queue_nothing(stack, body, status, type_, field):
    before = queued_state(stack)
    reply = stack.http.post("/v1/jobs", json=body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["type"] == type_ and error["field"] == field and error["message"]
    assert queued_state(stack) == before


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b"", b'{"kind": "generate",'])
def test_malformed_json_is_a_400(stack, raw):
    reply = stack.http.post("/v1/jobs", content=raw, headers={"content-type": "application/json"})
    assert reply.status_code == 400
    assert reply.json()["error"] | {"message": ""} == {"type": "invalid_json", "field": "body",
                                                       "message": ""}


def test_an_oversized_body_is_a_413(stack):
    body = {"kind": "summarize", "text": "x" * 70_000}
    reply = stack.http.post("/v1/jobs", json=body)
    assert reply.status_code == 413 and reply.json()["error"]["field"] == "body"


def test_an_oversized_body_without_content_length_is_a_413(stack):
    def chunks():
        yield b'{"kind": "summarize", "text": "'
        for _ in range(80):
            yield b"x" * 1000
        yield b'"}'

    reply = stack.http.post("/v1/jobs", content=chunks())
    assert reply.status_code == 413


UNKNOWN = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    "path", [f"/v1/jobs/{UNKNOWN}", "/v1/jobs/not-an-id", f"/v1/jobs/{UNKNOWN}/events"]
)
def test_an_unknown_job_is_a_404(stack, path):
    reply = stack.http.get(path)
    assert reply.status_code == 404 and reply.json()["error"]["type"] == "not_found"


def test_cancelling_an_unknown_job_is_a_404(stack):
    assert stack.http.delete("/v1/jobs/0123456789abcdef0123456789abcdef").status_code == 404


def test_a_bad_last_event_id_is_a_400_naming_it(stack):
    job_id = stack.submit({"kind": "embed", "texts": ["x"]})
    reply = stack.http.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "abc"})
    assert reply.status_code == 400 and reply.json()["error"]["field"] == "Last-Event-ID"


def test_a_bad_idempotency_key_is_a_400(stack):
    reply = stack.http.post("/v1/jobs", json={"kind": "embed", "texts": ["x"]},
                            headers={"Idempotency-Key": "k" * 201})
    assert reply.status_code == 400 and reply.json()["error"]["field"] == "Idempotency-Key"


def test_an_unknown_route_and_a_wrong_method_are_json_errors(stack):
    assert stack.http.get("/v2/nothing").json()["error"]["type"] == "not_found"
    reply = stack.http.put("/v1/jobs")
    assert reply.status_code == 405 and reply.json()["error"]["type"] == "method_not_allowed"


def test_a_model_whose_file_is_missing_is_a_503_not_a_500(redis_server, monkeypatch):
    from starlette.testclient import TestClient

    from api.app import create_app
    from broker.settings import Settings

    monkeypatch.setenv("TOKENPOOL_MODELS__GHOST__KIND", "llm")
    monkeypatch.setenv("TOKENPOOL_MODELS__GHOST__SOURCE", "/nowhere/ghost.gguf")
    monkeypatch.delenv("TOKENPOOL_CONFIG", raising=False)
    with TestClient(create_app(Settings(key_prefix="tpghost"), redis_server.url)) as client:
        reply = client.post("/v1/jobs", json={"kind": "generate", "model": "ghost", "prompt": "x"})
    assert reply.status_code == 503
    assert reply.json()["error"]["type"] == "model_unavailable"
    assert "/nowhere" not in reply.text


@pytest.mark.parametrize(("body", "status", "type_", "field"), [
    ({"jobs": []}, 422, "invalid_request", "jobs"),
    ({"jobs": [{"kind": "embed", "texts": ["ok"]}, {"kind": "generate", "prompt": ""}]}, 422,
     "invalid_request", "jobs[1]"),
    ({"jobs": [{"kind": "embed", "texts": ["ok"]}, {"kind": "embed", "texts": ["t"] * 9}]}, 413,
     "too_many_texts", "jobs[1].texts"),
    ({"jobs": [{"kind": "generate", "model": "nope", "prompt": "x"}]}, 400, "unknown_model",
     "jobs[0].model"),
    ({"jobs": {"kind": "embed"}}, 422, "invalid_request", "jobs"),
])
def test_a_bad_batch_is_refused_whole_naming_the_job_and_field(stack, body, status, type_,
                                                                field):
    before = queued_state(stack)
    reply = stack.http.post("/v1/jobs/batch", json=body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["type"] == type_ and error["field"] == field and error["message"]
    assert queued_state(stack) == before


def test_a_batch_refuses_an_idempotency_key(stack):
    reply = stack.http.post("/v1/jobs/batch", json={"jobs": [{"kind": "embed", "texts": ["x"]}]},
                            headers={"Idempotency-Key": "k1"})
    assert reply.status_code == 400 and reply.json()["error"]["field"] == "Idempotency-Key"
