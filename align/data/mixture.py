"""Which rows of which sources make up a training set: a pure function of sizes, specs and seed.

Rules for a mixture of sources with `size_i` usable rows each:
- `count: n`: exactly n rows of that source: a seeded sample without replacement when n ≤ size,
  otherwise every row ⌊n/size⌋ times plus a seeded sample of the rest (up-sampling);
- `weight: w`: the weighted sources share the rows they hold together, T = Σ size_i over them, in
  proportion to their weights: round(T · w_i / Σw) rows each, drawn as for `count`;
- neither: every row once.
The concatenation is then shuffled with the seed. Indices are global: source i's rows occupy
[offset_i, offset_i + size_i) of the concatenated (tokenised) sources.

DeepSeek-V2's SFT set is two sources given by count: 1.2M helpfulness + 0.3M safety.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from align.errors import AlignError


def source_counts(sizes: Sequence[int], weights: Sequence[float | None],
                  counts: Sequence[int | None]) -> list[int]:
    """How many rows each source contributes (see the module docstring)."""
    weighted = [i for i, w in enumerate(weights) if w is not None]
    pool = sum(sizes[i] for i in weighted)
    total_w = sum(weights[i] for i in weighted)
    out = []
    for i, size in enumerate(sizes):
        if counts[i] is not None:
            out.append(int(counts[i]))
        elif weights[i] is not None:
            out.append(int(round(pool * weights[i] / total_w)))
        else:
            out.append(int(size))
    return out


def _draw(rng: np.random.Generator, size: int, n: int) -> np.ndarray:
    full, rest = divmod(n, size)
    return np.concatenate([np.tile(np.arange(size), full), np.sort(rng.choice(size, rest, replace=False))])


def mixture_indices(sizes: Sequence[int], weights: Sequence[float | None], counts: Sequence[int | None],
                    seed: int, names: Sequence[str] | None = None) -> np.ndarray:
    """Shuffled global row indices of the mixture (int64), deterministic in `seed`."""
    names = names or [f"source {i}" for i in range(len(sizes))]
    wanted = source_counts(sizes, weights, counts)
    rng = np.random.default_rng([seed, 0x5F7])
    parts, offset = [], 0
    for name, size, n in zip(names, sizes, wanted):
        if n > 0 and size == 0:
            raise AlignError(f"data source {name} has no usable rows (all empty, invalid or dropped)")
        if n > 0:
            parts.append(offset + _draw(rng, size, n))
        offset += size
    indices = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return rng.permutation(indices.astype(np.int64))


def held_out_split(n: int, eval_split: float, seed: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(eval, train) indices of `n` rows: a seeded permutation whose first `eval_split` share is
    held out (the preference stages' split; `seed` = [stage seed, a salt of the stage kind])."""
    order = np.random.default_rng(seed).permutation(n)
    n_eval = int(round(n * eval_split))
    return order[:n_eval], order[n_eval:]


def split_eval(indices: np.ndarray, eval_split: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval): the last `eval_split` share of the shuffled indices is held out."""
    n_eval = int(round(len(indices) * eval_split))
    if eval_split > 0 and n_eval == 0 and len(indices) > 1:
        n_eval = 1
    return indices[: len(indices) - n_eval], indices[len(indices) - n_eval:]
