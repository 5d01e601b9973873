"""The numbers of one evaluation: suites × metrics × checkpoints, with which way is better.

`results.json` holds only what the evaluation computed from its inputs (no times, no output
paths), so two runs with the same checkpoints, data and seed write identical files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.evaluate.checkpoints import Checkpoint


@dataclass
class Metric:
    higher_is_better: bool
    values: dict[str, float] = field(default_factory=dict)  # checkpoint label -> value

    def delta(self, label: str, reference: str) -> float:
        return self.values[label] - self.values[reference]

    def is_regression(self, delta: float) -> bool:
        """A change for the worse (the alignment tax when it follows an alignment stage)."""
        return delta < 0 if self.higher_is_better else delta > 0


@dataclass
class Results:
    checkpoints: list[Checkpoint]
    suites: dict[str, dict[str, Metric]] = field(default_factory=dict)  # suite -> metric name -> Metric
    meta: dict[str, Any] = field(default_factory=dict)

    def add(self, suite: str, label: str, values: dict[str, float], lower_is_better: frozenset[str]) -> None:
        metrics = self.suites.setdefault(suite, {})
        for name, value in values.items():
            metrics.setdefault(name, Metric(name not in lower_is_better)).values[label] = value

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.checkpoints]

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoints": [{"label": c.label, "path": str(c.path)} for c in self.checkpoints],
                "suites": {suite: {name: {"higher_is_better": m.higher_is_better,
                                          "values": {k: _finite(v) for k, v in m.values.items()}}
                                   for name, m in metrics.items()}
                           for suite, metrics in self.suites.items()},
                "meta": self.meta}

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")


def _finite(value: float) -> float | None:
    """NaN (no applicable sample) becomes null: JSON has no NaN."""
    return None if math.isnan(value) else value
