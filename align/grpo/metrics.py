"""What a GRPO step reports about its data: rewards, completion lengths, truncation.

Loss-side metrics (clip fractions, KL, ratios) come back from `align.grpo.loss.policy_loss` and
advantage-side ones (zero-std share) from `align.grpo.advantages`; these are the rest. Every value
is a detached 0-d tensor (no host sync until the logger asks), under a namespaced key.
"""

from __future__ import annotations

import torch

from align.grpo.advantages import nanstd


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


def reward_metrics(rewards: torch.Tensor,
                   components: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Mean and std (unbiased, NaN-aware: NaN = not applicable) of the combined reward and each component.

    Args:
        rewards: `[N]` combined reward per completion.
        components: name -> `[N]` reward of each reward function before weighting.
    Returns:
        `reward/mean`, `reward/std`, and `reward/<name>/mean`, `reward/<name>/std` per component.
    """
    out: dict[str, torch.Tensor] = {}
    for name, values in {"": rewards, **(components or {})}.items():
        prefix = f"reward/{name}/" if name else "reward/"
        values = values.detach().float()
        out[prefix + "mean"] = torch.nanmean(values)
        out[prefix + "std"] = nanstd(values) if values.numel() > 1 else values.new_zeros(())
    return out


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
