"""Bounded off-policy rollouts (`max_staleness: k`): batches generated ahead of training on a
background thread, so the rollout of a later step overlaps the update of the current one.

The schedule is fixed, so results never depend on thread timing (two runs of one recipe, or a
resumed run, train on the same samples):
  - version v = the policy after v optimizer steps. The batch for step s is generated from
    version `weight_version(s, k)` = max(0, s − k), as soon as that version is on the engine;
  - the push after step t (version t + 1) first waits for every batch that needs version ≤ t (at
    most the one in flight), so no batch mixes two versions and every sample's `weight_version`
    is exact. At training its staleness is s − max(0, s − k) = min(s, k);
  - a batch is the trainer's own `rollout(step)`: prompt selection, per-sample seeds, rewards and
    dynamic sampling stay pure functions of the step;
  - jobs run one at a time in submission order (one worker thread), so the reward normaliser sees
    the batches in step order whatever the timing.
Overlap: while step t trains, batch t + k is generated. A larger k holds more batches but each
push still waits for the batch in flight: per step the time is max(generation, training) plus the
push, not their sum.

Correction: the engine's logprobs are those of the behaviour policy (version s − k) and the
trainer's π_old is the policy at step s, so `importance_sampling` (on by default when k > 0) weights
each token by min(π_old/π_rollout, C), the decoupled PPO objective AReaL (arXiv:2505.24298) uses for stale samples.

Resume: the checkpoint after step t holds the batches already generated, t … t + k (samples,
rewards, the engine's counts), taken once the batch in flight has finished. The resumed run pushes
its weights labelled version t (workers may hold a later version of the killed run, or another
run's) and trains on exactly those batches. After a SIGKILL, batches generated after the last
checkpoint are lost and generated again, from the same weights and seeds, hence identical.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from align.data.prompts import PromptSet
from align.errors import AlignError
from align.grpo.dynamic_sampling import Rollout
from align.grpo.metrics import PhaseTimer
from rollout.wire import sample_from_json, sample_to_json


def weight_version(step: int, max_staleness: int) -> int:
    """The weights the batch of `step` is generated from: the policy after max(0, step − k) steps."""
    return max(0, step - max_staleness)


def staleness_metrics(step: int, versions: list[int]) -> dict[str, float]:
    """How many policy versions behind step `step`'s trainer each sample's weights are."""
    behind = [step - v for v in versions]
    return {"staleness_max": float(max(behind)), "staleness_mean": sum(behind) / len(behind),
            "off_policy_samples": float(sum(b > 0 for b in behind))}


def refuse_processes(stage, world: int) -> None:
    """Overlap with several training processes would need every rank's queue to agree on each push."""
    if world > 1:
        raise AlignError(f"stages.{stage.name}.max_staleness: overlapped rollouts run with one training process "
                         f"for now (this run has {world}); launch one process or set max_staleness: 0")


@dataclass
class Ahead:
    """A batch generated ahead of its step, with the engine's running counts once it was made
    (logged with the step, so they do not depend on timing) and its phases' wall times."""

    step: int
    rollout: Rollout
    stats: dict[str, float]
    times: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        r = self.rollout
        return {"step": self.step, "samples": [sample_to_json(s) for s in r.samples],
                "rows": {"ids": r.rows.ids, "prompts": r.rows.prompts, "columns": r.rows.columns},
                "totals": [None if t is None else float(t) for t in r.totals],
                "reward_metrics": {k: float(v) for k, v in r.reward_metrics.items()},
                "metrics": r.metrics, "stats": self.stats, "times": self.times}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Ahead:
        rollout = Rollout([sample_from_json(s) for s in data["samples"]], PromptSet(**data["rows"]),
                          data["totals"], data["reward_metrics"], data["metrics"])
        return cls(data["step"], rollout, data["stats"], data["times"])


class RolloutQueue:
    """The batches of the steps ahead, generated on one worker thread on the schedule above.

    `rollout(step, timer)` makes one step's batch with `engine`; `weights()` gives the trainer's
    current weights (for the push that labels the engine's version when the queue starts)."""

    def __init__(self, engine, rollout: Callable[[int, PhaseTimer], Rollout], weights: Callable[[], Iterable],
                 *, max_staleness: int, total_steps: int):
        self.engine, self.rollout, self.weights = engine, rollout, weights
        self.k, self.total = max_staleness, total_steps
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-ahead")
        self.pending: dict[int, Future[Ahead]] = {}  # step -> its batch, generated or being generated
        self.next: int | None = None  # first step not scheduled yet
        self.started = False
        self.stats: dict[str, float] = {}  # the last taken batch's counts and staleness, as rollout/<key>
        self.timer = PhaseTimer()

    @classmethod
    def for_trainer(cls, trainer) -> RolloutQueue:
        from align.weights import policy_weights

        refuse_processes(trainer.stage, trainer.world)
        return cls(trainer.engine, trainer.rollout, lambda: policy_weights(trainer.policy),
                   max_staleness=trainer.stage.max_staleness, total_steps=trainer.total_steps)

    def take(self, step: int, timer: PhaseTimer) -> Rollout:
        """Step `step`'s batch (waiting for it if needed; `time/rollout_wait`); its staleness goes to `stats`."""
        self._start(step)
        self.timer = timer  # the step's phases: this wait, and the sync's
        with timer("rollout_wait"):
            ahead = self.pending.pop(step).result()
        for key, seconds in ahead.times.items():
            timer.times[key] = timer.times.get(key, 0.0) + seconds
        samples = ahead.rollout.samples
        if any(s.logprobs is None and s.weight_version < step for s in samples):
            raise AlignError("max_staleness: the rollout engine returned samples without logprobs, so the "
                             "off-policy correction cannot be applied; use an engine that returns them")
        self.stats = {**ahead.stats, **staleness_metrics(step, [s.weight_version for s in samples])}
        return ahead.rollout

    def update_weights(self, named_tensors: Iterable) -> None:
        """The sync after a step: once the batch in flight is done (`time/sync_wait` of the step
        that `take` timed), the new weights go to the engine and the batches that need them are scheduled."""
        with self.timer("sync_wait"):
            self.drain()
        self.engine.update_weights(named_tensors)
        self._schedule()

    def drain(self) -> None:
        """Wait until the worker is idle (every batch scheduled is generated); re-raises its errors."""
        for future in list(self.pending.values()):
            future.result()

    def state_dict(self) -> dict[str, Any]:
        """The batches generated ahead (those of steps t … t + k after step t − 1), once the one in
        flight is done."""
        self.drain()
        return {"batches": [self.pending[s].result().to_json() for s in sorted(self.pending)]}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        for data in (state or {}).get("batches", []):
            done: Future[Ahead] = Future()
            done.set_result(Ahead.from_json(data))
            self.pending[data["step"]] = done
        self.next = max(self.pending) + 1 if self.pending else None

    def _start(self, step: int) -> None:
        """On the first step of this run: push the trainer's weights labelled with its version (the
        workers may hold another run's weights or versions), then schedule."""
        if self.started:
            return
        version = self.engine.weight_version
        if version != step:
            raise AlignError(f"max_staleness: the engine is at weight version {version} at step {step}; "
                             "the checkpoint does not match this run")
        self.engine.weight_version = version - 1
        self.engine.update_weights(self.weights())
        self.next = step if self.next is None else self.next
        self.started = True
        self._schedule()

    def _schedule(self) -> None:
        while self.next < self.total and weight_version(self.next, self.k) <= self.engine.weight_version:
            self.pending[self.next] = self.pool.submit(self._generate, self.next)
            self.next += 1

    def _generate(self, step: int) -> Ahead:
        timer = PhaseTimer()
        rollout = self.rollout(step, timer)
        return Ahead(step, rollout, {k: float(v) for k, v in getattr(self.engine, "stats", {}).items()},
                     timer.times)
