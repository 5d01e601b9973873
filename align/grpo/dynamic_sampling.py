"""Dynamic sampling (DAPO): train only on groups whose rewards differ.

A group whose G rewards are all equal has advantage 0 for every sample, so it adds nothing to
the policy gradient but still dilutes the batch (its tokens count in the loss normaliser). DAPO
drops such groups and samples more prompts until the batch is full again. Here:
  - a group has spread when the standard deviation of its rewards is above `min_std` (by std, not
    by "mean strictly between 0 and 1", so non-binary rewards work: a group of 0.3, 0.3, 0.3 is
    dropped, as OpenRLHF's mean filter would not do);
  - round r of a step draws its prompts from stream r of the seeded prompt order and samples with
    seeds offset by r, so every round is a pure function of (seed, step, round) and resume stays
    exact with no extra state;
  - after `max_rounds` rounds a batch still short of groups with spread is topped up with the
    dropped ones (advantage 0, they change nothing but the loss normaliser), so every step trains
    the same number of samples on every rank and micro-batching stays valid;
  - each rank fills its own share (groups never cross ranks); under FSDP2 the ranks agree after
    each round whether all are full (`agree`), since every round's forwards are collectives: a
    rank already full runs the extra rounds too and keeps its first groups (same batch).
Metrics: `dynamic/rounds`, `dynamic/dropped_groups` (zero-spread groups seen), `dynamic/filled`
(zero-spread groups trained because the bound was hit).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from align.data.prompts import PromptSet
from align.grpo.advantages import nanstd


@dataclass
class Rollout:
    """One step's trained samples: `rows` repeats each prompt G times, `totals` the combined
    rewards (None: no component applied), `reward_metrics` the reward set's own metrics of the
    step's first round (the policy on fresh prompts, before any filtering)."""

    samples: list[Any]
    rows: PromptSet
    totals: list[float | None]
    reward_metrics: dict[str, Any]
    metrics: dict[str, float]


def groups_with_spread(totals: Sequence[float | None], group_size: int, min_std: float) -> list[bool]:
    """Per group of `group_size` consecutive rewards: is its std (unbiased, ignoring None) above
    `min_std`? A group with fewer than two rewards has no spread."""
    values = torch.tensor([math.nan if t is None else float(t) for t in totals], dtype=torch.float64)
    std = nanstd(values.view(-1, group_size), dim=1).squeeze(1)
    return [bool(s > min_std) for s in std]  # NaN > x is False


def fill_batch(generate: Callable[[int], tuple[list[Any], PromptSet, Any]], groups: int, group_size: int,
               max_rounds: int, min_std: float, agree: Callable[[bool], bool] = bool) -> Rollout:
    """Call `generate(round)` (→ samples, rows, scored batch of whole groups) until `groups`
    groups with spread are in hand (on every rank, as `agree` says) or `max_rounds` rounds have
    run; see the module docstring."""
    kept: list[tuple[list[Any], PromptSet, list]] = []
    spare: list[tuple[list[Any], PromptSet, list]] = []
    first_metrics: dict[str, Any] = {}
    rounds = 0
    for rounds in range(1, max_rounds + 1):
        samples, rows, scored = generate(rounds - 1)
        first_metrics = first_metrics or scored.metrics
        for g, spread in enumerate(groups_with_spread(scored.total, group_size, min_std)):
            part = slice(g * group_size, (g + 1) * group_size)
            group = (samples[part], rows.take(list(range(part.start, part.stop))), scored.total[part])
            (kept if spread else spare).append(group)
        if agree(len(kept) >= groups):
            break
    dropped = len(spare)
    chosen = kept[:groups] + spare[:max(0, groups - len(kept))]
    return Rollout([s for group, _, _ in chosen for s in group], PromptSet.concat([r for _, r, _ in chosen]),
                   [t for _, _, ts in chosen for t in ts],
                   first_metrics, {"dynamic/rounds": float(rounds), "dynamic/dropped_groups": float(dropped),
                                   "dynamic/filled": float(max(0, groups - len(kept)))})
