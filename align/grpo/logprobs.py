"""Per-token log π(o_t | q, o_<t) and entropy of completions, the quantities every GRPO term uses.

Sampling used `temperature`, so the policy being optimised is softmax(logits / temperature): the
same scaling must be applied here, or the ratio π_θ/π_old compares two different distributions
(TRL's `selective_log_softmax(logits, index, temperature)` and vLLM's logprobs both do this).

Memory: a `[N, T, V]` log_softmax kept for backward doubles the logits' footprint. For float32
logits the log-prob is computed as `gather(x) − logsumexp(x)` one sequence at a time, whose
backward keeps nothing bigger than the logits (TRL's trick). Half-precision logits are upcast one
sequence at a time, because logsumexp in bf16 loses the digits the ratio needs. Entropy is a
metric, so it is computed without a graph.

fp32 LM head (`fp32_lm_head`, ScaleRL arXiv:2510.13786; TRL `cast_lm_head_to_fp32`): upcasting bf16
logits afterwards cannot restore what the bf16 matmul rounded away (a logit of 10 has a bf16 step of
1/16), one source of the trainer–engine log-prob gap. With it on, the head's
matmul itself runs in float32 (`F.linear(h.float(), W.float())`, gradient flowing back to the bf16
weight), for the duration of the call only: the model's weights are not changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

from align.errors import AlignError


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                   with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each target token under softmax(logits / temperature), and the entropy there.

    Args:
        logits: `[N, T, V]`, position t scores the token at t (already shifted).
        targets: `[N, T]` long, the token ids whose log-prob is wanted.
        temperature: the sampling temperature (> 0).
        with_entropy: also return the per-token entropy (nats, detached).
    Returns:
        logp `[N, T]` (float32, or float64 for float64 logits; differentiable),
        entropy `[N, T]` float32 detached, or None.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logp_rows, ent_rows = [], []
    for row, tgt in zip(logits, targets, strict=True):  # one sequence at a time: bounded peak memory
        row = row if row.dtype in (torch.float32, torch.float64) else row.float()
        if temperature != 1.0:
            row = row / temperature
        logp_rows.append(row.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(row, dim=-1))
        if with_entropy:
            with torch.no_grad():
                lp = F.log_softmax(row, dim=-1)
                ent_rows.append(-(lp.exp() * lp).sum(-1).float())
    return torch.stack(logp_rows), (torch.stack(ent_rows) if with_entropy else None)


@contextmanager
def lm_head_in_fp32(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, `model`'s output projection computes its logits in float32.

    The head's forward is swapped for `F.linear(h.float(), W.float(), b.float())` and restored on
    exit. A LoRA-wrapped head is refused: its adapter would be skipped.
    """
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    head = inner.get_output_embeddings()
    if head is None or not hasattr(head, "weight") or hasattr(head, "base_layer"):
        raise AlignError("fp32_lm_head: the model's output head is missing or carries a LoRA adapter "
                         "(lora.target_modules includes lm_head); drop lm_head from the adapter's targets "
                         "or set fp32_lm_head: false")
    previous = head.__dict__.get("forward")

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        bias = None if head.bias is None else head.bias.float()
        return F.linear(hidden.float(), head.weight.float(), bias)

    head.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous


def completion_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        *, completion_length: int, temperature: float = 1.0,
                        micro_batch_size: int | None = None, with_entropy: bool = True,
                        fp32_lm_head: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a causal LM on prompt+completion and score the last `completion_length` tokens.

    Only the logits that predict completion tokens are materialised (`logits_to_keep`). Positions
    where `attention_mask` is 0 (padding after the completion) get log-prob 0 and entropy 0, so a
    ratio exp(logp − old_logp) there is exactly 1.

    Args:
        model: a transformers causal LM (anything taking input_ids, attention_mask, logits_to_keep).
        input_ids: `[N, P+T]` prompt (left-padded) then completion (right-padded).
        attention_mask: `[N, P+T]` 1 on real tokens.
        completion_length: T.
        temperature: sampling temperature the completions were drawn at.
        micro_batch_size: rows per forward pass (None: all at once).
        with_entropy: also return per-token entropy.
        fp32_lm_head: compute the logits with the output head in float32 (`lm_head_in_fp32`).
    Returns:
        logp `[N, T]`, entropy `[N, T]` or None.
    """
    with lm_head_in_fp32(model) if fp32_lm_head else nullcontext():
        return _completion_logprobs(model, input_ids, attention_mask, completion_length, temperature,
                                    micro_batch_size, with_entropy)


def _completion_logprobs(model, input_ids, attention_mask, completion_length: int, temperature: float,
                         micro_batch_size: int | None, with_entropy: bool):
    step = micro_batch_size or input_ids.size(0)
    logps, ents = [], []
    for start in range(0, input_ids.size(0), step):
        ids, am = input_ids[start:start + step], attention_mask[start:start + step]
        # logits at position i predict token i+1: keep T+1, drop the last
        logits = model(input_ids=ids, attention_mask=am, logits_to_keep=completion_length + 1,
                       use_cache=False).logits[:, :-1]
        logp, ent = token_logprobs(logits, ids[:, -completion_length:], temperature=temperature,
                                   with_entropy=with_entropy)
        pad = am[:, -completion_length:] == 0
        logps.append(logp.masked_fill(pad, 0.0))
        if with_entropy:
            ents.append(ent.masked_fill(pad, 0.0))
    return torch.cat(logps), (torch.cat(ents) if with_entropy else None)
