"""Combine per-component rewards into one scalar per sample. Pure functions plus one running-stats object.

For sample i with raw component values r_ik (None = not applicable), weights w_k and the set of
applicable components A_i = {k : r_ik is not None}:

    n_ik    = r_ik                              normalize: none
            = (r_ik - mean_k) / (std_k + eps)   normalize: batch   (mean/std over the batch's applicable values)
                                                normalize: running (mean/std over all values seen so far, this batch included)
    total_i = (sum_{k in A_i} w_k n_ik) * W / W_i,   W = sum_k |w_k|,  W_i = sum_{k in A_i} |w_k|
    total_i = None                              when W_i = 0 (nothing applies)
    total_i = min(total_i, gate_penalty_k)      for every gated k with r_ik < gate_k (raw score)

So a sample that one component does not apply to is scored by the others, rescaled to the full
weight mass: its total stays on the same scale as samples where every component applies. std is the
population standard deviation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Value = float | None
EPS = 1e-6


@dataclass(frozen=True)
class ComponentRule:
    """How one component enters the total (the combiner's view of a RewardSpec)."""

    key: str
    weight: float = 1.0
    normalize: Literal["none", "batch", "running"] = "none"
    gate: float | None = None
    gate_penalty: float = -1.0


@dataclass
class Moments:
    """Count, mean and sum of squared deviations (M2) of a stream of numbers."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 0.0

    def merged(self, other: Moments) -> Moments:
        """Chan et al.'s parallel update: the moments of both streams together."""
        if not other.count:
            return self
        if not self.count:
            return other
        count = self.count + other.count
        delta = other.mean - self.mean
        return Moments(count, self.mean + delta * other.count / count,
                       self.m2 + other.m2 + delta * delta * self.count * other.count / count)


def moments(values: Iterable[Value]) -> Moments:
    """Moments of the applicable (non-None) values."""
    present = [v for v in values if v is not None]
    if not present:
        return Moments()
    mean = sum(present) / len(present)
    return Moments(len(present), mean, sum((v - mean) ** 2 for v in present))


def zscore(values: Sequence[Value], stats: Moments) -> list[Value]:
    return [None if v is None else (v - stats.mean) / (stats.std + EPS) for v in values]


class RunningNorm:
    """Running mean/std per component; `state_dict()`/`load_state_dict()` make resume exact."""

    def __init__(self) -> None:
        self.stats: dict[str, Moments] = {}

    def update(self, key: str, values: Sequence[Value]) -> Moments:
        self.stats[key] = self.stats.get(key, Moments()).merged(moments(values))
        return self.stats[key]

    def state_dict(self) -> dict[str, Any]:
        return {k: {"count": m.count, "mean": m.mean, "m2": m.m2} for k, m in self.stats.items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, float]]) -> None:
        self.stats = {k: Moments(int(m["count"]), float(m["mean"]), float(m["m2"])) for k, m in state.items()}


@dataclass
class Combined:
    """Totals and per-component values of one batch, plus metrics keyed `rewards/<key>/<stat>`."""

    total: list[Value]
    components: dict[str, list[Value]]  # raw values, as the functions returned them (after fallbacks)
    normalized: dict[str, list[Value]]
    metrics: dict[str, float] = field(default_factory=dict)


def normalize(rule: ComponentRule, values: Sequence[Value], running: RunningNorm | None) -> list[Value]:
    if rule.normalize == "batch":
        return zscore(values, moments(values))
    if rule.normalize == "running":
        if running is None:
            raise ValueError(f"component {rule.key} asks for running normalisation but no RunningNorm was given")
        return zscore(values, running.update(rule.key, values))
    return list(values)


def weighted_total(rules: Sequence[ComponentRule], normalized: Mapping[str, Sequence[Value]], i: int) -> Value:
    """Weighted sum over the applicable components of sample i, rescaled to the full weight mass."""
    full = sum(abs(r.weight) for r in rules)
    applicable = [r for r in rules if normalized[r.key][i] is not None]
    mass = sum(abs(r.weight) for r in applicable)
    if mass == 0:
        return None
    return sum(r.weight * normalized[r.key][i] for r in applicable) * full / mass


def apply_gates(rules: Sequence[ComponentRule], raw: Mapping[str, Sequence[Value]], total: list[Value]) -> list[bool]:
    """Cap totals where a gated component's raw score is below its threshold; returns which were gated."""
    gated = [False] * len(total)
    for rule in (r for r in rules if r.gate is not None):
        for i, value in enumerate(raw[rule.key]):
            if value is not None and value < rule.gate and total[i] is not None:
                total[i] = min(total[i], rule.gate_penalty)
                gated[i] = True
    return gated


def combine(rules: Sequence[ComponentRule], raw: Mapping[str, Sequence[Value]],
            running: RunningNorm | None = None, failures: Mapping[str, int] | None = None) -> Combined:
    """Normalise each component, take the re-weighted sum, apply safety gates, compute metrics."""
    n = len(next(iter(raw.values()))) if raw else 0
    normalized = {r.key: normalize(r, raw[r.key], running) for r in rules}
    total = [weighted_total(rules, normalized, i) for i in range(n)]
    gated = apply_gates(rules, raw, total)
    metrics: dict[str, float] = {}
    for rule in rules:
        stats, values = moments(raw[rule.key]), raw[rule.key]
        metrics[f"rewards/{rule.key}/mean"] = stats.mean if stats.count else math.nan
        metrics[f"rewards/{rule.key}/std"] = stats.std if stats.count else math.nan
        metrics[f"rewards/{rule.key}/none_share"] = sum(v is None for v in values) / n if n else 0.0
        metrics[f"rewards/{rule.key}/failures"] = float((failures or {}).get(rule.key, 0))
    total_stats = moments(total)
    metrics["rewards/total/mean"] = total_stats.mean if total_stats.count else math.nan
    metrics["rewards/total/std"] = total_stats.std if total_stats.count else math.nan
    metrics["rewards/gated_share"] = sum(gated) / n if n else 0.0
    return Combined(total, {k: list(v) for k, v in raw.items()}, normalized, metrics)
