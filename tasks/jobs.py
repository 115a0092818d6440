"""Celery tasks: thin adapters from a message (job id, model) to the worker's runtime."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Protocol

from celery import Celery
from celery.exceptions import Reject

from broker.celery_app import BULK_TASK_NAMES, TASK_NAMES

JOB_ID = re.compile(r"^[0-9a-f]{32}$")


class Runs(Protocol):
    def run(self, job_id: str, kind: str, dispatch: int) -> str: ...

    def run_many(self, job_ids: list[str], kind: str) -> list[str]: ...


def register(app: Celery, runtime: Runs) -> None:
    """Define one task per job kind; arguments are ids only (Flower shows them, not prompts):
    the job id, its model, and which dispatch of the job this message is."""
    for kind, name in TASK_NAMES.items():
        app.task(name=name, acks_late=True)(_adapter(kind, runtime))
        app.task(name=BULK_TASK_NAMES[kind], acks_late=True)(_bulk_adapter(kind, runtime))


def _adapter(kind: str, runtime: Runs) -> Callable[[str, str, int], dict[str, str]]:
    def run_job(job_id: str, model: str, dispatch: int = 1) -> dict[str, str]:
        if not isinstance(job_id, str) or not JOB_ID.match(job_id):
            raise Reject(f"malformed job id {job_id!r}", requeue=False)
        if not isinstance(dispatch, int) or dispatch < 1:
            raise Reject(f"malformed dispatch {dispatch!r}", requeue=False)
        status = runtime.run(job_id, kind, dispatch)
        if status == "rejected":  # draining for a swap, or the model was swapped out
            raise Reject(f"job {job_id} is not for this worker now", requeue=True)
        return {"job": job_id, "model": model, "status": status}

    run_job.__name__ = run_job.__qualname__ = f"run_{kind}"
    return run_job


def _bulk_adapter(kind: str, runtime: Runs) -> Callable[[list[str], str], dict[str, object]]:
    def run_jobs(job_ids: list[str], model: str) -> dict[str, object]:
        if not isinstance(job_ids, list) or not all(
            isinstance(j, str) and JOB_ID.match(j) for j in job_ids
        ):
            raise Reject("malformed job ids", requeue=False)
        statuses = runtime.run_many(job_ids, kind)
        return {"jobs": len(job_ids), "model": model, "statuses": statuses}

    run_jobs.__name__ = run_jobs.__qualname__ = f"run_{kind}_many"
    return run_jobs
