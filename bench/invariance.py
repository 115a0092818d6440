"""Which batch shapes change a job's logits: why `batch_invariant` sets llama.cpp up as it does.

    python -m bench.invariance [--steps 40]

One llama.cpp context (the worker's `LlamaBackend`) decodes a greedy job alone, then the same
job again (forced to the same tokens) beside companion sequences that add rows to every decode
step. For each row count it prints the first step whose logits are not bit-identical to the
job's alone, with the job's prompt decoded on its own and then (a shorter prompt) in one decode
with the companions' prompts, as many rows from each, as the invariant engine joins prompts.
Four backends: a unified KV cache with repacked weights and llama.cpp's tiled K-quant matmul
on (`batch_invariant = false` before workers turned the tiled matmul off), the same without
repacking, the invariant backend (a KV stream per sequence, no repacking, no tiled matmul),
and the same with its prefill context (`fast_prefill`: prompts decoded on repacked weights,
each sequence's rows padded to whole groups of 4, the cells then copied over, the first
token's logits from there). "none" everywhere is what the invariant ones must show.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import subprocess
import sys

import numpy as np

from broker.settings import Settings
from broker.sources import resolve
from workers.batching import whole
from workers.llama_model import LlamaBackend

PROMPT = "Question: why is the sky blue? Answer in detail.\nAnswer:"
SHORT_PROMPT = "Why is the sky blue?"  # 7 tokens: 8 such prompts fit in one prompt decode
COMPANION = "The history of the Roman empire " * 8
ROWS = (1, 2, 4, 8, 16)
PROMPT_ROWS = 128  # the most prompt rows the invariant engine decodes in a step (by default)


class Probe:
    def __init__(self, backend: LlamaBackend, prompt: str = PROMPT) -> None:
        self.be = backend
        self.prompt = list(backend.model.tokenize(prompt.encode(), True, False))
        self.companion = list(backend.model.tokenize(COMPANION.encode(), True, False))[:40]

    def prompt_decode(self, entries: list[tuple[int, int, int, bool]]) -> int:
        """Decode prompt rows as the engine does; the batch index of the row with logits."""
        if not self.be.prefill_rows:
            self.be.decode(entries)
            return next((i for i, e in enumerate(entries) if e[3]), -1)
        padded: list[tuple[int, int, int, bool]] = []
        ends = {}
        for seq in dict.fromkeys(e[2] for e in entries):
            rows = [e for e in entries if e[2] == seq]
            ends[seq] = rows[-1][1] + 1
            padded += rows + [(rows[-1][0], ends[seq] + i, seq, False)
                              for i in range(whole(len(rows), self.be.prefill_rows)
                                             - len(rows))]
        self.be.prefill(padded)
        for seq, end in ends.items():
            self.be.from_prefill(seq, end)
        return next((i for i, e in enumerate(padded) if e[3]), -1)

    def logits(self, index: int) -> np.ndarray:
        from llama_cpp import llama_cpp

        row = llama_cpp.llama_get_logits_ith(self.be.logits_ctx, index)
        return np.ctypeslib.as_array(ctypes.cast(row, ctypes.POINTER(ctypes.c_float)),
                                     shape=(self.be.n_vocab,)).copy()

    def run(self, rows: int, steps: int, forced: list[int] | None,
            joined: bool = False) -> tuple[list[int], list]:
        """The job's argmax tokens and logits per step, decoded beside `rows - 1` others;
        `joined`: the job's prompt in one decode with theirs, as many rows from each."""
        for seq in range(max(ROWS)):
            self.be.forget(seq, 0)
            if self.be.prefill_rows:
                self.be.forget_prefill(seq, 0)
        n = len(self.prompt)
        companion = self.companion[:n] if joined else self.companion
        positions = {}
        prompts = [(t, i, 0, i == n - 1) for i, t in enumerate(self.prompt)]
        for seq in range(1, rows):
            chunk = [(t, i, seq, False) for i, t in enumerate(companion)]
            if joined:
                prompts += chunk
            else:
                self.prompt_decode(chunk)
            positions[seq] = len(companion)
        logits = [self.logits(self.prompt_decode(prompts))]
        tokens = [int(np.argmax(logits[0]))]
        for step in range(steps):
            token = forced[step] if forced else tokens[-1]
            entries = [(token, n + step, 0, True)]
            entries += [(companion[-1], pos, seq, False) for seq, pos in positions.items()]
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


BACKENDS = {  # name: (unified KV cache, repacked weights, GGML_CPU_TILED_MM, prefill
    # context), each probed in a process of its own (llama.cpp reads the tiled-matmul switch
    # once per process)
    "fast, tiled": (True, True, "1", False),  # batch_invariant = false, as before the switch
    "fast, no repack": (True, False, "1", False),
    "invariant": (False, False, "0", False),  # batch_invariant = true, fast_prefill = false
    "inv., prefill": (False, False, "0", True),  # batch_invariant = true (the default)
}


def probe(name: str, steps: int) -> list[str]:
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's load chatter
    settings = Settings()
    gguf = resolve(settings.models["chat"].source, settings.cache_dir)
    unified, repack, _tiled, prefill = BACKENDS[name]
    backend = LlamaBackend(gguf, 1024, max(ROWS), 0, None, 512, unified=unified, repack=repack,
                           prefill_batch=PROMPT_ROWS if prefill else 0)
    try:
        probe = Probe(backend)
        alone, base = probe.run(1, steps, None)
        beside = [first_difference(base, probe.run(rows, steps, alone)[1]) for rows in ROWS[1:]]
        short = Probe(backend, SHORT_PROMPT)
        alone, base = short.run(1, steps, None)
        joined = [first_difference(base, short.run(rows, steps, alone, joined=True)[1])
                  if rows * len(short.prompt) <= PROMPT_ROWS else "-" for rows in ROWS[1:]]
        return beside + joined
    finally:
        backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--backend", choices=BACKENDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend:  # one row of the table, in this process
        print(json.dumps(probe(args.backend, args.steps)))
        return
    print(f"first step whose logits differ from the job alone ({args.steps} decode steps; "
          f"step 0 is the prompt); its prompt decoded alone | in one decode with the others' "
          f"prompts, as many rows each (- : over {PROMPT_ROWS} rows)")
    columns = " ".join(f"{r:>8}" for r in ROWS[1:])
    print(f"{'rows per step':>16} {columns} | {columns}")
    for name in BACKENDS:  # llama.cpp latches its kernel switches once per process
        env = {**os.environ, "GGML_CPU_TILED_MM": BACKENDS[name][2]}
        out = subprocess.run([sys.executable, "-m", "bench.invariance", "--backend", name,
                              "--steps", str(args.steps)], check=True, capture_output=True,
                             text=True, env=env).stdout
        cells = [f"{c:>8}" for c in json.loads(out.strip().splitlines()[-1])]
        half = len(ROWS) - 1
        print(f"{name:>16} {' '.join(cells[:half])} | {' '.join(cells[half:])}")


if __name__ == "__main__":
    main()
