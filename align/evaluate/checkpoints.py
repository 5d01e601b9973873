"""Which checkpoints to evaluate, under which labels: explicit directories or a run directory.

A run directory (one with `manifest.json`) expands to every finished policy stage's `final/`, in
recipe order, labelled by stage name. Reward-model stages are not policies: they become the
default judge of the `reward` suite instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from align.errors import AlignError


@dataclass(frozen=True)
class Checkpoint:
    label: str
    path: Path


@dataclass(frozen=True)
class Resolved:
    checkpoints: list[Checkpoint]
    judge: Path | None = None  # a run's reward model, when it has one
    from_run: bool = False


def resolve_checkpoints(paths: list[Path]) -> Resolved:
    """Expand a single run directory, or label explicit model directories."""
    if len(paths) == 1 and (paths[0] / "manifest.json").is_file():
        return from_run_dir(paths[0])
    for path in paths:
        if (path / "manifest.json").is_file():
            raise AlignError(f"{path} is a run directory; evaluate it on its own (`align eval {path}`) "
                             "or list its stages' final/ directories")
        if not (path / "config.json").is_file():
            raise AlignError(f"{path}: not a Hugging Face model directory (no config.json) and not a run "
                             "directory (no manifest.json)")
    return Resolved(_label(paths))


def from_run_dir(run_dir: Path) -> Resolved:
    manifest = run_dir / "manifest.json"
    try:
        stages: dict = json.loads(manifest.read_text()).get("stages", {})
    except json.JSONDecodeError as exc:
        raise AlignError(f"{manifest}: not valid JSON ({exc})") from None
    done = {name: entry for name, entry in stages.items() if entry.get("status") == "done" and entry.get("final")}
    policies = [Checkpoint(name, Path(e["final"])) for name, e in done.items() if e.get("kind") != "reward_model"]
    judges = [Path(e["final"]) for e in done.values() if e.get("kind") == "reward_model"]
    if not policies:
        states = ", ".join(f"{n}: {e.get('status')}" for n, e in stages.items()) or "no stages"
        raise AlignError(f"{run_dir}: no finished policy stage to evaluate ({states}); finish one with "
                         f"`align train`")
    for ckpt in policies:
        if not ckpt.path.is_dir():
            raise AlignError(f"{manifest}: stage {ckpt.label}'s final/ ({ckpt.path}) is missing; was the run moved? "
                             "Pass the model directories explicitly instead")
    return Resolved(policies, judge=judges[0] if judges else None, from_run=True)


def _label(paths: list[Path]) -> list[Checkpoint]:
    """The directory name; `<stage>` for `<stage>/final`; parent/name when names collide."""
    def short(p: Path) -> str:
        return p.parent.name if p.name == "final" and p.parent.name else p.name

    labels = [short(p.resolve()) for p in paths]
    if len(set(labels)) < len(labels):
        labels = [f"{p.resolve().parent.name}/{short(p.resolve())}" for p in paths]
    if len(set(labels)) < len(labels):
        raise AlignError(f"the same checkpoint is listed twice: {[str(p) for p in paths]}")
    return [Checkpoint(label, path) for label, path in zip(labels, paths, strict=True)]
