"""Continuous batching on the real Gemma worker (max_batch 8) and embedding micro-batching."""

from __future__ import annotations

import itertools
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

FINAL = {"done", "error", "cancelled"}


def tokens_of(events):
    return "".join(e["text"] for e in events if e["type"] == "token")


def assert_clean(events, text):
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert sum(e["type"] in FINAL for e in events) == 1 and events[-1]["type"] in FINAL
    assert tokens_of(events) == text


def beat_of(stack, model):
    """The last heartbeat of the worker serving `model`."""
    names = [n.decode() for n in stack.redis.zrange(stack.keys.workers(), 0, -1)]
    beats = [json.loads(stack.redis.get(stack.keys.worker(n)) or "{}") for n in names]
    return next(b for b in beats if b.get("model") == model)


@pytest.mark.parametrize("model", ["chat", "fast"])  # batch-invariant, and not
def test_eight_jobs_decode_together_each_with_its_own_clean_stream(stack, model):
    bodies = [{"kind": "generate", "model": model, "prompt": f"Tale {i}: once upon a time",
               "max_tokens": 40, "temperature": 0.8, "seed": i, "stop": ["\n\n\n"]}
              for i in range(8)]
    steps_before = beat_of(stack, model)["batches"]
    ids = [stack.submit(body) for body in bodies]
    with ThreadPoolExecutor(8) as pool:
        streams = list(pool.map(stack.events, ids))
    jobs = [stack.job(job_id) for job_id in ids]
    for job, events in zip(jobs, streams, strict=True):
        assert job["status"] == "succeeded"
        assert_clean(events, job["result"]["text"])
    # They ran at once: every job started before the first one finished ...
    assert max(j["started_at"] for j in jobs) < min(j["finished_at"] for j in jobs)
    # ... and shared decode steps: far fewer steps than the tokens they sampled.
    sampled = sum(j["usage"]["completion_tokens"] for j in jobs)
    steps = beat_of(stack, model)["batches"] - steps_before
    assert steps < sampled * 0.6, (steps, sampled)


def test_cancelling_one_job_of_a_batch_leaves_the_others_whole(stack):
    ids = [stack.submit({"kind": "generate", "prompt": f"List {i}: 1, 2, 3,", "max_tokens": 64,
                         "temperature": 0.5, "seed": 1}) for i in range(4)]
    victim = ids[1]
    first = stack.events(victim, stop_after_seq=4)
    assert first[-1]["seq"] == 4
    assert stack.http.delete(f"/v1/jobs/{victim}").status_code in (200, 202)
    for job_id in ids:
        job = stack.wait_final(job_id)
        events = stack.events(job_id)
        if job_id == victim:
            assert job["status"] == "cancelled" and events[-1]["type"] == "cancelled"
            assert_clean(events, tokens_of(events))
        else:
            assert job["status"] == "succeeded"
            assert_clean(events, job["result"]["text"])


def test_a_short_job_finishes_while_long_ones_are_still_running(stack):
    longs = [stack.submit({"kind": "generate", "prompt": f"Essay {i}:", "max_tokens": 200,
                           "temperature": 0.8, "seed": i}) for i in range(3)]
    short = stack.wait_final(stack.submit({"kind": "generate", "prompt": "Hi", "max_tokens": 4}))
    finished = [stack.wait_final(job_id) for job_id in longs]
    assert short["status"] == "succeeded"
    long_enough = [j for j in finished if j["usage"]["completion_tokens"] >= 50]
    assert long_enough, "the long jobs ended early; nothing to compare"
    assert all(short["finished_at"] < j["finished_at"] for j in long_enough)


def test_concurrent_embed_jobs_share_encode_calls_and_each_gets_its_own_rows(stack):
    texts = [f"sentence number {i} about {'cats' if i % 2 else 'ships'}" for i in range(16)]
    alone = stack.wait_final(stack.submit({"kind": "embed", "texts": [texts[0]]}))
    before = beat_of(stack, "embed")["batches"]
    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(lambda t: stack.submit({"kind": "embed", "texts": [t]}), texts))
    jobs = [stack.wait_final(job_id) for job_id in ids]
    after = beat_of(stack, "embed")["batches"]
    assert all(j["status"] == "succeeded" for j in jobs)
    assert after - before < len(texts)  # some jobs were gathered into one encode
    first = jobs[0]["result"]["embeddings"][0]
    assert len(first) == 384
    assert math.dist(first, alone["result"]["embeddings"][0]) < 1e-4  # its own row, not another's
    others = [j["result"]["embeddings"][0] for j in jobs[1:]]
    assert all(math.dist(first, v) > 1e-3 for v in others)


def test_models_report_queue_depth_running_jobs_and_batch_size(stack):
    models = {m["id"]: m for m in stack.http.get("/v1/models").json()["data"]}
    assert models["chat"]["max_batch"] == 8
    assert models["chat"]["queue_depth"] == 0 and models["chat"]["running"] >= 0


def test_a_batch_post_queues_every_job_and_each_completes(stack):
    jobs = [{"kind": "embed", "texts": [f"batch text {i}"]} for i in range(20)]
    jobs.append({"kind": "generate", "prompt": "Batch:", "max_tokens": 4})
    reply = stack.http.post("/v1/jobs/batch", json={"jobs": jobs})
    assert reply.status_code == 202, reply.text
    ids = [item["id"] for item in reply.json()["data"]]
    assert len(set(ids)) == 21
    finished = [stack.wait_final(job_id) for job_id in ids]
    assert all(j["status"] == "succeeded" for j in finished)
    assert [j["kind"] for j in finished] == ["embed"] * 20 + ["generate"]
    assert all(len(j["result"]["embeddings"][0]) == 384 for j in finished[:20])


def test_greedy_text_is_the_same_alone_or_beside_seven_others(stack):
    subjects = ["fox", "cat", "ship", "king", "moon", "tree", "girl", "robot"]
    bodies = [{"kind": "generate", "max_tokens": 40, "temperature": 0,
               "prompt": f"Story {i}: once upon a time, a {w} and"}
              for i, w in enumerate(subjects)]
    alone = [stack.wait_final(stack.submit(body))["result"]["text"] for body in bodies]
    ids = [stack.submit(body) for body in bodies]
    together = [stack.wait_final(job_id) for job_id in ids]
    assert max(j["started_at"] for j in together) < min(j["finished_at"] for j in together)
    assert [j["result"]["text"] for j in together] == alone
    assert len(set(alone)) == 8  # eight different texts, not one repeated


def test_greedy_text_is_the_same_alone_or_among_jobs_that_come_and_go(stack):
    """Jobs join while others run and leave, some past 256 cached tokens (a shared ~400-token
    preamble, copied between KV streams), others short; each gets its text from alone."""
    preamble = " ".join(f"Rule {i}: answer briefly and kindly." for i in range(40))
    questions = ["Why is the sea salty?", "Name a red fruit.", "What is a star?",
                 "How do bees make honey?", "Why do cats purr?", "What is rain?"]
    bodies = [{"kind": "generate", "temperature": 0, "max_tokens": 12 + 10 * (i % 3),
               "prompt": (preamble + "\nQuestion: " if i % 2 == 0 else "Q: ") + q}
              for i, q in enumerate(questions)]
    alone = [stack.wait_final(stack.submit(body))["result"]["text"] for body in bodies]
    ids = []
    for body in bodies:
        ids.append(stack.submit(body))
        time.sleep(0.15)
    together = [stack.wait_final(job_id) for job_id in ids]
    assert all(j["status"] == "succeeded" for j in together)
    overlapping = sum(a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"]
                      for a, b in itertools.pairwise(together))
    assert overlapping >= 3  # they did come and go together
    assert [j["result"]["text"] for j in together] == alone
    assert any(j["usage"]["prompt_tokens"] > 256 for j in together)
