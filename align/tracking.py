"""Metrics: one JSON object per logged step in `<stage_dir>/metrics.jsonl`, mirrored to
accelerate's trackers (tensorboard; wandb when installed and asked for).

On resume the file is cut back to the checkpoint's step, so a resumed run's metrics file equals
an uninterrupted run's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, stage_dir: str | Path, accelerator=None, resume_step: int | None = None):
        self.path = Path(stage_dir) / "metrics.jsonl"
        self.accelerator = accelerator
        self.is_main = accelerator is None or accelerator.is_main_process
        if accelerator is not None and accelerator.log_with and not accelerator.trackers:
            # tensorboard event files under <stage_dir>/<stage name>/ (the accelerator's project_dir)
            accelerator.init_trackers(Path(stage_dir).name)
        if self.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is None:
                self.path.write_text("")
            else:
                self._truncate(resume_step)

    def _truncate(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.is_main:
            return
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.accelerator is not None and self.accelerator.trackers:
            numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
            self.accelerator.log(numeric, step=step)

    def close(self) -> None:
        """Flush and close the trackers. Not `accelerator.end_training()`: that also destroys the
        process group, which the pipeline's next stage still needs under `accelerate launch`."""
        if self.accelerator is not None:
            for tracker in self.accelerator.trackers:
                tracker.finish()


def _clean(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(stage_dir: str | Path) -> list[dict]:
    path = Path(stage_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
