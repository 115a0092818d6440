"""Sampling one token: llama.cpp's sampler over the whole vocabulary vs over the candidate
superset (workers/candidates.py), side by side on the same logits.

    python -m bench.sampling [--rows 8] [--repeats 200]

One llama.cpp context (the worker's `LlamaBackend`) decodes `--rows` prompts in one batch; then
each row is sampled with the chain `bench.batching` uses, alternately both ways, each time
with a fresh chain of the same seed so both must pick the same token. Prints µs per sampled
row for each and their ratio. A decode step of 8 rows takes about 50 ms on the 2-core reference
machine, and sampling happens between steps, on one core.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

from bench.batching import PROMPTS, SAMPLING
from broker.settings import Settings
from broker.sources import resolve
from workers.batching import Request
from workers.engine import Sampling
from workers.llama_model import LlamaBackend


class Unfed:
    """The sink of a request whose rows are sampled directly, never run by an engine."""

    def feed(self, piece: bytes, logprob: object = None) -> bool:
        raise AssertionError("sampled directly: nothing feeds this request")

    def flush(self) -> bool:
        raise AssertionError("sampled directly: nothing feeds this request")


def time_rows(backend: LlamaBackend, rows: list[int], seed: int, shortcut: bool) -> tuple[
        float, list[int]]:
    """µs per row, and the tokens picked, sampling every row once with fresh chains."""
    backend.shortcut = shortcut
    sampling = Sampling(max_tokens=1, seed=seed, **SAMPLING)
    requests = [Request(tokens=[], sampling=sampling, max_new=1, sink=Unfed()) for _ in rows]
    for request in requests:  # chains are made when a job is seated, not per token
        request.sampler = backend.sampler_for(request)
    started = time.perf_counter()
    tokens = [backend.sample(request, row) for request, row in zip(requests, rows, strict=True)]
    return 1e6 * (time.perf_counter() - started) / len(rows), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's load chatter
    settings = Settings()
    backend = LlamaBackend(resolve(settings.models["chat"].source, settings.cache_dir),
                           256, args.rows, 0, None, 512)
    try:
        entries = []
        for seq in range(args.rows):
            tokens = list(backend.model.tokenize(PROMPTS[seq].encode(), True, False))
            entries += [(t, i, seq, i == len(tokens) - 1) for i, t in enumerate(tokens)]
        backend.decode(entries)
        rows = [i for i, entry in enumerate(entries) if entry[3]]
        whole, fast = [], []
        for seed in range(args.repeats):
            us_whole, picked_whole = time_rows(backend, rows, seed, shortcut=False)
            us_fast, picked_fast = time_rows(backend, rows, seed, shortcut=True)
            assert picked_fast == picked_whole, f"seed {seed}: {picked_fast} != {picked_whole}"
            whole.append(us_whole)
            fast.append(us_fast)
    finally:
        backend.close()
    w, f = statistics.median(whole), statistics.median(fast)
    print(f"sampling {args.rows} rows x {args.repeats} seeds, vocabulary {backend.n_vocab}, "
          f"{SAMPLING} (medians, same tokens picked both ways)")
    print(f"whole vocabulary (llama_sampler_sample): {w:7.1f} µs per row")
    print(f"candidate superset:                      {f:7.1f} µs per row")
    print(f"ratio whole / superset: {w / f:.2f}x")


if __name__ == "__main__":
    main()
