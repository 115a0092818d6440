"""A small HTTP client of the tokenpool API, for the CLI (and anyone scripting in Python)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx

from broker.messages import FINAL_TYPES

DEFAULT_URL = "http://127.0.0.1:8000"


class ApiFailure(Exception):
    """The API answered with an error body, or could not be reached at all."""

    def __init__(self, message: str, status: int | None = None,
                 body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.body = status, body


def error_message(reply: httpx.Response) -> str:
    try:
        error = reply.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {reply.status_code}: {reply.text[:200]}"
    field = f" [{error['field']}]" if error.get("field") else ""
    return f"{error.get('type', 'error')}{field}: {error.get('message', '')}"


class Client:
    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None,
                 timeout_s: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers,
                                 timeout=httpx.Timeout(timeout_s, read=None))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            reply = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiFailure(f"cannot reach the API at {self.url}: {exc}") from None
        if reply.status_code >= 400:
            body = reply.json() if "json" in reply.headers.get("content-type", "") else None
            raise ApiFailure(error_message(reply), reply.status_code, body)
        return reply.json()

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self.call("POST", "/v1/jobs", json=body))

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.call("GET", f"/v1/jobs/{job_id}"))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return dict(self.call("DELETE", f"/v1/jobs/{job_id}"))

    def models(self) -> list[dict[str, Any]]:
        return list(self.call("GET", "/v1/models")["data"])

    def workers(self) -> list[dict[str, Any]]:
        return list(self.call("GET", "/v1/workers")["data"])

    def events(self, job_id: str, after: int = -1, give_up_s: float = 60.0,
               ) -> Iterator[dict[str, Any]]:
        """The job's events after seq `after`, live, until the final one. A dropped connection
        (an API restart, a network blip) is resumed with Last-Event-ID, so every event comes
        exactly once; after `give_up_s` without reaching the API it raises ApiFailure."""
        last, down_since = after, None
        while True:
            try:
                for event in self._events_once(job_id, last):
                    down_since = None
                    last = event["seq"]
                    yield event
                    if event["type"] in FINAL_TYPES:
                        return
            except (httpx.TransportError, ApiUnavailable) as exc:
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > give_up_s:
                    raise ApiFailure(f"lost the API at {self.url} for {give_up_s:.0f}s: "
                                     f"{exc}") from None
                time.sleep(0.5)

    def _events_once(self, job_id: str, after: int) -> Iterator[dict[str, Any]]:
        headers = {"Last-Event-ID": str(after)} if after >= 0 else {}
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as reply:
            if reply.status_code >= 500:
                raise ApiUnavailable(f"HTTP {reply.status_code}")
            if reply.status_code >= 400:
                reply.read()
                raise ApiFailure(error_message(reply), reply.status_code)
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    yield json.loads(line[len("data: "):])
        raise ApiUnavailable("the event stream closed before the final event")

    def create_batch(self, params: dict[str, Any], lines: Iterator[bytes]) -> dict[str, Any]:
        """Upload items as JSONL (streamed, never held whole) with shared options as query."""
        return dict(self.call("POST", "/v1/batches", params=params, content=lines,
                              headers={"Content-Type": "application/x-ndjson"}))

    def batch(self, batch_id: str) -> dict[str, Any]:
        return dict(self.call("GET", f"/v1/batches/{batch_id}"))

    def batch_progress(self, batch_id: str, give_up_s: float = 60.0,
                       ) -> Iterator[dict[str, Any]]:
        """Progress reports until the batch is completed or cancelled; reconnects on drops."""
        down_since: float | None = None
        while True:
            try:
                with self.http.stream("GET", f"/v1/batches/{batch_id}/events") as reply:
                    if reply.status_code >= 400:
                        reply.read()
                        raise ApiFailure(error_message(reply), reply.status_code)
                    for line in reply.iter_lines():
                        if line.startswith("data: "):
                            down_since = None
                            report = json.loads(line[len("data: "):])
                            yield report
                            if report["status"] in ("completed", "cancelled"):
                                return
            except httpx.TransportError as exc:
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > give_up_s:
                    raise ApiFailure(f"lost the API at {self.url}: {exc}") from None
            time.sleep(0.5)

    def batch_results(self, batch_id: str, order: str = "submission",
                      ) -> Iterator[dict[str, Any]]:
        with self.http.stream("GET", f"/v1/batches/{batch_id}/results",
                              params={"order": order}) as reply:
            if reply.status_code >= 400:
                reply.read()
                raise ApiFailure(error_message(reply), reply.status_code)
            for line in reply.iter_lines():
                if line.strip():
                    yield json.loads(line)

    def wait(self, job_id: str) -> dict[str, Any]:
        """Follow until the job ends, then its record."""
        for _ in self.events(job_id):
            pass
        return self.job(job_id)


class ApiUnavailable(Exception):
    """A retryable failure while following: a 5xx, or a stream that ended too early."""
