"""The job pipeline on real parts: redis-server, Celery worker processes, Gemma 270M, MiniLM."""

from __future__ import annotations

import json
import math
import threading
import time

FINAL = {"done", "error", "cancelled"}


def tokens_of(events):
    return "".join(e["text"] for e in events if e["type"] == "token")


def assert_contiguous(events):
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "queued"
    assert sum(e["type"] in FINAL for e in events) == 1 and events[-1]["type"] in FINAL


def test_streamed_tokens_concatenate_to_the_stored_result_with_contiguous_seq(stack):
    job_id = stack.submit({"kind": "generate", "model": "chat", "prompt": "Once upon a time",
                           "max_tokens": 24, "temperature": 0.7, "seed": 3})
    events = stack.events(job_id)
    assert_contiguous(events)
    assert [e["type"] for e in events[:2]] == ["queued", "started"]
    assert events[1]["attempt"] == 1 and events[-1]["type"] == "done"
    job = stack.job(job_id)
    assert job["status"] == "succeeded"
    assert tokens_of(events) == job["result"]["text"] != ""
    assert job["usage"]["completion_tokens"] == 24 and job["usage"]["prompt_tokens"] >= 4
    assert job["result"]["finish_reason"] == "length"
    assert events[-1]["usage"] == job["usage"]
    timings = job["timings"]
    assert 0 < timings["ttft_s"] <= timings["total_s"] and timings["tokens_per_s"] > 1
    assert job["worker"].startswith("chat-cpu-") and job["attempts"] == 1


def test_the_stream_in_redis_is_the_same_as_over_sse(stack):
    job_id = stack.submit({"kind": "generate", "prompt": "The sea is", "max_tokens": 8})
    sse = stack.events(job_id)
    raw = stack.redis.xrange(stack.keys.events(job_id))
    assert [entry_id.decode() for entry_id, _ in raw] == [f"{e['seq']}-1" for e in sse]
    assert [json.loads(fields[b"event"]) for _, fields in raw] == sse
    assert 0 < stack.redis.ttl(stack.keys.events(job_id)) <= 86_400


def test_a_late_joiner_with_last_event_id_gets_exactly_the_rest(stack):
    job_id = stack.submit({"kind": "generate", "prompt": "A list of fruits:", "max_tokens": 48,
                           "temperature": 0})
    first = stack.events(job_id, stop_after_seq=6)
    assert first[-1]["seq"] == 6
    rest = stack.events(job_id, **{"Last-Event-ID": "6"})
    assert rest[0]["seq"] == 7
    assert_contiguous(first + rest)
    assert tokens_of(first + rest) == stack.wait_final(job_id)["result"]["text"]
    replay = stack.events(job_id)  # after the end: the whole stream again, then close
    assert replay == first + rest
    after = stack.http.get(f"/v1/jobs/{job_id}/events?after={rest[-2]['seq']}").text
    assert after.count("data: ") == 1 and "event: done" in after


def test_a_raw_pubsub_subscriber_sees_the_same_events(stack):
    pubsub = stack.redis.pubsub()
    pubsub.psubscribe(stack.keys.channel_pattern())
    pubsub.get_message(timeout=1)  # the psubscribe confirmation
    job_id = stack.submit({"kind": "generate", "prompt": "Dear diary,", "max_tokens": 16})
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=1)
        if message and message["channel"].decode() == stack.keys.channel(job_id):
            seen.append(json.loads(message["data"]))
            if seen[-1]["type"] in FINAL:
                break
    pubsub.close()
    assert seen == stack.events(job_id)
    assert tokens_of(seen) == stack.job(job_id)["result"]["text"]


def test_temperature_zero_with_a_seed_gives_the_same_text_twice(stack):
    body = {"kind": "generate", "prompt": "The capital of France is", "max_tokens": 16,
            "temperature": 0, "seed": 11}
    first, second = (stack.wait_final(stack.submit(body)) for _ in range(2))
    assert first["result"]["text"] == second["result"]["text"] != ""


def test_chat_messages_go_through_the_gemma_chat_format(stack):
    job_id = stack.submit({"kind": "generate", "model": "chat", "max_tokens": 16, "temperature": 0,
                           "messages": [{"role": "system", "content": "Answer briefly."},
                                        {"role": "user", "content": "What colour is the sky?"}]})
    job = stack.wait_final(job_id)
    assert job["status"] == "succeeded"
    assert "<end_of_turn>" not in job["result"]["text"]
    assert job["usage"]["prompt_tokens"] > 10  # template + both messages


def test_embeddings_have_384_dims_unit_length_and_sensible_similarity(stack):
    texts = ["A man is playing a guitar.", "Someone strums a guitar.",
             "The stock market fell sharply today."]
    job = stack.wait_final(stack.submit({"kind": "embed", "texts": texts, "normalize": True}))
    assert job["status"] == "succeeded", job["error"]
    vectors = job["result"]["embeddings"]
    assert job["result"]["dimensions"] == 384
    assert len(vectors) == 3 and all(len(v) == 384 for v in vectors)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4 for v in vectors)

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2]) + 0.3
    assert job["usage"]["prompt_tokens"] > 10


LONG_TEXT = " ".join(
    f"Day {i}: the team met to review the migration of the billing service. They found "
    f"{i % 7 + 1} failing checks, fixed the database index, and agreed to ship on Friday."
    for i in range(1, 40)
)


def test_a_long_text_is_summarised_by_map_reduce_and_events_name_the_stages(stack):
    job_id = stack.submit({"kind": "summarize", "text": LONG_TEXT, "max_tokens": 40,
                           "instructions": "one sentence", "temperature": 0})
    events = stack.events(job_id)
    assert_contiguous(events)
    stages = [(e["stage"], e.get("part"), e.get("parts")) for e in events if e["type"] == "stage"]
    parts = stages[0][2]
    assert parts >= 2
    assert stages[:parts] == [("map", i, parts) for i in range(1, parts + 1)]
    assert stages[-1][0] == "reduce"
    job = stack.job(job_id)
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["parts"] == parts
    assert tokens_of(events) == job["result"]["summary"] != ""
    last_stage = max(i for i, e in enumerate(events) if e["type"] == "stage")
    assert all(e["type"] != "token" for e in events[:last_stage])


def test_a_short_text_is_summarised_in_one_stage(stack):
    job = stack.wait_final(stack.submit({"kind": "summarize", "text": "Cats sleep a lot. "
                                         "They like warm places.", "max_tokens": 24}))
    assert job["status"] == "succeeded" and job["result"]["parts"] == 1


def test_a_job_that_fails_in_the_worker_ends_failed_with_a_reason_and_an_error_event(stack):
    # max_tokens is under the cap but leaves a 512-token context no room for any text.
    job_id = stack.submit({"kind": "summarize", "text": "short", "max_tokens": 480})
    events = stack.events(job_id)
    assert_contiguous(events)
    assert events[-1]["type"] == "error"
    job = stack.job(job_id)
    assert job["status"] == "failed"
    assert job["error"] == events[-1]["error"]
    assert "no room" in job["error"]["message"]
    # The worker is free for the next job.
    assert stack.wait_final(stack.submit({"kind": "summarize", "text": "A b c.",
                                          "max_tokens": 8}))["status"] == "succeeded"


def test_a_running_generation_is_cancelled_within_a_token(stack):
    job_id = stack.submit({"kind": "generate", "prompt": "Count: 1, 2, 3,", "max_tokens": 256})
    first = stack.events(job_id, stop_after_seq=4)
    reply = stack.http.delete(f"/v1/jobs/{job_id}")
    assert reply.status_code == 202 and reply.json()["cancelled"] is True
    events = first + stack.events(job_id, **{"Last-Event-ID": "4"})
    assert_contiguous(events)
    assert events[-1]["type"] == "cancelled"
    job = stack.wait_final(job_id)
    assert job["status"] == "cancelled" and job["result"] is None
    assert sum(e["type"] == "token" for e in events) < 64
    again = stack.http.delete(f"/v1/jobs/{job_id}")
    assert again.status_code == 200 and again.json()["cancelled"] is False
    assert "already cancelled" in again.json()["detail"]


def test_a_queued_job_that_is_cancelled_never_runs(stack):
    # Fill every batch slot of the chat worker (max_batch 8), so the next job waits in queue.
    blockers = [stack.submit({"kind": "generate", "prompt": f"Long story {i}:",
                              "max_tokens": 96}) for i in range(8)]
    for blocker in blockers:
        stack.events(blocker, stop_after_seq=2)
    queued = stack.submit({"kind": "generate", "prompt": "Never", "max_tokens": 8})
    reply = stack.http.delete(f"/v1/jobs/{queued}")
    assert reply.status_code == 200 and reply.json()["status"] == "cancelled"
    for blocker in blockers:
        stack.wait_final(blocker)
    after = stack.submit({"kind": "generate", "prompt": "After", "max_tokens": 4})
    stack.wait_final(after)  # the chat queue has drained past the cancelled job
    assert [e["type"] for e in stack.events(queued)] == ["queued", "cancelled"]
    job = stack.job(queued)
    assert job["status"] == "cancelled" and job["attempts"] == 0 and job["started_at"] is None


def test_an_idempotency_key_returns_the_same_job_even_under_concurrent_retries(stack):
    body = {"kind": "embed", "texts": ["same"]}
    ids, errors = [], []

    def post() -> None:
        reply = stack.http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-123"})
        (ids if reply.status_code == 202 else errors).append(reply.json().get("id"))

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(ids)) == 1
    other = stack.http.post("/v1/jobs", json={**body, "texts": ["other"]},
                            headers={"Idempotency-Key": "k-123"})
    assert other.status_code == 409 and other.json()["error"]["field"] == "Idempotency-Key"
    assert stack.wait_final(ids[0])["status"] == "succeeded"


def test_health_ready_and_models_report_the_live_fleet(stack):
    assert stack.http.get("/health").json() == {"status": "ok"}
    ready = stack.http.get("/ready")
    assert ready.status_code == 200 and ready.json()["missing_workers"] == []
    models = {m["id"]: m for m in stack.http.get("/v1/models").json()["data"]}
    assert set(models) == {"chat", "summary", "embed", "fast"}
    assert models["embed"]["kind"] == "embedding" and models["chat"]["n_ctx"] == 1024
    assert all(m["workers"] and m["workers"][0]["gpu"] == "cpu" for m in models.values())


def test_a_redelivered_message_of_a_running_job_leaves_it_running(stack, redis_server):
    """Celery redelivers a message after visibility_timeout_s; if it reaches the very worker
    running the job, the start script refuses it and the job must carry on, attempt 1."""
    from broker.celery_app import make_celery, send_job
    from broker.settings import Settings
    from tests.conftest import PREFIX

    job_id = stack.submit({"kind": "generate", "prompt": "List every month of the year:",
                           "max_tokens": 200, "temperature": 0})
    stack.events(job_id, stop_after_seq=4)  # running, a few tokens out
    app = make_celery(Settings(key_prefix=PREFIX), redis_server.url)
    for _ in range(3):
        send_job(app, stack.keys, job_id, "generate", "chat", 5, dispatch=1)
    final = stack.wait_final(job_id)
    assert final["status"] == "succeeded" and final["attempts"] == 1
    assert "requeued" not in [e["type"] for e in stack.stream(job_id)]
