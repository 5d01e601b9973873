"""What a GRPO step reports beyond the loss: phase times, completion lengths, truncation, and
how micro-batch metrics combine into the step's.

Loss-side metrics (clip fractions, KL, ratios) come back from `align.grpo.loss.policy_loss` and
advantage-side ones (zero-std share) from `align.grpo.advantages`. Metric values are detached
0-d tensors (no host sync until the logger asks), under namespaced keys.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch

from align.train_utils import mean_over_ranks


class PhaseTimer:
    """`with timer("rollout"):` adds the phase's wall time to `time/rollout` of this step."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[f"time/{phase}"] = self.times.get(f"time/{phase}", 0.0) + time.perf_counter() - start


def merge_micro_metrics(into: dict[str, float], new: dict[str, torch.Tensor], parts: int) -> None:
    """Combine one micro-batch's metrics into the step's: `*_min` / `*_max` keys by min / max,
    the rest as the mean over `parts` micro-batches."""
    for key, value in new.items():
        v = float(value)
        if key.endswith("_min"):
            into[key] = min(into.get(key, math.inf), v)
        elif key.endswith("_max"):
            into[key] = max(into.get(key, -math.inf), v)
        else:
            into[key] = into.get(key, 0.0) + v / parts


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` where `mask` is true; 0 when nothing is. Shapes broadcast; returns a 0-d tensor."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def masked_min_max(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of `x` where `mask` is true; (0, 0) when nothing is."""
    picked = x[mask.bool().expand_as(x)]
    if picked.numel() == 0:
        zero = x.new_zeros(())
        return zero, zero
    return picked.min(), picked.max()


def completion_metrics(completion_mask: torch.Tensor, truncated: torch.Tensor) -> dict[str, torch.Tensor]:
    """Length statistics of a batch of completions.

    Args:
        completion_mask: `[N, T]` 1 on the completion's own tokens (through EOS).
        truncated: `[N]` bool, True where generation stopped at the length limit, not at EOS.
    Returns:
        `completions/length_mean|min|max`, `completions/truncated_frac`, and
        `completions/terminated_length_mean` (over completions that ended with EOS; 0 if none).
    """
    lengths = completion_mask.sum(-1).float()
    truncated = truncated.bool()
    return {
        "completions/length_mean": lengths.mean(),
        "completions/length_min": lengths.min(),
        "completions/length_max": lengths.max(),
        "completions/truncated_frac": truncated.float().mean(),
        "completions/terminated_length_mean": masked_mean(lengths, ~truncated),
    }


def heldout_means(accelerator, components: dict[str, list], row_categories: list | None,
                  categories: list[str]) -> dict[str, float]:
    """`eval/<reward>` means over every rank's held-out samples (None = not applicable, left out),
    and `eval/<reward>/<category>` for each of `categories` (the same list on every rank, so all
    ranks make the same reduces)."""
    out: dict[str, float] = {}
    for name, vals in components.items():
        values = torch.tensor([math.nan if v is None else float(v) for v in vals], dtype=torch.float64,
                              device=accelerator.device)
        out[f"eval/{name}"] = mean_over_ranks(accelerator, values, torch.ones_like(values, dtype=torch.bool))
        for cat in categories:
            select = torch.tensor([c == cat for c in row_categories], device=accelerator.device)
            out[f"eval/{name}/{cat}"] = mean_over_ranks(accelerator, values, select)
    return out
