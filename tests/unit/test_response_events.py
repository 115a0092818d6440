"""The Responses events derived from a job's events: order, numbering, text, and the same
answer every time the job's stream is walked again."""

from __future__ import annotations

from typing import Any

from api.response_events import Derivation, job_of, response_id, response_object

JOB = "ab" * 16
META = {"instructions": None, "input": [], "history": [], "dropped_turns": 0,
        "previous_response_id": None, "metadata": {}, "store": True, "background": True,
        "max_output_tokens": 8, "temperature": None, "top_p": None,
        "text": {"format": {"type": "text"}}, "truncation": "auto"}


def record(status: str = "queued", **extra: Any) -> dict[str, Any]:
    return {"id": JOB, "model": "chat", "status": status, "created_at": 1.5e9,
            "finished_at": None, "response": META, **extra}


def derive(events: list[tuple[str, dict[str, Any]]], final: dict[str, Any],
           ) -> list[dict[str, Any]]:
    derivation, out = Derivation(record()), []
    for type_, data in events:
        if type_ in ("done", "error", "cancelled"):
            out += derivation.final(type_, final)
        else:
            out += derivation.feed(type_, data)
    return out


CRASHED = [("queued", {}), ("started", {"attempt": 1}), ("token", {"text": "Once"}),
           ("token", {"text": " upon"}), ("requeued", {"attempt": 1}),
           ("started", {"attempt": 2}), ("token", {"text": " a time"}), ("done", {})]
DONE = record("succeeded", finished_at=1.5e9 + 2, usage={"prompt_tokens": 5,
                                                         "completion_tokens": 3},
              result={"text": "Once upon a time", "finish_reason": "stop"})


def test_a_job_that_lost_its_worker_gives_one_clean_response_stream() -> None:
    events = derive(CRASHED, DONE)
    assert [e["type"] for e in events] == [
        "response.created", "response.queued", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert deltas == "Once upon a time" == events[8]["text"]
    completed = events[-1]["response"]
    assert completed["status"] == "completed" and completed["id"] == f"resp_{JOB}"
    assert completed["output"][0]["content"][0]["text"] == deltas
    assert completed["usage"]["input_tokens"] == 5 and completed["usage"]["total_tokens"] == 8
    assert events[0]["response"]["status"] == "queued" and events[0]["response"]["usage"] is None


def test_walking_the_job_again_gives_the_same_events_so_resume_is_exact() -> None:
    assert derive(CRASHED, DONE) == derive(CRASHED, DONE)


def test_a_job_cut_by_max_tokens_is_incomplete_naming_why() -> None:
    cut = {**DONE, "result": {"text": "Once upon a time", "finish_reason": "length"}}
    last = derive(CRASHED, cut)[-1]
    assert last["type"] == "response.incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_a_failed_or_cancelled_job_ends_with_its_own_event_and_reason() -> None:
    failed = record("failed", finished_at=1.6e9, error={"type": "timeout", "message": "slow"})
    events = derive([("queued", {}), ("started", {}), ("token", {"text": "x"}), ("error", {})],
                    failed)
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"] == {"code": "server_error",
                                               "message": "timeout: slow"}
    assert events[-1]["response"]["output"][0]["status"] == "incomplete"
    cancelled = derive([("queued", {}), ("cancelled", {})], record("cancelled"))
    assert [e["type"] for e in cancelled] == ["response.created", "response.queued",
                                              "response.cancelled"]
    assert cancelled[-1]["response"]["output"] == []


def test_response_ids_map_to_job_ids_and_nothing_else() -> None:
    assert job_of(response_id(JOB)) == JOB
    assert job_of("resp_xyz") is None and job_of(JOB) is None
    shown = response_object(record("running"), "so far")
    assert shown["status"] == "in_progress" and shown["output"][0]["status"] == "in_progress"
