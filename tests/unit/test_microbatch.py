"""Embedding micro-batching with a fake model: gathered calls, rows back to their callers."""

from __future__ import annotations

import threading

import pytest

from workers.microbatch import MicroBatcher


class FakeEmbedder:
    dimensions = 2

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail_on = fail_on

    def embed(self, texts, normalize):
        self.calls.append(list(texts))
        if self.fail_on in texts:
            raise ValueError("bad text")
        return [[float(len(t)), 1.0 if normalize else 0.0] for t in texts]

    def count_tokens(self, texts):
        return len(texts)

    def close(self):
        pass


def run_concurrently(batcher, jobs):
    results, errors = {}, {}
    start = threading.Barrier(len(jobs))

    def call(key, texts, normalize):
        start.wait()
        try:
            results[key] = batcher.embed(texts, normalize)
        except Exception as exc:
            errors[key] = exc

    threads = [threading.Thread(target=call, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    return results, errors


def test_concurrent_calls_share_encodes_and_each_gets_its_own_rows():
    model = FakeEmbedder()
    batcher = MicroBatcher(model, wait_s=0.05, max_texts=100)
    jobs = [(i, ["x" * (i + 1)] * (1 + i % 2), i % 3 != 0) for i in range(12)]
    results, errors = run_concurrently(batcher, jobs)
    assert not errors
    for key, texts, normalize in jobs:
        assert results[key] == [[float(len(t)), 1.0 if normalize else 0.0] for t in texts]
    assert batcher.batches < len(jobs)


def test_a_failed_encode_fails_only_the_calls_that_were_in_it():
    batcher = MicroBatcher(FakeEmbedder(fail_on="bad"), wait_s=0.0, max_texts=100)
    with pytest.raises(ValueError):
        batcher.embed(["bad"], True)
    assert batcher.embed(["good"], True) == [[4.0, 1.0]]
