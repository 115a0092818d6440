"""A Python service's way with tokenpool: submit a job, follow its tokens over SSE, and resume
by itself when the connection drops (an API restart, a proxy timeout), with nothing lost and
nothing twice: it asks again with `Last-Event-ID`, the seq of the last event it saw.

    python examples/follow_job.py "Once upon a time"     # TOKENPOOL_URL, default :8000

Only needs httpx. Tokens go to stdout as they come; the final status goes to stderr, and the
exit code says it (0 succeeded, 1 failed, 2 cancelled).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx

FINAL = {"done": 0, "error": 1, "cancelled": 2}


def events(http: httpx.Client, job_id: str, deadline_s: float = 300) -> Iterator[dict[str, Any]]:
    """Every event of the job once, in order, across as many connections as it takes."""
    last, deadline = -1, time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        headers = {"Last-Event-ID": str(last)} if last >= 0 else {}
        try:
            with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as reply:
                reply.raise_for_status()
                for line in reply.iter_lines():
                    if line.startswith("data: "):
                        event = json.loads(line.removeprefix("data: "))
                        last = event["seq"]
                        yield event
                        if event["type"] in FINAL:
                            return
        except httpx.HTTPError as exc:
            print(f"connection lost ({exc.__class__.__name__}); resuming after {last}",
                  file=sys.stderr)
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id}: no final event in {deadline_s}s")


def main() -> int:
    prompt = " ".join(sys.argv[1:]) or "Once upon a time"
    url = os.environ.get("TOKENPOOL_URL", "http://127.0.0.1:8000")
    with httpx.Client(base_url=url, timeout=httpx.Timeout(10, read=60)) as http:
        reply = http.post("/v1/jobs", json={"kind": "generate", "prompt": prompt,
                                            "max_tokens": 48})
        reply.raise_for_status()
        job_id = reply.json()["id"]
        print(f"job {job_id}", file=sys.stderr)
        for event in events(http, job_id):
            if event["type"] == "token":
                print(event["text"], end="", flush=True)
            elif event["type"] in FINAL:
                print(f"\n{event['type']}", file=sys.stderr)
                return FINAL[event["type"]]
    return 1


if __name__ == "__main__":
    sys.exit(main())
