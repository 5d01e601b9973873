"""Per-token estimators of KL(π_θ ‖ π_ref) from the log-probs of the sampled tokens.

The true KL needs the whole vocabulary; these use only log π_θ(o_t) and log π_ref(o_t) of the token
that was sampled (from π_θ, up to the importance ratio). With d = log π_ref − log π_θ (Schulman,
"Approximating KL divergence", 2020):

- ``k1``: −d. Unbiased, high variance, can be negative.
- ``k2``: d² / 2. Biased, low variance, ≥ 0.
- ``k3``: exp(d) − d − 1. Unbiased, low variance, ≥ 0. DeepSeekMath's GRPO and TRL use this one:
  π_ref/π_θ − log(π_ref/π_θ) − 1.

All share `fn(logp, ref_logp) -> per-token KL`, shapes `[N, T]` in and out.
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
