"""Which batch shapes change a job's logits: the cause behind `batch_invariant`.

    python -m bench.invariance [--steps 12]

One llama.cpp context (the worker's `LlamaBackend`) decodes a greedy job alone, then the same
job again (forced to the same tokens) beside companion sequences that add rows to every decode
step. For each row count it prints the first step whose logits are not bit-identical to the
job's alone, with llama.cpp's CPU weight repacking on (the default) and off. A "none" at every
row count would mean the default engine needed no `batch_invariant` mode on this host.
"""

from __future__ import annotations

import argparse
import ctypes
import logging

import numpy as np

from broker.settings import Settings
from broker.sources import resolve
from workers.llama_model import LlamaBackend

PROMPT = "Question: why is the sky blue? Answer in detail.\nAnswer:"
COMPANION = "The history of the Roman empire " * 4
ROWS = (1, 2, 4, 8, 16)


class Probe:
    def __init__(self, backend: LlamaBackend) -> None:
        self.be = backend
        self.prompt = list(backend.model.tokenize(PROMPT.encode(), True, False))
        self.companion = list(backend.model.tokenize(COMPANION.encode(), True, False))[:20]

    def logits(self, index: int) -> np.ndarray:
        from llama_cpp import llama_cpp

        row = llama_cpp.llama_get_logits_ith(self.be.ctx, index)
        return np.ctypeslib.as_array(ctypes.cast(row, ctypes.POINTER(ctypes.c_float)),
                                     shape=(self.be.n_vocab,)).copy()

    def run(self, rows: int, steps: int, forced: list[int] | None) -> tuple[list[int], list]:
        """The job's argmax tokens and logits per step, decoded beside `rows - 1` others."""
        for seq in range(max(ROWS)):
            self.be.forget(seq, 0)
        positions = {}
        for seq in range(1, rows):
            self.be.decode([(t, i, seq, False) for i, t in enumerate(self.companion)])
            positions[seq] = len(self.companion)
        n = len(self.prompt)
        self.be.decode([(t, i, 0, i == n - 1) for i, t in enumerate(self.prompt)])
        logits = [self.logits(n - 1)]
        tokens = [int(np.argmax(logits[0]))]
        for step in range(steps):
            token = forced[step] if forced else tokens[-1]
            entries = [(token, n + step, 0, True)]
            entries += [(self.companion[-1], pos, seq, False) for seq, pos in positions.items()]
            self.be.decode(entries)
            positions = {seq: pos + 1 for seq, pos in positions.items()}
            logits.append(self.logits(0))
            tokens.append(int(np.argmax(logits[-1])))
        return tokens, logits


def first_difference(a: list, b: list) -> str:
    for step, (x, y) in enumerate(zip(a, b, strict=True)):
        if not np.array_equal(x, y):
            return f"step {step}"
    return "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's load chatter
    settings = Settings()
    gguf = resolve(settings.models["chat"].source, settings.cache_dir)
    print(f"first step whose logits differ from the job alone ({args.steps} decode steps; "
          f"step 0 is the prompt)")
    print(f"{'rows per step':>14} " + " ".join(f"{r:>8}" for r in ROWS[1:]))
    for repack in (True, False):
        backend = LlamaBackend(gguf, 1024, max(ROWS), 0, None, 512, repack=repack)
        try:
            probe = Probe(backend)
            alone, base = probe.run(1, args.steps, None)
            cells = [first_difference(base, probe.run(rows, args.steps, alone)[1])
                     for rows in ROWS[1:]]
        finally:
            backend.close()
        print(f"{'repack ' + ('on' if repack else 'off'):>14} " +
              " ".join(f"{c:>8}" for c in cells))


if __name__ == "__main__":
    main()
