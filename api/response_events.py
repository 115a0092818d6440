"""The Responses API's objects and stream events, derived from a job's record and events.

A response is a generate job whose record carries a `response` field: what the request asked
(instructions, input items, the conversation before it, metadata, store, background). Its
events are a pure function of the job's own event stream, numbered from 0 while walking that
stream from its start: every reader, at any time, gets the same numbers, so `starting_after=N`
resumes exactly, and what the job stream guarantees (whole after a worker is killed, replayed
to late joiners) holds for the Responses stream too.

    job event            Responses events
    queued               response.created, response.queued
    started (first)      response.in_progress, response.output_item.added,
                         response.content_part.added
    token                response.output_text.delta
    done                 response.output_text.done, response.content_part.done,
                         response.output_item.done, response.completed (or .incomplete when
                         max_output_tokens cut it)
    error / cancelled    response.failed / response.cancelled
    anything else        nothing (a requeue or a second attempt's start is invisible)
"""

from __future__ import annotations

import re
from typing import Any

RESPONSE_PREFIX = "resp_"
RESPONSE_ID = re.compile(r"^resp_([0-9a-f]{32})$")
STATUS_OF_JOB = {"queued": "queued", "running": "in_progress", "succeeded": "completed",
                 "failed": "failed", "cancelled": "cancelled"}
FINAL_EVENT = {"done": "response.completed", "error": "response.failed",
               "cancelled": "response.cancelled"}


def response_id(job_id: str) -> str:
    return RESPONSE_PREFIX + job_id


def job_of(response: str) -> str | None:
    """The job id behind a response id (None: not one of ours)."""
    match = RESPONSE_ID.match(response)
    return match[1] if match else None


def item_id(job_id: str) -> str:
    return f"msg_{job_id}"


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(job_id: str, text: str | None, status: str) -> dict[str, Any]:
    """The one output item of a response: the assistant's message (no content yet: None)."""
    content = [] if text is None else [text_part(text)]
    return {"id": item_id(job_id), "type": "message", "status": status, "role": "assistant",
            "content": content}


def status_of(record: dict[str, Any]) -> str:
    status = STATUS_OF_JOB[record["status"]]
    reason = (record.get("result") or {}).get("finish_reason")
    return "incomplete" if status == "completed" and reason == "length" else status


def usage_of(record: dict[str, Any]) -> dict[str, Any] | None:
    usage = record.get("usage")
    if not usage:
        return None
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


def error_of(record: dict[str, Any]) -> dict[str, str] | None:
    if record["status"] != "failed":
        return None
    error = record.get("error") or {}
    return {"code": "server_error",
            "message": f"{error.get('type', 'failed')}: {error.get('message', 'the job failed')}"}


def response_object(record: dict[str, Any], text: str | None,
                    status: str | None = None) -> dict[str, Any]:
    """The response as OpenAI's `Response` object. `text`: its output so far (None: no output
    item yet); `status`: as of an earlier event (default: the record's own)."""
    meta, job_id = record["response"], record["id"]
    status = status or status_of(record)
    item_status = {"completed": "completed", "in_progress": "in_progress"}.get(status,
                                                                              "incomplete")
    final = status not in ("queued", "in_progress")
    return {
        "id": response_id(job_id), "object": "response",
        "created_at": int(record["created_at"]), "status": status,
        "background": meta["background"],
        "completed_at": int(record["finished_at"]) if final and record.get("finished_at")
        else None,
        "error": error_of(record) if final else None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete"
        else None,
        "instructions": meta["instructions"], "max_output_tokens": meta["max_output_tokens"],
        "metadata": meta["metadata"], "model": record["model"],
        "output": [] if text is None else [message_item(job_id, text, item_status)],
        "parallel_tool_calls": True, "previous_response_id": meta["previous_response_id"],
        "reasoning": None, "service_tier": "default", "store": meta["store"],
        "temperature": meta["temperature"], "text": meta["text"], "tool_choice": "auto",
        "tools": [], "top_p": meta["top_p"], "truncation": meta["truncation"],
        "usage": usage_of(record) if final else None, "user": None,
    }


class Derivation:
    """Walks one job's events in order and says which Responses events each one makes
    (without sequence numbers; the caller numbers them)."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record, self.job_id = record, record["id"]
        self.opened = False
        self.pieces: list[str] = []

    def _where(self) -> dict[str, Any]:
        return {"item_id": item_id(self.job_id), "output_index": 0, "content_index": 0}

    def _snapshot(self, type_: str, status: str, record: dict[str, Any] | None = None,
                  ) -> dict[str, Any]:
        text = "".join(self.pieces) if self.opened else None
        return {"type": type_, "response": response_object(record or self.record, text, status)}

    def _open(self) -> list[dict[str, Any]]:
        if self.opened:
            return []
        events = [self._snapshot("response.in_progress", "in_progress")]
        self.opened = True
        return [*events,
                {"type": "response.output_item.added", "output_index": 0,
                 "item": message_item(self.job_id, None, "in_progress")},
                {"type": "response.content_part.added", **self._where(), "part": text_part("")}]

    def feed(self, type_: str, data: dict[str, Any]) -> list[dict[str, Any]]:
        """The events a job's non-final event makes."""
        if type_ == "queued":
            return [self._snapshot("response.created", "queued"),
                    self._snapshot("response.queued", "queued")]
        if type_ == "started":
            return self._open()
        if type_ == "token":
            opening = self._open()
            self.pieces.append(data["text"])
            return [*opening, {"type": "response.output_text.delta", **self._where(),
                               "delta": data["text"], "logprobs": []}]
        return []

    def final(self, type_: str, record: dict[str, Any]) -> list[dict[str, Any]]:
        """The closing events, from the job's final event and its final record."""
        if type_ != "done":
            return [self._snapshot(FINAL_EVENT[type_], status_of(record), record)]
        opening = self._open()
        text = "".join(self.pieces)
        item = message_item(self.job_id, text, "completed")
        status = status_of(record)
        closing = "response.incomplete" if status == "incomplete" else FINAL_EVENT[type_]
        return [*opening,
                {"type": "response.output_text.done", **self._where(), "text": text,
                 "logprobs": []},
                {"type": "response.content_part.done", **self._where(), "part": text_part(text)},
                {"type": "response.output_item.done", "output_index": 0, "item": item},
                self._snapshot(closing, status, record)]
