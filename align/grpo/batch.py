"""One GRPO step's rollouts as the tensors the loss reads.

N = number of completions (prompts × G), P = longest prompt (left-padded), T = longest
completion (right-padded). Prompts are left-padded so every completion starts at column P, which
is where `align.grpo.logprobs.completion_logprobs` reads the last T positions.
"""

from __future__ import annotations

import torch

from align.errors import AlignError
from rollout.base import Sample


def build_batch(prompt_ids: list[list[int]], samples: list[Sample], pad_id: int,
                mask_truncated: bool) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask `[N, P+T]`, completion_mask `[N, T]` (tokens through EOS; all
    zero for truncated samples when `mask_truncated`, DAPO's overlong filtering), rollout_logp
    `[N, T]` (the engine's logprobs, NaN where it gave none), truncated `[N]`."""
    n = len(samples)
    p_len = max(len(p) for p in prompt_ids)
    t_len = max(1, max(len(s.completion_ids) for s in samples))
    input_ids = torch.full((n, p_len + t_len), pad_id, dtype=torch.long)
    attention = torch.zeros((n, p_len + t_len), dtype=torch.long)
    rollout_logp = torch.full((n, t_len), float("nan"))
    for i, (prompt, s) in enumerate(zip(prompt_ids, samples, strict=True)):
        c = s.completion_ids
        input_ids[i, p_len - len(prompt):p_len] = torch.tensor(prompt)
        attention[i, p_len - len(prompt):p_len] = 1
        if c:
            input_ids[i, p_len:p_len + len(c)] = torch.tensor(c)
            attention[i, p_len:p_len + len(c)] = 1
        if s.logprobs is not None and c:
            rollout_logp[i, :len(c)] = torch.tensor(s.logprobs, dtype=torch.float32)
    truncated = torch.tensor([s.finish_reason == "length" for s in samples])
    completion_mask = attention[:, p_len:].clone()
    if mask_truncated:
        completion_mask[truncated] = 0
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion_mask,
            "rollout_logp": rollout_logp, "truncated": truncated}


def micro_batch_size(stage, world: int) -> int:
    """Rows per forward pass: `per_device_batch_size`, capped at the samples a rank trains on per
    step (so one recipe runs on 1 or N processes), after checking that whole groups stay on one
    rank and that every micro-batch weighs the same."""
    if stage.gradient_accumulation_steps != 1:
        raise AlignError(f"stages.{stage.name}.gradient_accumulation_steps: GRPO accumulates over the "
                         "whole generated batch already; set per_device_batch_size (rows per forward "
                         "pass) instead and leave gradient_accumulation_steps at 1")
    if stage.prompts_per_step % world:
        raise AlignError(f"stages.{stage.name}.prompts_per_step={stage.prompts_per_step} must be a "
                         f"multiple of the number of processes ({world}), so whole groups stay on one rank")
    local_samples = stage.prompts_per_step // world * stage.group_size
    micro = min(stage.per_device_batch_size, local_samples)
    if local_samples % micro:
        raise AlignError(f"stages.{stage.name}.per_device_batch_size={stage.per_device_batch_size} must "
                         f"divide the {local_samples} samples each process trains on per step "
                         "(prompts_per_step / processes × group_size), so every micro-batch weighs the same")
    return micro
