"""Batch runs on real workers: submit (JSON and JSONL), progress, results in both orders,
events, a failing item and its retry, cancel, and results equal to running each item alone."""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import pytest

from tests.conftest import Stack, wait_ready

NOTES = [
    "Alice: the launch moves to Friday. Bob: then QA needs the build by Wednesday.",
    "Carol: the cafeteria will close early on Thursday for cleaning.",
    "Dan: the new printer on floor two needs a driver update before use.",
]


def wait_batch(stack: Stack, batch_id: str, timeout_s: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        batch = stack.http.get(f"/v1/batches/{batch_id}").json()
        if batch["status"] in ("completed", "cancelled"):
            return dict(batch)
        assert time.monotonic() < deadline, f"batch not done: {batch}"
        time.sleep(0.3)


def results(stack: Stack, batch_id: str, **params: str) -> list[dict[str, Any]]:
    reply = stack.http.get(f"/v1/batches/{batch_id}/results", params=params, timeout=180)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in reply.text.splitlines()]


def test_a_summary_batch_gives_every_item_the_text_it_gets_alone(stack: Stack) -> None:
    body = {"kind": "summarize", "model": "chat",
            "options": {"max_tokens": 12, "temperature": 0, "instructions": "one line"},
            "items": [{"id": f"note-{i}", "text": text} for i, text in enumerate(NOTES)]}
    reply = stack.http.post("/v1/batches", json=body)
    assert reply.status_code == 202, reply.text
    batch_id = reply.json()["id"]
    assert reply.json()["total"] == 3
    in_order = results(stack, batch_id)  # waits for every item, in submission order
    assert [line["id"] for line in in_order] == ["note-0", "note-1", "note-2"]
    assert all(line["status"] == "succeeded" and line["result"]["summary"] for line in in_order)
    batch = wait_batch(stack, batch_id)
    assert batch["counts"] == {"queued": 0, "running": 0, "succeeded": 3, "failed": 0,
                               "cancelled": 0}
    assert batch["tokens"] == sum(line["usage"]["completion_tokens"] for line in in_order)
    job = stack.job(in_order[0]["job"])
    assert job["kind"] == "summarize"  # an ordinary job, in /v1/jobs
    assert stack.redis.hget(stack.keys.job(in_order[0]["job"]), "request") and \
        json.loads(stack.redis.hget(stack.keys.job(in_order[0]["job"]), "request"))[
            "priority"] == 2
    for line, text in zip(in_order, NOTES, strict=True):
        alone = stack.submit({"kind": "summarize", "model": "chat", "text": text,
                              "max_tokens": 12, "temperature": 0, "instructions": "one line"})
        assert stack.wait_final(alone)["result"]["summary"] == line["result"]["summary"]
    by_completion = results(stack, batch_id, order="completion")
    assert sorted(line["id"] for line in by_completion) == ["note-0", "note-1", "note-2"]


def test_a_jsonl_upload_of_embeddings_and_its_progress_events(stack: Stack) -> None:
    lines = "\n".join(json.dumps({"id": f"t{i}", "text": f"sentence number {i}"})
                      for i in range(20))
    reply = stack.http.post("/v1/batches?kind=embed&model=embed", content=lines,
                            headers={"Content-Type": "application/x-ndjson"})
    assert reply.status_code == 202, reply.text
    batch_id = reply.json()["id"]
    events = []
    with stack.http.stream("GET", f"/v1/batches/{batch_id}/events", timeout=120) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert events[-1]["status"] == "completed" and events[-1]["counts"]["succeeded"] == 20
    done = [e["counts"]["succeeded"] for e in events]
    assert done == sorted(done)
    lines_out = results(stack, batch_id)
    assert [line["id"] for line in lines_out] == [f"t{i}" for i in range(20)]
    assert all(len(line["result"]["embeddings"][0]) == 384 for line in lines_out)


def test_a_failing_item_is_reported_and_retry_requeues_only_it(stack: Stack) -> None:
    long_text = " ".join(f"Point {i}: the committee discussed budget line {i} at length."
                         for i in range(120))
    body = {"kind": "summarize", "model": "chat", "options": {"max_tokens": 8,
                                                               "timeout_s": 2.0},
            "items": [{"id": "short", "text": NOTES[0]}, {"id": "long", "text": long_text}]}
    batch_id = stack.http.post("/v1/batches", json=body).json()["id"]
    first = {line["id"]: line for line in results(stack, batch_id)}
    assert first["short"]["status"] == "succeeded"
    assert first["long"]["status"] == "failed" and first["long"]["error"]["type"] == "timeout"
    assert wait_batch(stack, batch_id)["counts"]["failed"] == 1
    retry = stack.http.post(f"/v1/batches/{batch_id}/retry",
                            json={"options": {"timeout_s": 300}})
    assert retry.status_code == 202 and retry.json()["retried"] == 1
    second = {line["id"]: line for line in results(stack, batch_id)}
    assert second["short"]["job"] == first["short"]["job"]  # untouched
    assert second["long"]["job"] != first["long"]["job"]
    assert second["long"]["status"] == "succeeded" and second["long"]["result"]["summary"]
    batch = wait_batch(stack, batch_id)
    assert batch["counts"]["succeeded"] == 2 and batch["counts"]["failed"] == 0
    assert stack.http.post(f"/v1/batches/{batch_id}/retry").json()["retried"] == 0


def test_cancel_stops_what_has_not_finished(stack: Stack) -> None:
    items = [{"id": str(i), "text": f"{NOTES[i % 3]} ({i})"} for i in range(12)]
    batch_id = stack.http.post("/v1/batches", json={
        "kind": "summarize", "options": {"max_tokens": 40}, "items": items}).json()["id"]
    reply = stack.http.delete(f"/v1/batches/{batch_id}")
    assert reply.status_code == 200 and sum(reply.json()["cancelled"].values()) == 12
    batch = wait_batch(stack, batch_id)
    assert batch["status"] == "cancelled" and batch["counts"]["cancelled"] >= 8
    lines = results(stack, batch_id)
    assert len(lines) == 12 and {line["status"] for line in lines} <= {"cancelled", "succeeded"}


@pytest.mark.parametrize(("body", "status", "field"), [
    ({"kind": "translate", "items": [{"id": "a", "text": "x"}]}, 422, "kind"),
    ({"kind": "summarize", "items": []}, 422, "items"),
    ({"kind": "summarize", "items": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]},
     422, "items[1].id"),
    ({"kind": "summarize", "items": [{"id": "a", "text": "ok"}, {"id": "b", "text": ""}]},
     422, "items[1].text"),
    ({"kind": "embed", "items": [{"id": "a", "text": "x" * 600}]}, 413, "items[0].text"),
    ({"kind": "summarize", "model": "embed", "items": [{"id": "a", "text": "x"}]}, 400,
     "items[0].model"),
    ({"kind": "summarize", "options": {"max_tokens": 10**6}, "items": [{"id": "a",
                                                                         "text": "x"}]},
     422, "items[0].max_tokens"),
])
def test_a_bad_batch_is_refused_whole_naming_the_item(
    stack: Stack, body: dict[str, Any], status: int, field: str
) -> None:
    before = stack.redis.zcard(stack.keys.batches())
    reply = stack.http.post("/v1/batches", json=body)
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["field"] == field
    assert stack.redis.zcard(stack.keys.batches()) == before


def test_unknown_batches_are_404(stack: Stack) -> None:
    for path in ("", "/results", "/events"):
        assert stack.http.get(f"/v1/batches/{'0' * 32}{path}").status_code == 404
    assert stack.http.delete(f"/v1/batches/{'0' * 32}").status_code == 404


def test_a_batch_survives_an_api_and_a_worker_restart(stack: Stack) -> None:
    items = [{"id": f"r{i}", "text": f"{NOTES[i % 3]} Round {i}."} for i in range(6)]
    batch_id = stack.http.post("/v1/batches", json={
        "kind": "summarize", "options": {"max_tokens": 120}, "items": items}).json()["id"]
    # Kill once every item has started: a message in the instant between Celery's BRPOP and
    # its unacked record would be lost with the worker (README, "Not promised").
    deadline = time.monotonic() + 60
    while stack.http.get(f"/v1/batches/{batch_id}").json()["counts"]["queued"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    by_name = {child.name: child for child in stack.supervisor.children}
    by_name["api"].signal(signal.SIGKILL)
    by_name["worker-summary"].signal(signal.SIGKILL)
    time.sleep(0.5)
    assert set(stack.supervisor.restart_dead()) == {"api", "worker-summary"}
    wait_ready(stack.http, stack.supervisor)
    batch = wait_batch(stack, batch_id, timeout_s=90)  # the running ones are requeued
    assert batch["counts"]["succeeded"] == 6, batch
    lines = results(stack, batch_id)
    assert [line["id"] for line in lines] == [f"r{i}" for i in range(6)]
    assert all(line["result"]["summary"] for line in lines)


@pytest.mark.slow
def test_a_ten_thousand_item_batch_is_taken_in_chunks_and_all_of_it_runs(stack: Stack) -> None:
    lines = "\n".join(json.dumps({"id": f"doc-{i}", "text": f"short text {i}"})
                      for i in range(10_000))
    started = time.monotonic()
    reply = stack.http.post("/v1/batches?kind=embed", content=lines, timeout=120,
                            headers={"Content-Type": "application/x-ndjson"})
    took = time.monotonic() - started
    assert reply.status_code == 202, reply.text
    batch_id = reply.json()["id"]
    assert stack.redis.hlen(stack.keys.batch(batch_id)) < 30  # counters, not per-item state
    assert stack.redis.llen(stack.keys.batch_items(batch_id)) == 10_000
    assert max(len(e) for e in stack.redis.lrange(stack.keys.batch_items(batch_id), 0, -1)) \
        < 100  # small entries, no big value
    batch = wait_batch(stack, batch_id, timeout_s=600)
    assert batch["counts"]["succeeded"] == 10_000, batch
    out = results(stack, batch_id, order="completion")
    assert len(out) == 10_000 and len({line["id"] for line in out}) == 10_000
    print(f"10,000 items accepted in {took:.1f}s")
