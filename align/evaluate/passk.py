"""pass@k: the unbiased estimator of Chen et al. (2021, "Evaluating Large Language Models Trained
on Code", arXiv:2107.03374, eq. 1).

Draw n >= k samples per problem, count the c correct ones; the chance that at least one of k
samples drawn without replacement from those n is correct is

    pass@k = 1 - C(n - c, k) / C(n, k)

averaged over problems. Estimating it as 1 - (1 - c/n)^k is biased low; this is not.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """pass@k of one problem with `c` correct out of `n` samples.

    Computed as the product form 1 - prod_{i=n-c+1}^{n} (1 - k/i), which avoids huge binomials
    (the same numerics as the paper's reference code).

    >>> round(pass_at_k(5, 2, 1), 6)
    0.4
    >>> pass_at_k(5, 0, 3), pass_at_k(5, 4, 2)
    (0.0, 1.0)
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n (draw at least k samples), got n={n}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over problems; `correct[i]` holds the verdicts of problem i's samples."""
    if not correct:
        return float("nan")
    return float(np.mean([pass_at_k(len(v), int(sum(v)), k) for v in correct]))
