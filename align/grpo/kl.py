"""Per-token estimators of KL(π_θ ‖ π_ref) from the log-probs of the sampled tokens.

The true KL needs the whole vocabulary; these use only log π_θ(o_t) and log π_ref(o_t) of the token
that was sampled (from π_θ, up to the importance ratio). With d = log π_ref − log π_θ (Schulman,
"Approximating KL divergence", 2020):

- ``k1``: −d. Unbiased, high variance, can be negative.
- ``k2``: d² / 2. Biased, low variance, ≥ 0.
- ``k3``: exp(d) − d − 1. Unbiased, low variance, ≥ 0. DeepSeekMath's GRPO and TRL use this one:
  π_ref/π_θ − log(π_ref/π_θ) − 1.

All share `fn(logp, ref_logp) -> per-token KL`, shapes `[N, T]` in and out.

Where the KL goes (`kl_mode` in a recipe): in the loss, β·KL_t is added to every token's loss and
differentiated (DeepSeekMath GRPO); in the reward, `kl_penalized_rewards` subtracts β·Σ_t KL_t from
each completion's reward before the advantages are computed, and nothing is differentiated (PPO's
RLHF reward shaping; verl `use_kl_in_reward`, OpenRLHF). Which estimator's *gradient* is right in the
loss differs: on-policy, E[∇k1] = 0, E[∇k2] = ∇KL(π_θ ‖ π_ref) (the reverse KL), and E[∇k3] =
∇KL(π_ref ‖ π_θ) (the forward KL); multiplying k3 by the ratio (`kl_ratio_correction`) restores the
reverse-KL gradient (DeepSeek-V3.2).
"""

from __future__ import annotations

import torch

from align.grpo.registry import Registry

KL_ESTIMATORS: Registry = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """log π_θ − log π_ref, per token. `[N, T]` -> `[N, T]`."""
    return logp - ref_logp


@KL_ESTIMATORS.register("k2")
def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """(log π_θ − log π_ref)² / 2, per token. `[N, T]` -> `[N, T]`."""
    return 0.5 * (logp - ref_logp) ** 2


@KL_ESTIMATORS.register("k3")
def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """exp(d) − d − 1 with d = log π_ref − log π_θ, per token. `[N, T]` -> `[N, T]`."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def kl_penalized_rewards(rewards: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                         *, beta: float, estimator: str = "k3") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KL in the reward: r'_i = r_i − β · Σ_t m_it KL_t(π_old ‖ π_ref), before advantages.

    The sequence KL is the sum of the per-token estimates (the KL between the two policies'
    distributions over whole completions), as verl's token-level penalty summed by its GRPO
    advantage. Nothing here carries a gradient: the policy feels the KL only through its advantages.

    Args:
        rewards: `[N]` reward per completion; NaN (unscorable) stays NaN.
        logp: `[N, T]` log π_old, the policy that sampled (the trainer's, not the engine's).
        ref_logp: `[N, T]` log π_ref.
        mask: `[N, T]` completion mask.
        beta: the penalty coefficient (verl `kl_ctrl.kl_coef` default 0.001).
        estimator: a name in KL_ESTIMATORS (verl's in-reward default is k1, `kl_penalty: kl`).
    Returns:
        penalised rewards `[N]` (rewards' dtype and device), and `kl_reward/kl_mean` (mean Σ_t KL_t)
        and `kl_reward/penalty_mean` (mean β·Σ_t KL_t).
    """
    keep = mask.bool()
    with torch.no_grad():
        kl = KL_ESTIMATORS.get(estimator)(logp.masked_fill(~keep, 0.0), ref_logp.masked_fill(~keep, 0.0))
        seq_kl = (kl * keep).sum(-1).to(device=rewards.device, dtype=rewards.dtype)
    penalty = beta * seq_kl
    return rewards - penalty, {"kl_reward/kl_mean": seq_kl.mean(), "kl_reward/penalty_mean": penalty.mean()}
