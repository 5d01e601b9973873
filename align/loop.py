"""The one stage loop that SFT, reward-model and GRPO stages run on.

A stage kind supplies a `StageTrainer`: its model, optimizer and schedule, one optimizer step,
its held-out evaluation and its own resumable state (torchtune's recipe interface, written once
and shared instead of copied). The loop owns the rest:
  - the accelerator (with the recipe's trackers) and the stage's seed;
  - resume: optimizer, schedule and every rank's RNG (`align.checkpoint`), the loop's counters
    and the stage's state; the stage loads the checkpoint's weights itself when it builds its
    model (`align.train_utils.load_trainable_model`);
  - the metrics log, the progress bar, and the evaluation before and after training — the
    "before" numbers live in every checkpoint, so a resumed run still reports them;
  - the rules, identical for every stage: a checkpoint every `save_steps` (not at the last
    step, where `final/` follows); an evaluation every `eval_steps`; a stop request (SIGINT or
    SIGTERM) honoured after the current step by a checkpoint and `TrainingInterrupted`, except
    at the last step, where the stage simply finishes;
  - `final/` (LoRA merged when `lora.merge_on_save`) and the one-screen summary, whose time
    and first-step numbers span every resume.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from align.checkpoint import load_checkpoint, save_checkpoint, save_final
from align.errors import AlignError
from align.stage import StageContext, StageResult, TrainingInterrupted
from align.tracking import MetricsLog
from align.train_utils import NonFiniteGuard, make_accelerator


class StageTrainer:
    """What a stage kind gives the loop. Subclasses call `super().__init__`, set the model,
    optimizer, scheduler and total_steps, and implement `train_step` and `evaluate`; the other
    hooks default to "nothing extra"."""

    model: torch.nn.Module  # as returned by `accelerator.prepare`
    optimizer: Any
    scheduler: Any
    tokenizer: Any
    total_steps: int
    headline: str = "loss"  # the metric on the progress bar and first/last in the summary

    def __init__(self, ctx: StageContext, accelerator, guard: NonFiniteGuard):
        """What every stage holds: its context, accelerator, guard, and the starting model's
        tokenizer (which is what every checkpoint and final/ saves)."""
        from align.models.load import load_tokenizer

        self.ctx, self.stage, self.acc, self.guard = ctx, ctx.stage, accelerator, guard
        self.tokenizer = load_tokenizer(ctx.init_model, ctx.recipe.model.trust_remote_code)

    def train_step(self, step: int, log: bool) -> dict[str, float]:
        """One optimizer step (number `step`, counted from 0). `log` says the loop will log
        the returned metrics, so costly diagnostics (router statistics) run only then."""
        raise NotImplementedError

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out metrics of the weights after `step` optimizer steps; every rank calls it
        (it may reduce)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The stage's own resumable state (JSON-able), stored in every checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s output; called after the optimizer and RNG are restored."""

    def summary(self) -> dict[str, Any]:
        """The stage's own summary lines (data sizes, samples, ...)."""
        return {}

    def finalize(self, final: Path, eval_after: dict[str, float]) -> None:
        """Extra files next to `final/`'s weights (every rank calls it; write on the main one)."""


@dataclass
class LoopState:
    """The loop's counters, saved in every checkpoint beside the stage's own state."""

    step: int = 0
    elapsed_s: float = 0.0  # training wall time, summed over every run that resumed
    first: float | None = None  # headline metric of step 1
    last: float | None = None  # headline metric of the latest step
    last_loss: float | None = None
    eval_before: dict[str, float] = field(default_factory=dict)


Build = Callable[[StageContext, Any, NonFiniteGuard], StageTrainer]


def run_stage(ctx: StageContext, build: Build) -> StageResult:
    """Train `ctx.stage` with the trainer `build(ctx, accelerator, guard)` returns; resumable
    from `ctx.resume_from`. `guard` is the stage's non-finite-gradient guard, which the trainer
    hands to `optimizer_step` and the loop persists."""
    stage, recipe = ctx.stage, ctx.recipe
    acc = make_accelerator(stage, log_dir=ctx.stage_dir, report_to=recipe.logging.report_to)
    guard = NonFiniteGuard()
    torch.manual_seed(ctx.seed)  # model init (LoRA, score head) depends on the stage's seed only
    trainer = build(ctx, acc, guard)
    loop = LoopState()
    if ctx.resume_from is not None:
        saved = load_checkpoint(ctx.resume_from, optimizer=trainer.optimizer, scheduler=trainer.scheduler,
                                rank=acc.process_index, model=trainer.model)
        loop = LoopState(**{**saved["loop"], "step": saved["step"]})
        guard.skipped = saved["skipped_steps"]
        trainer.load_state_dict(saved["stage"])
    log = MetricsLog(ctx.stage_dir, acc, resume_step=loop.step if ctx.resume_from is not None else None)
    if ctx.resume_from is None:
        loop.eval_before = trainer.evaluate(0)
        if loop.eval_before:
            log.log(0, loop.eval_before)
    started = time.perf_counter()

    def save() -> Path:
        nonlocal started
        now = time.perf_counter()
        loop.elapsed_s, started = loop.elapsed_s + now - started, now
        state = {"loop": {k: v for k, v in asdict(loop).items() if k != "step"},
                 "skipped_steps": guard.skipped, "stage": trainer.state_dict()}
        return save_checkpoint(ctx.stage_dir, loop.step, model=trainer.model, tokenizer=trainer.tokenizer,
                               optimizer=trainer.optimizer, scheduler=trainer.scheduler, state=state,
                               accelerator=acc, keep_last=stage.keep_last)

    total = trainer.total_steps
    bar, task = _progress(acc, stage.name, total, loop.step)
    with bar:
        while loop.step < total:
            log_now = (loop.step + 1) % stage.logging_steps == 0 or loop.step + 1 == total
            metrics = trainer.train_step(loop.step, log_now)
            loop.step += 1
            loop.last, loop.last_loss = metrics.get(trainer.headline), metrics.get("loss")
            loop.first = loop.last if loop.first is None else loop.first
            if log_now:
                log.log(loop.step, metrics)
            bar.update(task, completed=loop.step, info=f"{trainer.headline} {_fmt(loop.last)}")
            if loop.step == total:
                break
            if stage.eval_steps and loop.step % stage.eval_steps == 0:
                log.log(loop.step, trainer.evaluate(loop.step))
            saved = save() if stage.save_steps and loop.step % stage.save_steps == 0 else None
            if ctx.stop.requested:
                raise TrainingInterrupted(stage.name, loop.step, saved or save())
    eval_after = trainer.evaluate(loop.step)
    if eval_after:
        log.log(loop.step, eval_after)
    loop.elapsed_s += time.perf_counter() - started
    final = save_final(ctx.stage_dir, model=trainer.model, tokenizer=trainer.tokenizer, accelerator=acc,
                       merge_lora=stage.lora.merge_on_save if stage.lora is not None else True)
    trainer.finalize(final, eval_after)
    log.close()
    if loop.last_loss is not None and not math.isfinite(loop.last_loss):
        raise AlignError(f"stage {stage.name!r} ended with a non-finite loss; lower lr or check the data")
    return StageResult(final=final, summary=_summary(loop, trainer, eval_after, guard))


def _summary(loop: LoopState, trainer: StageTrainer, eval_after: dict[str, float],
             guard: NonFiniteGuard) -> dict[str, Any]:
    head = trainer.headline
    summary: dict[str, Any] = {"steps": loop.step, f"{head} (first step)": loop.first,
                               f"{head} (last step)": loop.last}
    for key in dict.fromkeys([*loop.eval_before, *eval_after]):
        summary[f"{key} (before)"] = loop.eval_before.get(key)
        summary[f"{key} (after)"] = eval_after.get(key)
    summary.update({"skipped_steps": guard.skipped, "time_s": round(loop.elapsed_s, 1), **trainer.summary()})
    return summary


def _progress(acc, name: str, total: int, start: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   TextColumn("{task.fields[info]}"), disable=not acc.is_main_process)
    return bar, bar.add_task(name, total=total, completed=start, info="")


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"
