"""Router health of an MoE policy: per-layer expert load, its imbalance, and router entropy.

Why: an RL update can collapse routing (a few experts take every token) long before the reward
shows it. DeepSeek-V2 counters collapse with balance losses in pre-training; during alignment we
watch it. Pure functions on tensors, plus `RouterStats`, a hook-based collector that reads what the
routers actually chose during any forward pass (only real tokens count: padding is masked out).

Metric names (flat, for the tracker):
  moe/layer{i}/load_cv         coefficient of variation of the share of tokens per expert
  moe/layer{i}/load_max        largest share one expert receives (1/E when balanced)
  moe/layer{i}/router_entropy  mean entropy (nats) of the router's softmax per token
  moe/load_cv_mean, moe/load_cv_max, moe/load_max, moe/router_entropy_mean
i is the decoder-layer index (DeepSeek-V2's first layer is dense, so MoE layers start at 1).
"""

from __future__ import annotations

import torch

from align.moe.gates import GateHooks


def expert_load(indices: torch.Tensor, num_experts: int,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Share of routed (token, slot) assignments per expert. indices [N, k], mask [N] -> [E], sums to 1
    (all zeros when no token counts)."""
    weight = torch.ones(indices.shape[0], device=indices.device) if mask is None else mask.float()
    counts = torch.zeros(num_experts, device=indices.device)
    counts.index_add_(0, indices.reshape(-1).long(), weight.repeat_interleave(indices.shape[1]))
    total = counts.sum()
    return counts / total if total > 0 else counts


def coefficient_of_variation(load: torch.Tensor) -> torch.Tensor:
    """std / mean over experts (population std): 0 when perfectly balanced, sqrt(E-1) when one
    expert takes everything."""
    mean = load.mean()
    return load.std(correction=0) / mean if mean > 0 else torch.zeros((), device=load.device)


def router_entropy(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over counted tokens of the entropy (nats) of softmax(logits). logits [N, E], mask [N]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    per_token = -(logp.exp() * logp).sum(-1)
    if mask is None:
        return per_token.mean()
    weight = mask.float()
    return (per_token * weight).sum() / weight.sum().clamp(min=1)


def route_mismatch(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Share of expert choices in `a` absent from `b`, per token as sets (top-k order is arbitrary).
    a, b [..., k] expert ids; mask [...] selects the tokens that count. 0 = identical routing."""
    common = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).float().sum(-1)  # [...]
    missing = a.shape[-1] - common
    weight = torch.ones_like(missing) if mask is None else mask.float()
    return (missing * weight).sum() / (weight.sum() * a.shape[-1]).clamp(min=1)


def layer_metrics(label: int, logits: torch.Tensor, indices: torch.Tensor,
                  mask: torch.Tensor | None) -> dict[str, float]:
    """The per-layer metrics of one router's logits [N, E] and choices [N, k]."""
    load = expert_load(indices, logits.shape[-1], mask)
    return {f"moe/layer{label}/load_cv": float(coefficient_of_variation(load)),
            f"moe/layer{label}/load_max": float(load.max()),
            f"moe/layer{label}/router_entropy": float(router_entropy(logits, mask))}


def summarise(per_layer: dict[str, float]) -> dict[str, float]:
    """Add the across-layer summaries to per-layer metrics."""
    def values(suffix: str) -> list[float]:
        return [v for k, v in per_layer.items() if k.endswith(suffix)]

    cv, top, ent = values("/load_cv"), values("/load_max"), values("/router_entropy")
    if not cv:
        return dict(per_layer)
    return {**per_layer, "moe/load_cv_mean": sum(cv) / len(cv), "moe/load_cv_max": max(cv),
            "moe/load_max": max(top), "moe/router_entropy_mean": sum(ent) / len(ent)}


class RouterStats(GateHooks):
    """`with RouterStats(model) as stats: model(...)` then `stats.metrics()`.

    Records each router's logits and choices (detached) for the real tokens of every model call
    inside the block: `token_mask` when set (packed batches have no attention mask, so their caller
    sets it), else the call's `attention_mask`, else every token. Micro-batches and several calls
    accumulate; checkpoint recomputes are ignored.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self._mask: torch.Tensor | None = None
        self.token_mask: torch.Tensor | None = None  # the next calls' real tokens, when inputs carry no mask
        self._logits: list[list[torch.Tensor]] = [[] for _ in self.gates]
        self._indices: list[list[torch.Tensor]] = [[] for _ in self.gates]

    def on_call(self, args: tuple, kwargs: dict) -> None:
        self._mask = self.token_mask if self.token_mask is not None else kwargs.get("attention_mask")

    def on_gate(self, position: int, gate, hidden: torch.Tensor, output: tuple):
        if not self.first_in_call(position):
            return None
        logits, _, indices = output
        keep = torch.ones(hidden.shape[:-1], dtype=torch.bool, device=hidden.device)
        if self._mask is not None and self._mask.dim() == 2:  # generate: mask covers the cache too
            keep = self._mask[:, -hidden.shape[1]:].bool().to(hidden.device)  # token_mask may be on CPU
        keep = keep.reshape(-1)
        self._logits[position].append(logits.detach()[keep])
        self._indices[position].append(indices.detach()[keep])
        return None

    def metrics(self) -> dict[str, float]:
        per_layer: dict[str, float] = {}
        for position, label in enumerate(self.labels):
            if self._logits[position]:
                per_layer |= layer_metrics(label, torch.cat(self._logits[position]),
                                           torch.cat(self._indices[position]), None)
        return summarise(per_layer)


class _NoRouterStats:
    """`RouterStats`' interface that records nothing: a dense model, or a step that does not log."""

    token_mask: torch.Tensor | None = None

    def __enter__(self) -> "_NoRouterStats":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def metrics(self) -> dict[str, float]:
        return {}


def router_stats(model: torch.nn.Module, enabled: bool) -> RouterStats | _NoRouterStats:
    """`with router_stats(model, is_moe and logging) as stats: ...` then `stats.metrics()` ({} when
    off), so a training loop collects router metrics on the steps it logs without branching."""
    return RouterStats(model) if enabled else _NoRouterStats()
