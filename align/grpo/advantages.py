"""Group-relative advantages: how much better a completion scored than its siblings.

GRPO has no critic. For each prompt it samples a group of G completions; completion i's advantage
is its reward minus the group mean, optionally divided by a spread:

    A_i = (r_i - mean_group(r)) / (scale + eps)

`ADVANTAGES` holds one function per choice of `scale` (the names are TRL's `scale_rewards` values):

- ``group``: the group's standard deviation (DeepSeekMath GRPO).
- ``batch``: the standard deviation over the whole batch (Lite PPO, arXiv:2508.08221); the mean is
  still the group's.
- ``none``: no division (Dr. GRPO, arXiv:2503.20783: dividing by std up-weights questions that are
  too easy or too hard).

Conventions, chosen to equal TRL 1.16's `GRPOTrainer._generate_and_score_completions`:

- std is the *unbiased* (Bessel-corrected, n-1) estimate, as TRL's `nanstd`; eps = 1e-4.
- A NaN reward means "unscorable" (every reward function returned None). It is left out of its
  group's mean and std and its advantage is 0, so it neither moves the policy nor shifts the
  baseline of its siblings.

Where align is stricter than TRL: a group whose scored rewards are all equal (or that has at most one
scored completion) gets advantage *exactly* 0 rather than (r - mean) / (0 + eps), which float
round-off in the mean can make nonzero. Such groups carry no learning signal;
`advantage/zero_std_frac` reports their share, the signal-starvation metric DAPO's dynamic sampling
watches.

`weight_negatives` then scales the negative advantages by λ (W-REINFORCE, Zhu et al. 2025,
arXiv:2506.01347): λ = 1 is plain GRPO, λ = 0 reinforces only the better-than-average samples.

Every function shares one signature: `fn(rewards, *, group_size, eps) -> (advantages, metrics)`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from align.errors import AlignError
from align.grpo.registry import Registry

ADVANTAGES: Registry = Registry("advantage estimator")

DEFAULT_EPS = 1e-4  # TRL 1.16's constant


def group_view(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """`[B*G]` -> `[B, G]` (groups are contiguous: rows g*G .. g*G+G-1 share a prompt), as float32."""
    if rewards.dim() != 1:
        raise AlignError(f"rewards must be a flat [B*G] tensor, got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise AlignError(
            f"{rewards.numel()} rewards do not split into groups of group_size={group_size}; "
            "each prompt must have exactly group_size completions (set num_generations so it divides "
            "the number of completions per step)")
    return rewards.float().view(-1, group_size)


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Unbiased std ignoring NaNs, over `dim` (kept) or over everything (a scalar).

    NaN where fewer than two values are present, as TRL's `nanstd`.
    """
    if dim is None:
        x, dim = x.reshape(-1), 0
    count = (~torch.isnan(x)).sum(dim, keepdim=True)
    sq = torch.nansum((x - torch.nanmean(x, dim, keepdim=True)) ** 2, dim, keepdim=True)
    std = (sq / (count - 1).clamp(min=1)).sqrt()
    std = torch.where(count > 1, std, torch.full_like(std, float("nan")))
    return std if x.dim() > 1 else std.squeeze(0)


def _advantages(rewards: torch.Tensor, *, group_size: int, eps: float,
                spread: Callable[[torch.Tensor], torch.Tensor] | None,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(r − group mean) / (spread([B, G] rewards) + eps), or undivided when spread is None."""
    grouped = group_view(rewards, group_size)  # [B, G]
    scored = ~torch.isnan(grouped)
    centred = grouped - torch.nanmean(grouped, dim=1, keepdim=True)
    adv = centred if spread is None else centred / (spread(grouped) + eps)
    # all scored rewards equal (max <= min; also true for 0 or 1 scored) -> no signal, exactly 0
    hi = grouped.masked_fill(~scored, float("-inf")).amax(dim=1, keepdim=True)
    lo = grouped.masked_fill(~scored, float("inf")).amin(dim=1, keepdim=True)
    zero_std = hi <= lo  # [B, 1]
    adv = torch.where(zero_std | ~scored, torch.zeros_like(adv), adv)
    metrics = {"advantage/zero_std_frac": zero_std.float().mean(),
               "advantage/unscored_frac": (~scored).float().mean(), **value_metrics(adv)}
    return adv.view(-1), metrics


def value_metrics(adv: torch.Tensor) -> dict[str, torch.Tensor]:
    """`advantage/abs_mean|max|min` of the advantages the loss uses (the trainer recomputes them
    after `weight_negatives`)."""
    return {"advantage/abs_mean": adv.abs().mean(), "advantage/max": adv.max(), "advantage/min": adv.min()}


@ADVANTAGES.register("group")
def group_scaled(rewards: torch.Tensor, *, group_size: int,
                 eps: float = DEFAULT_EPS) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO: A = (r - group mean) / (group std + eps).

    Args:
        rewards: `[B*G]` float, groups contiguous; NaN = unscorable.
        group_size: G, completions per prompt.
        eps: added to the std so a near-constant group cannot explode.
    Returns:
        advantages `[B*G]` float32, and detached scalar metrics under `advantage/`.
    """
    return _advantages(rewards, group_size=group_size, eps=eps, spread=lambda g: nanstd(g, dim=1))


@ADVANTAGES.register("batch")
def batch_scaled(rewards: torch.Tensor, *, group_size: int,
                 eps: float = DEFAULT_EPS) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Lite PPO: A = (r - group mean) / (std over all B*G rewards + eps). Shapes as `group_scaled`."""
    return _advantages(rewards, group_size=group_size, eps=eps, spread=nanstd)


@ADVANTAGES.register("none")
def unscaled(rewards: torch.Tensor, *, group_size: int,
             eps: float = DEFAULT_EPS) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Dr. GRPO: A = r - group mean (eps unused, kept for the shared signature). Shapes as `group_scaled`."""
    return _advantages(rewards, group_size=group_size, eps=eps, spread=None)


def weight_negatives(advantages: torch.Tensor, weight: float) -> torch.Tensor:
    """A_i ← λ·A_i where A_i < 0 (W-REINFORCE, Zhu et al. 2025, arXiv:2506.01347; they use λ = 0.1).

    Why: pushing a sampled wrong token down spreads its probability over every other token, and in a
    small model that shares one representation across many facts it unlearns answers it had right
    (docs/grpo.md, "Negative samples"). λ < 1 keeps the push-down, smaller; λ = 0 keeps only the pull-up.

    >>> weight_negatives(torch.tensor([1.5, -0.5, -1.0, 0.0]), 0.1).tolist()
    [1.5, -0.05000000074505806, -0.10000000149011612, 0.0]
    """
    return advantages if weight == 1.0 else torch.where(advantages < 0, advantages * weight, advantages)
