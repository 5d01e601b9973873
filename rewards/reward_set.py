"""A recipe's set of rewards, ready to score a batch: build, isolate, call, combine.

This is what the GRPO trainer and `align rewards test` call. Each component is called with TRL
GRPOTrainer's keyword arguments (`prompts`, `completions`, `completion_ids`, the dataset columns,
`trainer_state`, `log_extra`, `log_metric`), so TRL reward functions behave as under TRL.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.errors import AlignError
from rewards.combine import Combined, ComponentRule, RunningNorm, combine
from rewards.config import RewardsConfig, RewardSpec
from rewards.isolation import IsolatedReward
from rewards.registry import build


@dataclass
class ScoredBatch(Combined):
    """`Combined` plus what the functions logged and the first error of each failing component."""

    extras: dict[str, list[Any]] = field(default_factory=dict)  # log_extra columns, for the completions table
    errors: dict[str, str] = field(default_factory=dict)


class RewardSet:
    """Scores batches with every component of a recipe; keeps running-normalisation state."""

    def __init__(self, specs: Sequence[RewardSpec], config: RewardsConfig | None = None, base_dir: Path | None = None):
        if not specs:
            raise AlignError("rewards: the list is empty; add at least one reward (e.g. `- name: math_accuracy`)")
        config = config or RewardsConfig()
        keys = [s.key for s in specs]
        if duplicates := sorted({k for k in keys if keys.count(k) > 1}):
            raise AlignError(f"rewards: two components are named {duplicates}; give one an `alias`")
        self.rules = [ComponentRule(s.key, s.weight, s.normalize, s.gate, s.gate_penalty) for s in specs]
        self.when = [s.when for s in specs]
        self.functions = [
            IsolatedReward(build(s, base_dir), s.key, fallback=s.fallback, timeout_s=s.timeout_s,
                           max_failure_rate=config.max_failure_rate, failure_window=config.failure_window,
                           failure_min_samples=config.failure_min_samples)
            for s in specs]
        self.running = RunningNorm()

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any],
                 completion_ids: Sequence[Sequence[int]] | None = None, trainer_state: Any = None,
                 **columns: Sequence[Any]) -> ScoredBatch:
        extras: dict[str, list[Any]] = {}
        logged: dict[str, list[float]] = defaultdict(list)
        raw, failures, errors = {}, {}, {}
        n = len(prompts)
        batch = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **columns}
        for fn, when in zip(self.functions, self.when, strict=True):
            rows = list(range(n)) if when is None else selected_rows(fn.name, when, columns, n)
            values: list[Any] = [None] * n
            failures[fn.name] = 0
            if rows:
                whole = len(rows) == n
                part = batch if whole else {k: None if v is None else [v[i] for i in rows] for k, v in batch.items()}
                result = fn(trainer_state=trainer_state,
                            log_extra=extras.__setitem__ if whole else _scatter_into(extras, rows, n),
                            log_metric=lambda name, value: logged[name].append(float(value)), **part)
                for i, value in zip(rows, result.values, strict=True):
                    values[i] = value
                failures[fn.name] = result.failures
                if result.error:
                    errors[fn.name] = result.error
            raw[fn.name] = values
        combined = combine(self.rules, raw, self.running, failures)
        combined.metrics.update({name: sum(v) / len(v) for name, v in logged.items()})
        return ScoredBatch(**vars(combined), extras=extras, errors=errors)

    def state_dict(self) -> dict[str, Any]:
        return {"running": self.running.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.running.load_state_dict(state["running"])


def selected_rows(name: str, when: dict[str, list[Any]], columns: dict[str, Sequence[Any]], n: int) -> list[int]:
    """Rows whose columns take one of the listed values for every key of `when`."""
    for key in when:
        if key not in columns:
            raise AlignError(f"reward `{name}`: `when` reads the column {key!r}, which the prompts do not have "
                             f"(columns: {sorted(columns) or 'none'}); add it to the data or drop it from `when`")
    return [i for i in range(n) if all(columns[k][i] in allowed for k, allowed in when.items())]


def _scatter_into(extras: dict[str, list[Any]], rows: list[int], n: int):
    """`log_extra` for a call on a subset of rows: the column lands at those rows, None elsewhere,
    so the completions table stays aligned."""
    def log_extra(key: str, values: Sequence[Any]) -> None:
        full: list[Any] = [None] * n
        for i, value in zip(rows, values, strict=True):
            full[i] = value
        extras[key] = full
    return log_extra
