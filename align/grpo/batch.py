"""`GRPOBatch`: one step's rollouts, grouped by what each field means, with its shape.

N = number of completions (B prompts × G per group), P = prompt length (left-padded),
T = completion length (right-padded). Every per-completion tensor has N as its first dimension,
which is what `index` and `split` rely on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import torch

from align.errors import AlignError


@dataclass
class GRPOBatch:
    """Rollouts of one GRPO step (OpenRLHF `Experience`-style)."""

    # --- trajectory: what was asked and what was sampled
    prompt_ids: torch.Tensor  # [N, P] long, left-padded
    prompt_mask: torch.Tensor  # [N, P] 1 on real prompt tokens
    completion_ids: torch.Tensor  # [N, T] long, right-padded
    completion_mask: torch.Tensor  # [N, T] 1 on tokens the loss counts (through the first EOS)
    # --- policy: log-probs of completion_ids[n, t] under each model (0 where completion_mask is 0)
    old_logp: torch.Tensor | None = None  # [N, T] log π_old, trainer weights at sampling time
    ref_logp: torch.Tensor | None = None  # [N, T] log π_ref, frozen reference (only when β > 0)
    rollout_logp: torch.Tensor | None = None  # [N, T] log π_rollout reported by the engine; NaN = unknown
    # --- outcome
    rewards: torch.Tensor | None = None  # [N] combined reward Σ_k c_k·r_k; NaN = unscorable
    reward_components: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [N] r_k
    advantages: torch.Tensor | None = None  # [N] A_i, from align.grpo.advantages
    # --- metadata
    group_ids: torch.Tensor | None = None  # [N] long, completions of one prompt share an id
    truncated: torch.Tensor | None = None  # [N] bool, hit the length limit before EOS
    weight_version: int = 0  # policy version that sampled these (for off-policy accounting)

    def __len__(self) -> int:
        return self.completion_ids.size(0)

    @property
    def input_ids(self) -> torch.Tensor:
        """[N, P+T] prompt then completion: what the model reads."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """[N, P+T] prompt mask then completion mask."""
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> GRPOBatch:
        """A new batch with `fn` applied to every tensor field (and every reward component)."""
        changes: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                changes[f.name] = fn(value)
            elif isinstance(value, dict):
                changes[f.name] = {k: fn(v) for k, v in value.items()}
        return replace(self, **changes)

    def index(self, idx: torch.Tensor | slice | list[int]) -> GRPOBatch:
        """The completions `idx` (a slice, index list or tensor) of every per-completion field."""
        if isinstance(idx, list):
            idx = torch.tensor(idx, dtype=torch.long)
        return self._map(lambda t: t[idx])

    def to(self, device: torch.device | str) -> GRPOBatch:
        """Every tensor moved to `device`."""
        return self._map(lambda t: t.to(device))

    def split(self, k: int, *, keep_groups: bool = False) -> list[GRPOBatch]:
        """k micro-batches of equal size, in order.

        keep_groups: every group lands whole in one micro-batch (needs `group_ids`; groups may be
        anywhere in the batch, each micro-batch lists its groups in order of first appearance).
        Equal sizes are required because the `grpo`/`bnpo`/`dr_grpo` aggregations average per
        micro-batch: unequal ones would weight completions unequally.
        """
        n = len(self)
        if k < 1 or n % k:
            raise AlignError(f"cannot split {n} completions into {k} equal micro-batches; choose a "
                             f"number of micro-batches that divides {n}")
        if not keep_groups:
            return [self.index(slice(i * (n // k), (i + 1) * (n // k))) for i in range(k)]
        if self.group_ids is None:
            raise AlignError("split(keep_groups=True) needs group_ids on the batch")
        ids = self.group_ids.tolist()
        rank = {g: i for i, g in enumerate(dict.fromkeys(ids))}  # first-appearance order
        sizes = torch.bincount(torch.tensor([rank[g] for g in ids]))
        if len(rank) % k or sizes.min() != sizes.max():
            raise AlignError(f"cannot split {len(rank)} groups (sizes {sorted(set(sizes.tolist()))}) into "
                             f"{k} micro-batches of whole, equal groups; choose k dividing {len(rank)}")
        order = torch.argsort(torch.tensor([rank[g] for g in ids]), stable=True)
        return self.index(order).split(k)  # groups now contiguous and equal: chunks fall on boundaries


def mask_after_eos(completion_ids: torch.Tensor, eos_id: int | list[int]) -> torch.Tensor:
    """`[N, T]` long mask: 1 up to and including the first EOS of each row, 0 after it.

    Rows without any EOS are all ones (a truncated completion counts in full unless
    `mask_truncated` removes it). `eos_id` may list several stop tokens.
    """
    eos = torch.isin(completion_ids, torch.as_tensor(eos_id, device=completion_ids.device))
    # number of EOS strictly before t: 0 means t is at or before the first EOS
    before = torch.cumsum(eos.long(), dim=1) - eos.long()
    return (before == 0).long()


def mask_truncated(completion_mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """Zero the whole mask of truncated completions (DAPO overlong filtering; TRL `mask_truncated_completions`).

    Args:
        completion_mask: `[N, T]`.
        truncated: `[N]` bool.
    Returns:
        `[N, T]` mask of the same dtype.
    """
    return completion_mask * (~truncated.bool()).unsqueeze(1).to(completion_mask.dtype)
