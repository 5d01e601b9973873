"""The GRPO policy loss: clipped importance-weighted advantage, KL to the reference, aggregation.

Per completion token t of completion i (DeepSeekMath eq. 3, with DAPO's asymmetric clip):

    ρ_t   = exp(log π_θ(o_t) − log π_old(o_t))
    pg_t  = −min(ρ_t · A_i, clip(ρ_t, 1 − ε_low, 1 + ε_high) · A_i)
    pg_t ← pg_t · w_t                       if rollout_logp given (truncated IS, below)
    ℓ_t   = pg_t + β · KL_t                 KL_t from `align.grpo.kl` (default k3)

then `LOSS_AGGREGATIONS[aggregation]` reduces ℓ over tokens and sequences. Every step matches
TRL 1.16's `GRPOTrainer._compute_loss` for the names both have (tests/test_grpo_vs_trl.py proves it
on a real model's gradients).

Truncated importance sampling (Yao et al., "Your efficient RL framework secretly brings you
off-policy RL training", 2025; TRL `vllm_importance_sampling_mode="token_truncate"`): the rollout
engine (vLLM) samples from π_rollout, which differs slightly from the trainer's π_old through
kernels and precision, so each token is re-weighted by w_t = min(exp(log π_old − log π_rollout), C).
Tokens whose rollout log-prob is NaN (the engine could not score them) get w_t = 1.

Aggregations (all share `fn(per_token_loss, mask, *, max_completion_length, num_items_in_batch,
num_micro_batches, world_size)`). The returned value is this micro-batch's share of the optimizer
step's loss: summing it over micro-batches and letting DDP average over ranks gives the step loss,
so the caller just calls `.backward()` on each micro-batch and never scales by name.

- ``grpo``: mean over sequences of each sequence's token mean (DeepSeekMath 1/G Σ_i 1/|o_i| Σ_t),
  divided by num_micro_batches. Length-biased: long wrong answers are penalised less per token.
- ``bnpo``: token mean over this micro-batch, divided by num_micro_batches.
- ``dr_grpo``: token sum / (sequences in micro-batch × max_completion_length), divided by
  num_micro_batches (Dr. GRPO's constant normaliser).
- ``dapo``: token sum / (num_items_in_batch / world_size), where num_items_in_batch is the number
  of completion tokens in the *whole optimizer step* (all micro-batches, all ranks): exactly the
  global token mean, whatever the micro-batch and rank split (DAPO's token-level loss).
"""

from __future__ import annotations

import torch

from align.errors import AlignError
from align.grpo.kl import KL_ESTIMATORS
from align.grpo.metrics import masked_mean, masked_min_max
from align.grpo.registry import Registry

LOSS_AGGREGATIONS: Registry = Registry("loss aggregation")


def _masked_sum(per_token_loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (per_token_loss * mask).sum()


@LOSS_AGGREGATIONS.register("grpo")
def aggregate_grpo(per_token_loss: torch.Tensor, mask: torch.Tensor, *, max_completion_length: int | None,
                   num_items_in_batch: torch.Tensor | float | None, num_micro_batches: int = 1,
                   world_size: int = 1) -> torch.Tensor:
    """mean_i (Σ_t ℓ_it m_it / max(Σ_t m_it, 1)) / num_micro_batches. `[N, T]` x2 -> scalar."""
    per_seq = (per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return per_seq.mean() / num_micro_batches


@LOSS_AGGREGATIONS.register("bnpo")
def aggregate_bnpo(per_token_loss: torch.Tensor, mask: torch.Tensor, *, max_completion_length: int | None,
                   num_items_in_batch: torch.Tensor | float | None, num_micro_batches: int = 1,
                   world_size: int = 1) -> torch.Tensor:
    """Σ ℓ m / max(Σ m, 1) / num_micro_batches over the local micro-batch. `[N, T]` x2 -> scalar."""
    return _masked_sum(per_token_loss, mask) / mask.sum().clamp(min=1.0) / num_micro_batches


@LOSS_AGGREGATIONS.register("dr_grpo")
def aggregate_dr_grpo(per_token_loss: torch.Tensor, mask: torch.Tensor, *, max_completion_length: int | None,
                      num_items_in_batch: torch.Tensor | float | None, num_micro_batches: int = 1,
                      world_size: int = 1) -> torch.Tensor:
    """Σ ℓ m / (N · max_completion_length) / num_micro_batches. `[N, T]` x2 -> scalar."""
    if not max_completion_length:
        raise AlignError("loss aggregation 'dr_grpo' needs max_completion_length (the generation "
                         "length limit, Dr. GRPO's constant normaliser)")
    denom = per_token_loss.size(0) * max_completion_length
    return _masked_sum(per_token_loss, mask) / denom / num_micro_batches


@LOSS_AGGREGATIONS.register("dapo")
def aggregate_dapo(per_token_loss: torch.Tensor, mask: torch.Tensor, *, max_completion_length: int | None,
                   num_items_in_batch: torch.Tensor | float | None, num_micro_batches: int = 1,
                   world_size: int = 1) -> torch.Tensor:
    """Σ ℓ m / (max(num_items_in_batch, 1) / world_size). `[N, T]` x2 -> scalar.

    num_items_in_batch: completion tokens in the whole optimizer step, summed over micro-batches
    and ranks (TRL's `num_items_in_batch` when steps_per_generation = gradient_accumulation_steps).
    """
    if num_items_in_batch is None:
        raise AlignError("loss aggregation 'dapo' needs num_items_in_batch: the number of completion "
                         "tokens in the whole optimizer step, over all micro-batches and ranks")
    total = torch.as_tensor(num_items_in_batch, dtype=per_token_loss.dtype, device=per_token_loss.device)
    return _masked_sum(per_token_loss, mask) / (total.clamp(min=1.0) / world_size)


def rollout_is_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, *,
                       cap: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level truncated importance weights w = min(exp(old − rollout), cap), detached.

    Args:
        old_logp: `[N, T]` log π_old from the trainer's own forward pass.
        rollout_logp: `[N, T]` log π_rollout reported by the engine that sampled; NaN = unknown.
        mask: `[N, T]` completion mask; masked and NaN positions get weight 1.
        cap: C, the truncation (TRL's vllm_importance_sampling_clip_max, default 3).
    Returns:
        weights `[N, T]`, and `rollout_is/*` metrics over unmasked tokens.
    """
    mask = mask.bool()
    diff = torch.nan_to_num((old_logp - rollout_logp).detach().masked_fill(~mask, 0.0), nan=0.0)
    raw = torch.exp(diff)
    weights = raw.clamp(max=cap)
    w_min, w_max = masked_min_max(weights, mask)
    known = mask & ~torch.isnan(rollout_logp)
    _, diff_max = masked_min_max(diff.abs(), known)
    metrics = {
        "rollout_is/weight_mean": masked_mean(weights, mask),
        "rollout_is/weight_min": w_min,
        "rollout_is/weight_max": w_max,
        "rollout_is/truncated_frac": masked_mean((raw > cap).float(), mask),
        "rollout_is/logp_diff_mean": masked_mean(diff.abs(), known),
        "rollout_is/logp_diff_max": diff_max,
    }
    return weights, metrics


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    aggregation: str = "grpo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    delta: float | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    kl_ratio_correction: bool = False,
    is_cap: float | None = None,
    max_completion_length: int | None = None,
    num_items_in_batch: torch.Tensor | float | None = None,
    num_micro_batches: int = 1,
    world_size: int = 1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of one micro-batch and its `actor/*` (and `rollout_is/*`) metrics.

    Args:
        logp: `[N, T]` log π_θ of the completion tokens, with grad (`align.grpo.logprobs`).
        old_logp: `[N, T]` log π_old, detached; None = on-policy (μ = 1): logp.detach() is used.
        advantages: `[N]` per completion (or `[N, T]` per token).
        mask: `[N, T]` 1 on tokens that count (completion through EOS, minus anything masked out).
        ref_logp: `[N, T]` log π_ref; needed only when beta != 0.
        rollout_logp: `[N, T]` log-probs the rollout engine reported; used only with is_cap.
        entropy: `[N, T]` per-token entropy, for the `actor/entropy` metric only.
        aggregation: a name in LOSS_AGGREGATIONS (grpo, bnpo, dr_grpo, dapo).
        epsilon_low, epsilon_high: clip range [1 − ε_low, 1 + ε_high] of the ratio (DAPO: 0.2, 0.28).
        delta: if set, the unclipped ratio is also capped at delta (INTELLECT-2 two-sided clip; TRL `delta`).
        beta: KL coefficient (DeepSeekMath 0.04; 0 = no KL term and no reference model needed).
        kl_estimator: a name in KL_ESTIMATORS.
        kl_ratio_correction: multiply KL_t by ρ_t so its gradient is the unbiased reverse-KL
            gradient (DeepSeek-V3.2; TRL `use_bias_correction_kl`).
        is_cap: C of truncated IS; None = no rollout correction.
        max_completion_length, num_items_in_batch, num_micro_batches, world_size: normalisers, see
            the module docstring; each aggregation uses the ones it needs.
    Returns:
        scalar loss (see module docstring for what summing it means), metrics of detached scalars.
    """
    if beta != 0.0 and ref_logp is None:
        raise AlignError(f"beta={beta} needs reference log-probs (ref_logp); set beta: 0 to train "
                         "without a reference model")
    if is_cap is not None and rollout_logp is None:
        raise AlignError("is_cap is set but the batch has no rollout log-probs; use a rollout engine that "
                         "returns logprobs, or set is_cap: null to disable the IS correction")
    aggregate = LOSS_AGGREGATIONS.get(aggregation)
    keep = mask.bool()
    mask = mask.to(logp.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    # padded positions read log-prob 0 everywhere: ratio exactly 1, KL exactly 0, so whatever the
    # model put there (even -inf) cannot turn into inf * 0 = NaN, forwards or backwards
    logp = logp.masked_fill(~keep, 0.0)
    old_logp = logp.detach() if old_logp is None else old_logp.masked_fill(~keep, 0.0)
    ratio = torch.exp(logp - old_logp)  # ρ_t  [N, T]
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    ratio_capped = ratio if delta is None else torch.clamp(ratio, max=delta)
    per_token = -torch.min(ratio_capped * advantages, clipped * advantages)

    metrics: dict[str, torch.Tensor] = {}
    if is_cap is not None:
        weights, is_metrics = rollout_is_weights(old_logp, rollout_logp, keep, cap=is_cap)
        per_token = per_token * weights
        metrics.update(is_metrics)
    if ref_logp is not None:
        kl = KL_ESTIMATORS.get(kl_estimator)(logp, ref_logp.masked_fill(~keep, 0.0))
        if kl_ratio_correction:
            kl = kl * ratio
        if beta != 0.0:
            per_token = per_token + beta * kl
        metrics["actor/kl"] = masked_mean(kl.detach(), mask)

    loss = aggregate(per_token, mask, max_completion_length=max_completion_length,
                     num_items_in_batch=num_items_in_batch, num_micro_batches=num_micro_batches,
                     world_size=world_size)

    ratio_d = ratio_capped.detach()
    low = (ratio_d < 1 - epsilon_low) & (advantages < 0)  # the clip stopped a push down
    high = (ratio_d > 1 + epsilon_high) & (advantages > 0)  # the clip stopped a push up
    r_min, r_max = masked_min_max(ratio_d, keep)
    metrics.update({
        "actor/loss": loss.detach(),
        "actor/clip_frac_low": masked_mean(low.to(mask.dtype), mask),
        "actor/clip_frac_high": masked_mean(high.to(mask.dtype), mask),
        "actor/clip_frac_region": masked_mean((low | high).to(mask.dtype), mask),
        "actor/ratio_mean": masked_mean(ratio_d, mask),
        "actor/ratio_min": r_min,
        "actor/ratio_max": r_max,
    })
    if entropy is not None:
        metrics["actor/entropy"] = masked_mean(entropy.detach(), mask)
    return loss, metrics
