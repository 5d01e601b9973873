"""Runs a recipe's stages in order, resumably.

`<output_dir>/manifest.json` records, per stage: status (pending | running | stopped | done),
config hash, checkpoint paths and the summary. Running the same command again skips finished
stages, resumes an interrupted one from its `latest` checkpoint, and refuses to silently reuse a
finished stage whose config changed (the user reruns it with `--from STAGE`).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.checkpoint import forget_latest, latest_checkpoint, write_text_atomic
from align.recipe.schema import Recipe, SynthSpec
from align.errors import AlignError
from align.stage import StageContext, StageResult, StopFlag
from align.stage import TrainingInterrupted

# kind → module with `run(ctx) -> StageResult`; imported only when a stage of that kind runs.
RUNNERS = {"sft": "align.sft", "reward_model": "align.reward_model", "grpo": "align.grpo.trainer",
           "dpo": "align.dpo"}


@dataclass
class Manifest:
    path: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    synth: dict[str, str] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, output_dir: Path) -> "Manifest":
        path = output_dir / "manifest.json"
        if not path.exists():
            return cls(path)
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise AlignError(f"{path}: corrupt manifest ({exc}); delete it to start the run over") from None
        return cls(path, raw.get("stages", {}), raw.get("synth", {}), raw.get("evaluation", {}))

    def save(self, recipe: Recipe) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        order = {s.name: i for i, s in enumerate(recipe.stages)}
        stages = dict(sorted(self.stages.items(), key=lambda kv: order.get(kv[0], 1 << 30)))
        write_text_atomic(self.path, json.dumps(
            {"recipe": recipe.name, "stages": stages, "synth": self.synth, "evaluation": self.evaluation},
            indent=2) + "\n")

    def update(self, name: str, **values: Any) -> None:
        self.stages.setdefault(name, {}).update(values)


def select_stages(recipe: Recipe, only: str | None, start: str | None) -> list[str]:
    names = [s.name for s in recipe.stages]
    for flag, value in (("--only", only), ("--from", start)):
        if value is not None and value not in names:
            raise AlignError(f"{flag} {value}: no such stage; the recipe has {', '.join(names)}")
    if only:
        return [only]
    if start:
        return names[names.index(start):]
    return names


def _state():
    """The process group, created as the trainers' Accelerator(cpu=...) will see it: without
    `cpu=True` on a machine with no GPU, each launched process would believe it is alone."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _is_main() -> bool:
    return _state().is_main_process


def _wait() -> None:
    _state().wait_for_everyone()


def prepare_inputs(recipe: Recipe, manifest: Manifest, console) -> None:
    """Build the tiny model and the synthetic data files the recipe asks for (main process only)."""
    if _is_main():
        model = recipe.model
        if model.tiny is not None and not (Path(model.path) / "config.json").exists():
            from align.models.tiny import build_tiny

            console.print(f"building tiny {model.tiny.arch} model ({model.tiny.size}) → {model.path}")
            build_tiny(model.path, size=model.tiny.size, arch=model.tiny.arch, seed=model.tiny.seed)
        for spec in recipe.synth:
            _synth(spec, manifest, console)
        manifest.save(recipe)
    _wait()


def _synth(spec: SynthSpec, manifest: Manifest, console) -> None:
    from align.data.io import write_jsonl
    from align.data.synth import generate

    key = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:16]
    if Path(spec.out).exists() and manifest.synth.get(spec.out) == key:
        return
    n = write_jsonl(generate(spec.kind, spec.n, spec.seed, form=spec.form, safety_share=spec.safety_share,
                             max_operand=spec.max_operand, worked_share=spec.worked_share), spec.out)
    manifest.synth[spec.out] = key
    console.print(f"synthesised {n} {spec.kind} rows → {spec.out}")


def resolve_init(recipe: Recipe, manifest: Manifest, init: str) -> Path:
    if init == "model":
        return Path(recipe.model.path)
    if init in {s.name for s in recipe.stages}:
        entry = manifest.stages.get(init, {})
        if entry.get("status") != "done":
            raise AlignError(f"stage {init!r} has not finished, so nothing can start from it; "
                             f"run it first (align train RECIPE --from {init})")
        return Path(entry["final"])
    return Path(init)


def run_pipeline(recipe: Recipe, only: str | None = None, start: str | None = None,
                 console=None) -> dict[str, StageResult]:
    from rich.console import Console

    from align.run_summary import print_stage_summary, print_run_summary, plot_stage

    console = console or Console()
    out = Path(recipe.output_dir)
    manifest = Manifest.load(out)
    selected = select_stages(recipe, only, start)
    forced = set(selected) if (only or start) else set()
    stop = StopFlag()
    stop.install()  # before anything slow, so a Ctrl-C is always a clean stop
    prepare_inputs(recipe, manifest, console)
    if stop.requested:
        raise AlignError("stopped before the first stage; run the same command again to start")
    results: dict[str, StageResult] = {}
    for name in selected:
        stage = recipe.stage(name)
        digest = recipe.stage_hash(name)
        entry = manifest.stages.get(name, {})
        if entry.get("status") == "done" and name not in forced:
            if entry.get("config_hash") != digest:
                raise AlignError(
                    f"stage {name!r} finished with a different config (hash {entry.get('config_hash')} "
                    f"≠ {digest}). Its checkpoint no longer matches the recipe: rerun it and the "
                    f"stages after it with `--from {name}`, or restore the old settings.")
            if _is_main():
                console.print(f"[dim]stage {name}: done, skipping ({entry['final']})[/]")
            continue
        stage_dir = out / name
        resume = None
        if entry.get("config_hash") == digest and entry.get("status") in ("running", "stopped") \
                and name not in forced:
            resume = latest_checkpoint(stage_dir)
        if resume is None and _is_main():
            forget_latest(stage_dir)
        ctx = StageContext(recipe=recipe, stage=stage, stage_dir=stage_dir,
                           init_model=resolve_init(recipe, manifest, stage.init),
                           resume_from=resume, stop=stop)
        # every rank keeps the manifest in memory (later stages resolve `init` from it); main writes it
        manifest.update(name, status="running", kind=stage.kind, config_hash=digest, processes=_state().num_processes,
                        started=time.strftime("%Y-%m-%dT%H:%M:%S"))
        if _is_main():
            manifest.save(recipe)
            console.rule(f"stage {name} ({stage.kind})" + (f" — resuming from {resume.name}" if resume else ""))
        try:
            result = importlib.import_module(RUNNERS[stage.kind]).run(ctx)
        except TrainingInterrupted:
            if _is_main():
                manifest.update(name, status="stopped", checkpoint=str(latest_checkpoint(stage_dir)))
                manifest.save(recipe)
            raise
        manifest.update(name, status="done", final=str(result.final), summary=result.summary,
                        finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        if _is_main():
            manifest.save(recipe)
            print_stage_summary(console, name, result.summary)
            plot_stage(stage_dir)
        results[name] = result
    _evaluate_run(recipe, manifest, console)
    if _is_main():
        print_run_summary(console, manifest.stages, manifest.evaluation)
    return results


def _evaluate_run(recipe: Recipe, manifest: Manifest, console) -> None:
    """The recipe's `evaluate:` section, once every stage it needs is done (main process; the
    others wait). Skipped when its settings and stages are unchanged since it last ran."""
    from align.evaluate.after_run import evaluation_hash, ready, run_evaluation

    if not ready(recipe, manifest.stages):
        return
    digest = evaluation_hash(recipe, manifest.stages)
    if _is_main():
        if manifest.evaluation.get("config_hash") == digest and manifest.evaluation.get("status") == "done":
            console.print(f"[dim]evaluation: done, skipping ({manifest.evaluation['report']})[/]")
        else:
            manifest.evaluation = {**run_evaluation(recipe, manifest.stages, console), "config_hash": digest}
            manifest.save(recipe)
    _wait()
