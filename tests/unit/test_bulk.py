"""Which jobs of a batch POST share one Celery message."""

from __future__ import annotations

from broker.celery_app import bulk_groups
from broker.messages import JOB_REQUEST
from broker.settings import Settings

SETTINGS = Settings(models={"embed": {"max_batch": 2}})


def job(**body):
    return JOB_REQUEST.validate_python(body)


def test_embed_jobs_of_one_model_and_priority_share_messages_up_to_max_batch():
    jobs = [job(kind="embed", texts=["a"]), job(kind="generate", prompt="x"),
            job(kind="embed", texts=["b"]), job(kind="embed", texts=["c"], priority=9),
            job(kind="embed", texts=["d"])]
    ids = [f"{i:032x}" for i in range(len(jobs))]
    groups = [[ids.index(job_id) for job_id, _ in group]
              for group in bulk_groups(ids, jobs, SETTINGS)]
    assert groups == [[0, 2], [1], [3], [4]]
    assert sorted(i for group in groups for i in group) == list(range(len(jobs)))
