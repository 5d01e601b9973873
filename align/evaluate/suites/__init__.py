"""Evaluation suites, found by name (`SUITES`) or as a user YAML file (`--suite my_suite.yaml`).

A suite is an object with a `name`, the set of its metrics where lower is better, and
`run(ckpt, ctx) -> {metric: value}`. Add one by writing a module with a class of that shape and
listing it in `SUITES` (imported lazily, so unused suites cost nothing).
"""

from __future__ import annotations

import difflib
import importlib
from pathlib import Path
from typing import Protocol

from align.errors import AlignError
from align.evaluate.checkpoints import Checkpoint
from align.evaluate.context import EvalContext, EvalOptions

SUITES: dict[str, str] = {
    "math": "align.evaluate.suites.verifiable:MathSuite",
    "code": "align.evaluate.suites.verifiable:CodeSuite",
    "reward": "align.evaluate.suites.reward:RewardSuiteEval",
    "safety": "align.evaluate.suites.safety:SafetySuite",
    "loss": "align.evaluate.suites.loss:LossSuite",
}


class Suite(Protocol):
    name: str
    lower_is_better: frozenset[str]

    def run(self, ckpt: Checkpoint, ctx: EvalContext) -> dict[str, float]:
        """Metric name -> value for one checkpoint."""
        ...


def build_suite(name: str, options: EvalOptions) -> Suite:
    """A built-in suite by name, or a user suite from a YAML file; checks its inputs before any
    model loads."""
    if name.endswith((".yaml", ".yml")) or Path(name).is_file():
        from align.evaluate.suites.user import UserSuite

        return UserSuite.from_file(Path(name), options)
    if name not in SUITES:
        close = difflib.get_close_matches(name, SUITES, n=1)
        raise AlignError(f"unknown suite {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                         + f" Suites: {', '.join(SUITES)}, or a YAML file (see docs/evaluation.md)")
    module, _, attr = SUITES[name].partition(":")
    return getattr(importlib.import_module(module), attr)(options)
