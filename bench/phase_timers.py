"""Timers the benchmarks wrap around a peer's methods (TRL's), so its step splits into the same
phases as align's logged `time/*` metrics."""

from __future__ import annotations

import time
from contextlib import contextmanager


class ExclusiveTimers:
    """Wall time per phase, nested timers subtracted from the enclosing one (a logprob pass inside
    `compute_loss` is counted once)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._stack: list[list] = []  # [phase, start, time spent in children]

    @contextmanager
    def __call__(self, phase: str):
        self._stack.append([phase, time.perf_counter(), 0.0])
        try:
            yield
        finally:
            phase, start, children = self._stack.pop()
            spent = time.perf_counter() - start
            self.times[phase] = self.times.get(phase, 0.0) + spent - children
            if self._stack:
                self._stack[-1][2] += spent

    def wrap(self, obj, name: str, phase) -> None:
        """Time every call of `obj.name` as `phase` (a string, or a function of nothing giving one)."""
        inner = getattr(obj, name)

        def timed(*a, **k):
            with self(phase() if callable(phase) else phase):
                return inner(*a, **k)

        setattr(obj, name, timed)


def trl_step_profile(timers: ExclusiveTimers, phases: tuple[str, ...], steps: list[dict], count) -> object:
    """A transformers `TrainerCallback` that appends one row per optimizer step to `steps`: `s` =
    wall time since the previous step ended (so the data loader, collation and logging are in
    it), the `phases` timed by `timers` (the optimizer by the callback itself, clipping included
    when `_clip_grad_norm` is wrapped), `other` = the rest, and `count()` (tokens) of the step."""
    from transformers import TrainerCallback

    class StepProfile(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.last = time.perf_counter()
            timers.times.clear()

        def on_pre_optimizer_step(self, *a, **k):
            self.opt = time.perf_counter()

        def on_optimizer_step(self, *a, **k):
            timers.times["optimizer"] = timers.times.get("optimizer", 0.0) + time.perf_counter() - self.opt

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            row = {p: timers.times.get(p, 0.0) for p in phases if p != "other"}
            row["other"] = now - self.last - sum(row.values())
            steps.append({"s": now - self.last, "tokens": count(), **row})
            self.last = now
            timers.times.clear()

    return StepProfile()
