"""What the invariant engine's prefill context buys: first tokens, in-process, on and off.

    python -m bench.prefill [--bursts 12] [--levels 1,8,16]

Two batch-invariant chat models in one process, one with `fast_prefill` and one without
(and, for the long prompt, the non-invariant engine as a reference). For each level N, bursts
of N greedy jobs with new prompts (`bench.batching`'s) go to both, alternating which goes
first; it prints the median over bursts of the worst time to first token, and the ratio. Then
one long prompt (~640 tokens), new each round, time to its first token. No API, Redis or
Celery: this is the engine's prompt path alone (`bench.batching` measures it through the stack).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from bench.batching import fresh_prompts
from broker.settings import Settings
from broker.sources import resolve
from workers.engine import Sampling
from workers.llama_model import LlamaModel

N_CTX = 2048
MAX_BATCH = 16


class FirstToken:
    """A sink that notes when its first piece came."""

    def __init__(self, start: float) -> None:
        self.start, self.first = start, 0.0

    def feed(self, piece: bytes, logprob: object = None) -> bool:
        self.first = self.first or time.perf_counter() - self.start
        return True

    def flush(self) -> bool:
        return True


def worst_first_token(model: LlamaModel, prompts: list[str], max_tokens: int = 1) -> float:
    start = time.perf_counter()
    sinks = [FirstToken(start) for _ in prompts]
    threads = [threading.Thread(target=model.generate, args=(
        model.tokenize(prompt, special=False), Sampling(max_tokens=max_tokens, temperature=0),
        sink)) for prompt, sink in zip(prompts, sinks, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return max(sink.first for sink in sinks)


def long_prompt(round_: int) -> str:
    return f"Document {round_}. " + " ".join(
        f"Rule {i}: answer briefly and kindly, in plain words, case {round_}." for i in range(36))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bursts", type=int, default=12)
    parser.add_argument("--levels", default="1,8,16")
    args = parser.parse_args()
    settings = Settings()
    gguf = resolve(settings.models["chat"].source, settings.cache_dir)
    models = {name: LlamaModel(gguf, N_CTX, 0, None, MAX_BATCH, 128, invariant=invariant,
                               prefill=prefill)
              for name, invariant, prefill in [("prefill", True, True), ("no prefill", True, False),
                                               ("not invariant", False, False)]}
    try:
        pair = ["prefill", "no prefill"]
        print(f"worst time to first token, median of {args.bursts} bursts of new prompts "
              f"(batch_invariant, fast_prefill on vs off)")
        for n in [int(x) for x in args.levels.split(",")]:
            worst: dict[str, list[float]] = {name: [] for name in pair}
            for b in range(args.bursts):
                prompts = fresh_prompts(5000 + 100 * n + b)[:n]
                for name in pair if b % 2 else pair[::-1]:
                    worst[name].append(worst_first_token(models[name], prompts))
            on, off = (statistics.median(worst[name]) for name in pair)
            print(f"  N={n:<3} on {1000 * on:7.1f} ms   off {1000 * off:7.1f} ms   "
                  f"ratio {on / off:.3f}")
        rounds = max(2, args.bursts // 2)
        first: dict[str, list[float]] = {name: [] for name in models}
        for r in range(rounds):
            for name, model in models.items():
                first[name].append(worst_first_token(model, [long_prompt(r)]))
        tokens = len(models["prefill"].tokenize(long_prompt(0), special=False))
        medians = {name: statistics.median(v) for name, v in first.items()}
        print(f"one {tokens}-token prompt, time to first token, median of {rounds}: "
              + ", ".join(f"{name} {1000 * m:.0f} ms" for name, m in medians.items())
              + f"; prefill / no prefill {medians['prefill'] / medians['no prefill']:.3f}")
    finally:
        for model in models.values():
            model.close()


if __name__ == "__main__":
    main()
