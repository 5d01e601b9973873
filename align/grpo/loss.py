"""The GRPO policy loss: importance-weighted advantage, clipped or capped, KL to the reference, aggregation.

Per completion token t of completion i, with A_i the advantage (DeepSeekMath eq. 3 and the variants
the field added since; docs/grpo.md has the formulas, defaults and when to use each):

    log ρ   = RATIO_LEVELS[level](log π_θ − log π_old)     token: ρ_t;  sequence (GSPO): s_i, one per sequence
    pg_t    = POLICY_OBJECTIVES[objective](ρ, log π_θ, A)  clip (PPO/DAPO clip, optional dual-clip) | cispo
    pg_t   ← pg_t · w                                      rollout correction (truncated / masked IS), if on
    ℓ_t     = pg_t + β · KL_t                              KL_t from `align.grpo.kl` (k1 | k2 | k3)

then `LOSS_AGGREGATIONS[aggregation]` reduces ℓ over tokens and sequences. Every step matches
TRL 1.16's `GRPOTrainer._compute_loss` for the names both have (tests/test_grpo_vs_trl.py proves it
on a real model's gradients); the ones TRL lacks (dual-clip as verl writes it, k1/k2 in the loss,
KL in the reward) are checked by hand in tests/test_grpo_math.py.

Train–rollout mismatch (Yao et al., "Your efficient RL framework secretly brings you off-policy RL
training", 2025; TRL `vllm_importance_sampling_mode`): the rollout engine (vLLM) samples from
π_rollout, which differs from the trainer's π_old through kernels and precision. `mismatch_metrics`
measures the gap on every step; `rollout_is_weights` corrects it, per token or per sequence, by
truncating w = π_old/π_rollout at C or by masking (w = 0) where it exceeds C. Tokens whose rollout
log-prob is NaN (the engine could not score them) count as agreeing (w = 1) and are left out of the
gap statistics.

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

from typing import Any

import torch

from align.errors import AlignError
from align.grpo.kl import KL_ESTIMATORS, kl_k3
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


RATIO_LEVELS: Registry = Registry("importance sampling level")
POLICY_OBJECTIVES: Registry = Registry("policy objective")
IS_LEVELS: Registry = Registry("rollout importance sampling level")
IS_MODES: Registry = Registry("rollout importance sampling mode")


def level_mask(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The mask that goes with `x`: `keep` `[N, T]` for per-token values, "has any token" `[N, 1]`
    for per-sequence values `[N, 1]`, so a statistic of sequence ratios counts sequences, not tokens."""
    return keep if x.size(-1) == keep.size(-1) else keep.any(-1, keepdim=True)


# ------------------------------------------------------------------ policy ratio: token or sequence

@RATIO_LEVELS.register("token")
def token_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log ρ_t = log π_θ(o_t) − log π_old(o_t): one ratio per token (PPO, GRPO). `[N, T]` -> `[N, T]`."""
    return log_ratio


@RATIO_LEVELS.register("sequence")
def sequence_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO (Zheng et al. 2025, arXiv:2507.18071): log s_i = (1/|o_i|) Σ_t m_it log ρ_it, the
    length-normalised sequence likelihood ratio, shared by every token of the sequence; the
    gradient flows to every token through the mean. `[N, T]` x2 -> `[N, 1]`."""
    return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)


# ------------------------------------------------------------------------- policy objectives

def dual_clip(pg: torch.Tensor, advantages: torch.Tensor, clip_ratio_c: float) -> torch.Tensor:
    """Dual-clip PPO (Ye et al. 2020, arXiv:1912.09729; verl `clip_ratio_c`): for A < 0 the clipped
    loss is also bounded by −A·c, so a token whose ratio ran far above 1 cannot push its
    probability down without limit: pg ← min(pg, −A·c) where A < 0."""
    return torch.where(advantages < 0, torch.minimum(pg, -advantages * clip_ratio_c), pg)


@POLICY_OBJECTIVES.register("clip")
def clip_objective(ratio: torch.Tensor, logp: torch.Tensor, advantages: torch.Tensor, *, epsilon_low: float,
                   epsilon_high: float, clip_ratio_c: float | None, cispo_cap: float,
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """pg = −min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A), then `dual_clip` when clip_ratio_c is set.

    Args:
        ratio: ρ, `[N, T]` (token level) or `[N, 1]` (sequence level), with grad.
        logp: `[N, T]` log π_θ (unused here; the shared signature has it for cispo).
        advantages: `[N, 1]` or `[N, T]`.
    Returns:
        per-token loss (broadcast shape of ratio and advantages), and boolean flags of where the
        clip removed the gradient: `clip_frac_low` (ρ < 1 − ε_low, A < 0), `clip_frac_high`
        (ρ > 1 + ε_high, A > 0) and, with dual-clip, `dual_clip_frac` (ρ > c, A < 0).
    """
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    pg = -torch.min(ratio * advantages, clipped * advantages)
    r = ratio.detach()
    flags = {"clip_frac_low": (r < 1 - epsilon_low) & (advantages < 0),
             "clip_frac_high": (r > 1 + epsilon_high) & (advantages > 0)}
    if clip_ratio_c is not None:
        pg = dual_clip(pg, advantages, clip_ratio_c)
        flags["dual_clip_frac"] = (r > clip_ratio_c) & (advantages < 0)
    return pg, flags


@POLICY_OBJECTIVES.register("cispo")
def cispo_objective(ratio: torch.Tensor, logp: torch.Tensor, advantages: torch.Tensor, *, epsilon_low: float,
                    epsilon_high: float, clip_ratio_c: float | None, cispo_cap: float,
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO (MiniMax-M1, arXiv:2506.13585; TRL loss_type="cispo"): pg = −sg(min(ρ, C))·A·log π_θ.

    The importance weight is capped and detached, so every token keeps a gradient A·w·∇log π_θ
    (PPO's clip drops clipped tokens' gradients entirely). C = cispo_cap (TRL's epsilon_high, which
    for cispo is an absolute cap; ScaleRL/TRL recommend 5). Shapes as `clip_objective`; flags:
    `clip_frac_high` (ρ > C, A > 0: TRL's `cispo_clip_ratio`) and `clip_frac_low` (ρ > C, A < 0).
    """
    capped = ratio.detach() > cispo_cap
    weight = torch.clamp(ratio, max=cispo_cap).detach()
    pg = -weight * advantages * logp
    return pg, {"clip_frac_low": capped & (advantages < 0), "clip_frac_high": capped & (advantages > 0)}


# ---------------------------------------------------------------- train–rollout mismatch

@IS_LEVELS.register("token")
def token_is_log_ratio(diff: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """log w_t = log π_old(o_t) − log π_rollout(o_t), one weight per token. `[N, T]` -> `[N, T]`."""
    return diff


@IS_LEVELS.register("sequence")
def sequence_is_log_ratio(diff: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """log w_i = Σ_t m_it (log π_old − log π_rollout): the sequence's likelihood ratio (a product,
    not GSPO's geometric mean: the correction is for the distribution the whole sequence came
    from), one weight per sequence (TRL `sequence_*`). `[N, T]` -> `[N, 1]`."""
    return (diff * keep).sum(-1, keepdim=True)


@IS_MODES.register("truncate")
def truncate_weights(ratio: torch.Tensor, cap: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated IS (TIS): w = min(ratio, C). Returns weights and `truncated_frac` flags (ratio > C)."""
    return ratio.clamp(max=cap), {"truncated_frac": ratio > cap}


@IS_MODES.register("mask")
def mask_weights(ratio: torch.Tensor, cap: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked IS (MIS): w = ratio where ratio ≤ C, else 0 (the token or sequence is dropped from the
    policy term). Returns weights and `masked_frac` flags (ratio > C)."""
    return ratio.masked_fill(ratio > cap, 0.0), {"masked_frac": ratio > cap}


def mismatch_metrics(old_logp: torch.Tensor, rollout_logp: torch.Tensor,
                     mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """How far the trainer's log-probs are from the rollout engine's, over tokens both scored.

    Args:
        old_logp: `[N, T]` log π_old from the trainer's forward pass.
        rollout_logp: `[N, T]` log π_rollout reported by the engine; NaN = unknown (left out).
        mask: `[N, T]` completion mask.
    Returns:
        `mismatch/logp_diff_mean|max` (|log π_old − log π_rollout|), `mismatch/kl` (k3 estimate of
        KL(π_rollout ‖ π_old) from the engine's samples: e^d − d − 1, d = log π_old − log π_rollout),
        `mismatch/ratio_mean|min|max` (per-token π_old/π_rollout, before any correction).
    """
    known = mask.bool() & ~torch.isnan(rollout_logp)
    rollout = torch.where(known, rollout_logp, 0.0)
    old = torch.where(known, old_logp.detach(), 0.0)
    gap = (old - rollout).abs()
    ratio = torch.exp(old - rollout)
    _, gap_max = masked_min_max(gap, known)
    r_min, r_max = masked_min_max(ratio, known)
    return {
        "mismatch/logp_diff_mean": masked_mean(gap, known),
        "mismatch/logp_diff_max": gap_max,
        "mismatch/kl": masked_mean(kl_k3(rollout, old), known),
        "mismatch/ratio_mean": masked_mean(ratio, known),
        "mismatch/ratio_min": r_min,
        "mismatch/ratio_max": r_max,
    }


def rollout_is_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, *,
                       cap: float, level: str = "token", mode: str = "truncate",
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Importance weights w ≈ π_old/π_rollout that correct for the engine's sampling distribution, detached.

    Args:
        old_logp: `[N, T]` log π_old from the trainer's own forward pass.
        rollout_logp: `[N, T]` log π_rollout reported by the engine; NaN = unknown (ratio 1).
        mask: `[N, T]` completion mask; masked positions contribute ratio 1 (log 0).
        cap: C (verl's rollout_is_threshold example: 2; TRL's vllm_importance_sampling_clip_max: 3).
        level: a name in IS_LEVELS (token: w_t; sequence: one w_i for all of sequence i's tokens).
        mode: a name in IS_MODES (truncate: min(w, C); mask: 0 where w > C).
    Returns:
        weights `[N, T]` or `[N, 1]`, and `rollout_is/*` metrics over unmasked tokens (or sequences):
        weight_mean|min|max after the cap, and truncated_frac or masked_frac.
    """
    keep = mask.bool()
    diff = torch.nan_to_num((old_logp - rollout_logp).detach().masked_fill(~keep, 0.0), nan=0.0)
    ratio = torch.exp(IS_LEVELS.get(level)(diff, keep))
    weights, flags = IS_MODES.get(mode)(ratio, cap)
    wkeep = level_mask(weights, keep)
    w_min, w_max = masked_min_max(weights, wkeep)
    metrics = {"rollout_is/weight_mean": masked_mean(weights, wkeep), "rollout_is/weight_min": w_min,
               "rollout_is/weight_max": w_max}
    metrics.update({f"rollout_is/{k}": masked_mean(v.to(weights.dtype), wkeep) for k, v in flags.items()})
    return weights, metrics


# ----------------------------------------------------------------------------------- the loss

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
    objective: str = "clip",
    ratio_level: str = "token",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    clip_ratio_c: float | None = None,
    cispo_cap: float = 5.0,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    kl_ratio_correction: bool = False,
    is_cap: float | None = None,
    is_level: str = "token",
    is_mode: str = "truncate",
    max_completion_length: int | None = None,
    num_items_in_batch: torch.Tensor | float | None = None,
    num_micro_batches: int = 1,
    world_size: int = 1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of one micro-batch and its `actor/*` (and `mismatch/*`, `rollout_is/*`) metrics.

    Args:
        logp: `[N, T]` log π_θ of the completion tokens, with grad (`align.grpo.logprobs`).
        old_logp: `[N, T]` log π_old, detached; None = on-policy (μ = 1): logp.detach() is used.
        advantages: `[N]` per completion (or `[N, T]` per token).
        mask: `[N, T]` 1 on tokens that count (completion through EOS, minus anything masked out).
        ref_logp: `[N, T]` log π_ref; needed only when beta != 0.
        rollout_logp: `[N, T]` log-probs the rollout engine reported (NaN = none): always measured
            (`mismatch/*`), used as a correction only with is_cap.
        entropy: `[N, T]` per-token entropy, for the `actor/entropy` metric only.
        aggregation: a name in LOSS_AGGREGATIONS (grpo, bnpo, dr_grpo, dapo).
        objective: a name in POLICY_OBJECTIVES (clip, cispo).
        ratio_level: a name in RATIO_LEVELS (token; sequence = GSPO).
        epsilon_low, epsilon_high: clip range [1 − ε_low, 1 + ε_high] of the ratio (DAPO: 0.2, 0.28).
        clip_ratio_c: dual-clip bound c for A < 0 (verl: 3); None = off. For c > 1 + ε_high this is
            exactly TRL's two-sided clip `delta` = c (INTELLECT-2).
        cispo_cap: C of the cispo objective (absolute; TRL's epsilon_high for cispo, recommended 5).
        beta: KL coefficient (DeepSeekMath 0.04; 0 = no KL term and no reference model needed).
        kl_estimator: a name in KL_ESTIMATORS.
        kl_ratio_correction: multiply KL_t by ρ so its gradient is the unbiased reverse-KL
            gradient (DeepSeek-V3.2; TRL `use_bias_correction_kl`).
        is_cap, is_level, is_mode: rollout correction, see `rollout_is_weights`; is_cap None = off.
        max_completion_length, num_items_in_batch, num_micro_batches, world_size: normalisers, see
            the module docstring; each aggregation uses the ones it needs.
    Returns:
        scalar loss (see module docstring for what summing it means), metrics of detached scalars.
    """
    if beta != 0.0 and ref_logp is None:
        raise AlignError(f"beta={beta} needs reference log-probs (ref_logp); set beta: 0 to train "
                         "without a reference model")
    if is_cap is not None and rollout_logp is None:
        raise AlignError("importance_sampling is set but the batch has no rollout log-probs; use a rollout "
                         "engine that returns logprobs, or remove importance_sampling to disable the correction")
    aggregate = LOSS_AGGREGATIONS.get(aggregation)
    pg_fn = POLICY_OBJECTIVES.get(objective)
    log_ratio_fn = RATIO_LEVELS.get(ratio_level)
    keep = mask.bool()
    mask = mask.to(logp.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    # padded positions read log-prob 0 everywhere: ratio exactly 1, KL exactly 0, so whatever the
    # model put there (even -inf) cannot turn into inf * 0 = NaN, forwards or backwards
    logp = logp.masked_fill(~keep, 0.0)
    old_logp = logp.detach() if old_logp is None else old_logp.masked_fill(~keep, 0.0)
    ratio = torch.exp(log_ratio_fn(logp - old_logp, mask))  # ρ_t [N, T] or s_i [N, 1]
    per_token, flags = pg_fn(ratio, logp, advantages, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                             clip_ratio_c=clip_ratio_c, cispo_cap=cispo_cap)

    metrics: dict[str, torch.Tensor] = {}
    if rollout_logp is not None:
        metrics.update(mismatch_metrics(old_logp, rollout_logp, keep))
    if is_cap is not None:
        weights, is_metrics = rollout_is_weights(old_logp, rollout_logp, keep, cap=is_cap, level=is_level,
                                                 mode=is_mode)
        per_token = per_token * weights
        metrics.update(is_metrics)
    if ref_logp is not None:
        kl = KL_ESTIMATORS.get(kl_estimator)(logp, ref_logp.masked_fill(~keep, 0.0))
        if kl_ratio_correction:
            kl = kl * ratio
        if beta != 0.0:
            per_token = per_token + beta * kl
        metrics["actor/kl"] = masked_mean(kl.detach(), mask)

    loss = aggregate(per_token.expand_as(mask), mask, max_completion_length=max_completion_length,
                     num_items_in_batch=num_items_in_batch, num_micro_batches=num_micro_batches,
                     world_size=world_size)

    flags["clip_frac_region"] = flags["clip_frac_low"] | flags["clip_frac_high"]
    ratio_d = ratio.detach()
    rkeep = level_mask(ratio_d, keep)
    r_min, r_max = masked_min_max(ratio_d, rkeep)
    metrics["actor/loss"] = loss.detach()
    metrics.update({f"actor/{k}": masked_mean(v.to(mask.dtype), level_mask(v, keep)) for k, v in flags.items()})
    metrics.update({"actor/ratio_mean": masked_mean(ratio_d, rkeep), "actor/ratio_min": r_min,
                    "actor/ratio_max": r_max})
    if entropy is not None:
        metrics["actor/entropy"] = masked_mean(entropy.detach(), mask)
    return loss, metrics


def loss_options(stage) -> dict[str, Any]:
    """`policy_loss` keyword arguments from a GRPO stage's recipe keys: the one place where a loss
    key of the recipe (align/recipe/schema.py `GRPOStage`) becomes an argument of the maths."""
    is_cfg = stage.importance_sampling
    return {"aggregation": stage.loss_type, "objective": stage.policy_objective,
            "ratio_level": stage.importance_sampling_level, "epsilon_low": stage.epsilon_low,
            "epsilon_high": stage.epsilon_high, "clip_ratio_c": stage.clip_ratio_c, "cispo_cap": stage.cispo_cap,
            "beta": stage.beta if stage.kl_mode == "loss" else 0.0, "kl_estimator": stage.kl_estimator,
            "kl_ratio_correction": stage.kl_ratio_correction,
            "is_cap": None if is_cfg is None else is_cfg.cap, "is_level": "token" if is_cfg is None else is_cfg.level,
            "is_mode": "truncate" if is_cfg is None else is_cfg.mode,
            "max_completion_length": stage.sampling.max_new_tokens}
