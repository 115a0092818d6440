"""The few tokens a sampler can pick, found without sorting a 262,144-token vocabulary.

llama.cpp's `llama_sampler_sample` copies every logit of a row into a candidate array and runs
the sampler chain over all of them: for Gemma's vocabulary about 0.34 ms a row on the 2-core
reference machine, while a decode step of eight rows takes about 50 ms. Yet a chain that starts
with top-k (or greedy) only ever looks past the k highest logits to drop them. So the chain can
run on a small superset of those k instead, and pick exactly the token it picks from the whole
row: the same k survive top-k in the same order, and top-p, min-p, temperature and the seeded
draw then see the same array.

The superset: view the row as `LANES` rows of equal length and take the maximum of each
column. At least k columns have a maximum at or above the k-th highest column maximum `t`, so
at least k logits are >= t, so every one of the k highest logits (ties included) is >= t. The
tokens >= t are typically a few dozen, and only the columns whose maximum reaches t need
searching for them: one pass over the row and a few small ones, about 50 µs.

Fewer, longer columns leave fewer logits to search in the columns that reach t (each holds
`LANES`): 64 lanes against 256 took a candidate search from 29 to 22 µs for a 32,000-token
row and from 50 to 44 µs for Gemma's (random rows, k = 40); a whole sampled row (search, then
the chain) from 63 to 45 µs and from 105 to 96 µs (`python -m bench.sampling`).
"""

from __future__ import annotations

import numpy as np

LANES = 64  # rows the logits are folded into; a column's maximum stands for LANES logits


def top_superset(row: np.ndarray, k: int) -> np.ndarray | None:
    """Ascending ids of tokens that include every token among the `k` highest logits (and any
    tied with the k-th), or None where the shortcut does not apply (k too large, NaN)."""
    n = row.shape[0]
    width = n // LANES
    if k < 1 or width == 0:
        return None
    grid = row[: LANES * width].reshape(LANES, width)  # column c holds tokens c, c+width, ...
    tail = row[LANES * width:]  # shorter than a column: each of its logits is its own column
    maxima = np.concatenate([grid.max(axis=0), tail]) if tail.size else grid.max(axis=0)
    if k > maxima.shape[0] or np.isnan(maxima).any():
        return None
    threshold = np.partition(maxima, -k)[-k]
    # Only columns whose maximum reaches the threshold hold candidates: search just those.
    columns = np.flatnonzero(maxima[:width] >= threshold)
    hits = np.flatnonzero(np.take(grid, columns, axis=1) >= threshold)
    ids = (hits // columns.shape[0]) * width + columns[hits % columns.shape[0]]
    tail_ids = LANES * width + np.flatnonzero(tail >= threshold)
    return np.sort(np.concatenate([ids, tail_ids]))
