"""The job store's scripts on a real redis-server: fencing, idempotent retries, requeue."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

import pytest
import redis
import redis.asyncio as aioredis

from broker.keys import Keys
from broker.messages import TokenEvent
from broker.settings import Settings
from broker.store import AsyncJobStore, JobStore

SETTINGS = Settings(key_prefix="tpstore", max_attempts=2)
KEYS = Keys("tpstore")


@pytest.fixture
def store(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    yield JobStore(client, SETTINGS)
    client.close()


def create(url, **fields):
    async def go():
        client = aioredis.Redis.from_url(url)
        try:
            job_id = uuid.uuid4().hex
            record = {"kind": "generate", "model": "chat", "request": {"priority": 5},
                      "timeout_s": "60.0", **fields}
            await AsyncJobStore(client, SETTINGS).create(job_id, record)
            return job_id
        finally:
            await client.aclose()
    return asyncio.run(go())


def events(store, job_id):
    return [json.loads(f[b"event"]) for _, f in store.redis.xrange(KEYS.events(job_id))]


def test_a_retried_append_whose_reply_was_lost_writes_nothing_twice(store, redis_server):
    job_id = create(redis_server.url)
    started = store.start(job_id, "w1", 1, "t1")
    assert started.attempt == 1 and started.next_seq == 2
    first = store.append(job_id, TokenEvent(job=job_id, text="a"), 1, 2)
    again = store.append(job_id, TokenEvent(job=job_id, text="a"), 1, 2)  # the retry
    assert first.seq == again.seq == 2 and not again.refused
    assert [e["seq"] for e in events(store, job_id)] == [0, 1, 2]


def test_a_retried_start_gets_the_same_attempt_and_a_stale_delivery_none(store, redis_server):
    job_id = create(redis_server.url)
    assert store.start(job_id, "w1", 1, "t1").attempt == 1
    assert store.start(job_id, "w1", 1, "t1").attempt == 1  # same token: a retry
    assert store.start(job_id, "w2", 1, "t2") is None  # a redelivery while it runs
    assert store.start(job_id, "w2", 2, "t3") is None  # a dispatch that was never made
    assert [e["type"] for e in events(store, job_id)] == ["queued", "started"]


def test_a_requeued_job_refuses_the_old_attempt_and_takes_only_the_new_dispatch(store,
                                                                               redis_server):
    job_id = create(redis_server.url)
    store.start(job_id, "w1", 1, "t1")
    store.append(job_id, TokenEvent(job=job_id, text="Hello"), 1, 2)
    assert store.running()[job_id] == "w1"
    assert store.requeue(job_id, "w1", 1, 2, "worker w1 stopped sending heartbeats") == (
        "requeued", 2)
    assert job_id not in store.running()
    assert store.append(job_id, TokenEvent(job=job_id, text="late"), 1, 3).refused
    assert store.start(job_id, "w1", 1, "t4") is None  # the old message, redelivered
    second = store.start(job_id, "w2", 2, "t5")
    assert second.attempt == 2
    assert store.published_text(job_id) == "Hello"
    assert store.finish(job_id, TokenEvent(job=job_id, text="x"), "succeeded", 1).seq == -1
    kinds = [(e["type"], e.get("attempt")) for e in events(store, job_id)]
    assert kinds == [("queued", None), ("started", 1), ("token", None), ("requeued", 1),
                     ("started", 2)]


def test_the_last_allowed_attempt_lost_ends_the_job_failed_and_dead_lettered(store,
                                                                            redis_server):
    job_id = create(redis_server.url)
    store.start(job_id, "w1", 1, "t1")
    store.requeue(job_id, "w1", 1, 2, "lost")
    store.start(job_id, "w2", 2, "t2")
    assert store.requeue(job_id, "w2", 2, 2, "lost again") == ("dead", 0)
    record = store.get(job_id)
    assert record["status"] == "failed" and record["error"]["type"] == "worker_lost"
    assert store.redis.zscore(KEYS.dead_letters(), job_id) is not None
    assert events(store, job_id)[-1]["type"] == "error"
    assert store.requeue(job_id, "w2", 2, 2, "twice") == ("skip", 0)


def test_appends_from_many_threads_share_round_trips_and_each_job_keeps_its_order(
        store, redis_server):
    """Eight threads, as a batch engine's task threads, append 40 tokens each at once: every
    stream holds its own tokens in order with contiguous seqs, in fewer round trips than calls."""
    jobs = [create(redis_server.url) for _ in range(8)]
    starts = {job_id: store.start(job_id, "w1", 1, f"t{job_id}") for job_id in jobs}
    go = threading.Barrier(len(jobs))
    refused = []

    def write(job_id):
        seq = starts[job_id].next_seq
        go.wait()
        for i in range(40):
            appended = store.append(job_id, TokenEvent(job=job_id, text=f" {job_id[:4]}{i}"),
                                    1, seq)
            refused.append(appended.refused)
            seq = appended.seq + 1

    before = store.appends.round_trips, store.appends.calls
    threads = [threading.Thread(target=write, args=(job_id,)) for job_id in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    round_trips = store.appends.round_trips - before[0]
    assert store.appends.calls - before[1] == 320 and round_trips < 320
    assert not any(refused)
    for job_id in jobs:
        stored = events(store, job_id)
        assert [e["seq"] for e in stored] == list(range(len(stored)))
        assert [e["text"] for e in stored if e["type"] == "token"] == \
            [f" {job_id[:4]}{i}" for i in range(40)]


def test_a_shared_round_trip_keeps_each_calls_own_answer(store, redis_server):
    """In one pipeline a stale attempt's append is refused, a cancelled job's written and told
    of the cancel, a live one's written, each told its own outcome; after a SCRIPT FLUSH (a
    restarted Redis) the pipeline loads the script."""
    live, stale, cancelled = (create(redis_server.url) for _ in range(3))
    calls = [(job_id, store.start(job_id, "w1", 1, f"t{job_id}").next_seq, attempt)
             for job_id, attempt in ((live, 1), (stale, 7), (cancelled, 1))]
    store.cancel_many([cancelled])
    store.redis.script_flush()
    answers = {}

    def write(job_id, seq, attempt):
        answers[job_id] = store.append(job_id, TokenEvent(job=job_id, text="x"), attempt, seq)

    group = store.appends
    with group._cond:
        group._busy = True  # as if a round trip were under way: the three calls queue up
    threads = [threading.Thread(target=write, args=call) for call in calls]
    for thread in threads:
        thread.start()
    while len(group._queue) < len(calls):
        time.sleep(0.01)
    round_trips = group.round_trips
    with group._cond:
        group._busy = False
        group._cond.notify_all()
    for thread in threads:
        thread.join()
    assert group.round_trips == round_trips + 1
    assert not answers[live].refused and not answers[live].cancel_requested
    assert answers[live].seq == calls[0][1]
    assert answers[stale].refused
    assert answers[cancelled].cancel_requested and not answers[cancelled].refused
    assert [e["type"] for e in events(store, live)][-1] == "token"
    assert [e["type"] for e in events(store, stale)][-1] == "started"


def started_jobs(store, url, n):
    jobs = [create(url) for _ in range(n)]
    return [(job_id, store.start(job_id, "w1", 1, f"t{job_id}").next_seq) for job_id in jobs]


def test_a_sent_round_trip_is_read_by_the_next_wait_of_any_thread(store, redis_server):
    """`send` writes a step's appends and returns; Redis runs them meanwhile; the next wait,
    here in another thread, reads every answer of that round trip, each its own."""
    (live, seq), (cancelled, cseq) = started_jobs(store, redis_server.url, 2)
    store.cancel_many([cancelled])
    group = store.appends
    before = group.round_trips
    calls = [store.append_later(live, TokenEvent(job=live, text="a"), 1, seq),
             store.append_later(cancelled, TokenEvent(job=cancelled, text="b"), 1, cseq)]
    group.send()
    assert not any(call.done for call in calls) and group._inflight is not None
    deadline = time.time() + 5
    while [e["type"] for e in events(store, live)][-1] != "token":  # written before any read
        assert time.time() < deadline
        time.sleep(0.01)
    answers = {}
    reader = threading.Thread(target=lambda: answers.update(
        live=store.appended(calls[0]), cancelled=store.appended(calls[1])))
    reader.start()
    reader.join()
    assert group.round_trips == before + 1 and group._inflight is None
    assert answers["live"].seq == seq and not answers["live"].cancel_requested
    assert answers["cancelled"].cancel_requested and not answers["cancelled"].refused
    assert [e["text"] for e in events(store, live) if e["type"] == "token"] == ["a"]
    group.send()  # nothing queued: nothing sent
    assert group._inflight is None


def test_replies_lost_with_the_connection_are_got_by_sending_again_and_written_once(
        store, redis_server, monkeypatch):
    """The connection drops after the first of three replies: the other two calls go again
    through the client's retried path, and every stream holds its token once."""
    jobs = started_jobs(store, redis_server.url, 3)
    calls = [store.append_later(job_id, TokenEvent(job=job_id, text=f"t{i}"), 1, seq)
             for i, (job_id, seq) in enumerate(jobs)]
    before = store.appends.round_trips, store.appends.calls
    store.appends.send()
    connection = store.appends._inflight[1]
    read, reads = connection.read_response, []

    def first_then_reset(*args, **kwargs):
        reads.append(1)
        if len(reads) == 2:  # the connection, pooled again after, reads as usual
            raise redis.ConnectionError("reset")
        return read(*args, **kwargs)

    monkeypatch.setattr(connection, "read_response", first_then_reset)
    answers = [store.appended(call) for call in calls]
    assert len(reads) >= 2  # the reset happened: one reply read, two calls sent again
    assert (store.appends.round_trips, store.appends.calls) == (before[0] + 2, before[1] + 3)
    assert [a.seq for a in answers] == [seq for _, seq in jobs]
    assert not any(a.refused or a.gap for a in answers)
    for i, (job_id, seq) in enumerate(jobs):
        stored = events(store, job_id)
        assert [e["seq"] for e in stored] == list(range(seq + 1))
        assert [e["text"] for e in stored if e["type"] == "token"] == [f"t{i}"]


def test_a_send_that_cannot_reach_redis_leaves_the_calls_to_the_retried_path(
        store, redis_server, monkeypatch):
    (job_id, seq), = started_jobs(store, redis_server.url, 1)
    call = store.append_later(job_id, TokenEvent(job=job_id, text="x"), 1, seq)
    pool = store.redis.connection_pool
    monkeypatch.setattr(pool, "get_connection",
                        lambda *a, **k: (_ for _ in ()).throw(redis.ConnectionError("away")))
    store.appends.send()  # raises nothing: the engine thread goes on to its next decode
    monkeypatch.undo()
    assert store.appends._inflight == ([call], None)
    assert store.appended(call).seq == seq
    assert [e["text"] for e in events(store, job_id) if e["type"] == "token"] == ["x"]


def lose_last_writes(store, job_id, n):
    """What a Redis killed between two AOF fsyncs (or a promoted replica) comes back
    without: the stream's last `n` events, and the job's seq counter with them."""
    kept = store.redis.xrange(KEYS.events(job_id))[:-n]
    store.redis.delete(KEYS.events(job_id))  # XDEL would leave the stream's last id behind
    for entry_id, fields in kept:
        store.redis.xadd(KEYS.events(job_id), fields, id=entry_id)
    store.redis.hincrby(KEYS.job(job_id), "next_seq", -n)


def writer_for(store, job_id):
    from workers.writer import EventWriter

    started = store.start(job_id, "w1", 1, uuid.uuid4().hex)
    return EventWriter(store, job_id, started.attempt, started.next_seq, None, time.time(),
                       time.time())


def test_events_redis_lost_are_written_again_at_their_seq_and_the_text_stays_whole(
        store, redis_server):
    job_id = create(redis_server.url)
    out = writer_for(store, job_id)
    for piece in ("Once", " upon", " a", " time"):
        out.token(piece)
    lose_last_writes(store, job_id, 2)
    assert store.published_text(job_id) == "Once upon"
    out.token(",")
    out.token(" there")
    assert out.rewritten == 3  # " a", " time", and "," that found the gap
    seen = events(store, job_id)
    assert [e["seq"] for e in seen] == list(range(len(seen)))
    assert store.published_text(job_id) == "Once upon a time, there"


def test_a_final_event_after_lost_tokens_goes_after_them_written_again(store, redis_server):
    job_id = create(redis_server.url)
    out = writer_for(store, job_id)
    for piece in ("one", " two", " three"):
        out.token(piece)
    lose_last_writes(store, job_id, 2)
    out.succeed({"text": "one two three"}, {"completion_tokens": 3})
    seen = events(store, job_id)
    assert [e["type"] for e in seen] == ["queued", "started", "token", "token", "token", "done"]
    assert [e["seq"] for e in seen] == list(range(6))
    assert store.published_text(job_id) == "one two three"
    assert store.get(job_id)["status"] == "succeeded"


def test_an_attempt_whose_start_redis_lost_writes_nothing_more(store, redis_server):
    from workers.writer import JobGone

    job_id = create(redis_server.url)
    out = writer_for(store, job_id)
    out.token("lost")
    lose_last_writes(store, job_id, 2)  # the token and the `started` event
    store.redis.hset(KEYS.job(job_id), "attempts", 0)  # ... and the start script's own writes
    store.redis.hset(KEYS.job(job_id), "status", "queued")
    with pytest.raises(JobGone):
        out.token("more")
    assert [e["type"] for e in events(store, job_id)] == ["queued"]
