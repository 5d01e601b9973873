"""What the pipeline hands a stage, and what a stage hands back.

Each stage kind lives in its own module with one entry point `run(ctx) -> StageResult`
(align.sft, align.reward_model, align.grpo.trainer), each a `StageTrainer` driven by the shared
loop in `align.loop`; the pipeline looks the kind up and never special-cases it.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.recipe.schema import Recipe, Stage
from align.errors import AlignError


@dataclass
class StageContext:
    recipe: Recipe
    stage: Stage
    stage_dir: Path  # <output_dir>/<stage.name>
    init_model: Path  # HF directory the stage starts from (the base model or an earlier final/)
    resume_from: Path | None = None  # a checkpoint-<step> of this stage to continue from
    stop: "StopFlag" = field(default_factory=lambda: StopFlag())

    @property
    def seed(self) -> int:
        return self.recipe.stage_seed(self.stage)

    def reward_specs(self) -> list:
        """The stage's reward components; one that names an earlier reward-model stage
        (`model: helpful_rm`) points at that stage's final/ and keeps the name as its alias."""
        names = {s.name for s in self.recipe.stages}
        out = Path(self.recipe.output_dir)
        return [s.model_copy(update={"model": str(out / s.model / "final"), "alias": s.alias or s.model})
                if s.model in names else s for s in self.stage.rewards]


@dataclass
class StageResult:
    final: Path  # <stage_dir>/final, a Hugging Face model directory
    summary: dict[str, Any]  # one-screen numbers: losses, accuracies, timings


class StopFlag:
    """Set by SIGTERM/SIGINT; training loops check it between steps, save, and exit cleanly."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, _frame) -> None:
        self.requested = True


class TrainingInterrupted(AlignError):
    """A stop was requested (SIGINT/SIGTERM); a checkpoint was written at `checkpoint`."""

    def __init__(self, stage: str, step: int, checkpoint: Path):
        self.stage, self.step, self.checkpoint = stage, step, checkpoint
        super().__init__(f"stage {stage!r} stopped at step {step}; checkpoint written to {checkpoint}. "
                         "Rerun the same command to resume from it.")
