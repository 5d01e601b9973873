"""Run one reward function so that its failures cost samples, not the run.

A call that raises, times out, returns the wrong number of values or non-finite values is
*isolated*: the affected samples get the component's fallback, the count and the first traceback
are logged and returned, and training goes on. When a function's failure share passes
`max_failure_rate` (cumulative, or over the last `failure_window` samples) the run stops with an
AlignError naming the function and its first traceback: a reward that is mostly broken would
silently train on fallbacks otherwise.

Timeouts run the call in a daemon worker thread and stop waiting; Python cannot kill a thread, so a
function that never returns keeps its thread (code execution is killed for real by the sandbox).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import threading
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from align.errors import AlignError
from rewards.contract import Reward

log = logging.getLogger(__name__)


@dataclass
class CallResult:
    """What one isolated batch call produced."""

    values: list[Reward]  # one per sample; failures replaced by the fallback
    failures: int  # samples that got the fallback
    error: str | None  # traceback or message of the first failure in this call


class FailureBudget:
    """Counts failed samples of one function and says when the share is past the limit."""

    def __init__(self, max_rate: float, window: int | None, min_samples: int):
        self.max_rate, self.min_samples = max_rate, min_samples
        self._outcomes: deque[bool] = deque(maxlen=window)

    def record(self, failed: Sequence[bool]) -> None:
        self._outcomes.extend(failed)

    @property
    def rate(self) -> float:
        return sum(self._outcomes) / len(self._outcomes) if self._outcomes else 0.0

    def exceeded(self) -> bool:
        return len(self._outcomes) >= self.min_samples and self.rate > self.max_rate


class TimedOut(Exception):
    """The function did not return within its timeout."""


def call_with_timeout(fn: Callable[..., Any], kwargs: dict[str, Any], timeout_s: float | None) -> Any:
    """Call `fn(**kwargs)`, awaiting it when it is a coroutine; give up waiting after `timeout_s`.

    Without a timeout a sync function runs in the caller's thread (math-verify's signal-based timeout
    then still works in the main thread); async functions and timed calls go to a daemon thread.
    """
    if timeout_s is None and not inspect.iscoroutinefunction(fn):
        return _resolve(fn(**kwargs))
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["value"] = _resolve(fn(**kwargs))
        except BaseException as exc:  # re-raised in the caller below
            box["error"] = exc

    worker = threading.Thread(target=work, name=f"reward-{getattr(fn, '__name__', 'fn')}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise TimedOut(f"no result after {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _resolve(value: Any) -> Any:
    return asyncio.run(value) if inspect.isawaitable(value) else value


class IsolatedReward:
    """A reward function wrapped with timeout, fallback and a failure budget."""

    def __init__(self, fn: Callable[..., list[Reward]], name: str, *, fallback: float = 0.0,
                 timeout_s: float | None = None, max_failure_rate: float = 0.5,
                 failure_window: int | None = None, failure_min_samples: int = 64):
        self.fn, self.name, self.fallback, self.timeout_s = fn, name, fallback, timeout_s
        self.budget = FailureBudget(max_failure_rate, failure_window, failure_min_samples)
        self.first_error: str | None = None

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> CallResult:
        n = len(completions)
        try:
            raw = call_with_timeout(self.fn, {"prompts": prompts, "completions": completions, **kwargs}, self.timeout_s)
            values, failed, error = self._check(raw, n)
        except Exception as exc:  # isolation is the point: any error of user code becomes a fallback
            error = f"{type(exc).__name__}: {exc}" if isinstance(exc, TimedOut) else traceback.format_exc()
            values, failed = [self.fallback] * n, [True] * n
        result = CallResult(values, sum(failed), error)
        self._account(failed, error)
        return result

    def _check(self, raw: Any, n: int) -> tuple[list[Reward], list[bool], str | None]:
        """Validate the output: right length, numbers or None, finite."""
        if raw is None or isinstance(raw, (str, bytes)) or not hasattr(raw, "__len__"):
            raise TypeError(f"reward `{self.name}` returned {type(raw).__name__}; expected a list of floats or None")
        if len(raw) != n:
            raise ValueError(f"reward `{self.name}` returned {len(raw)} values for {n} completions "
                             "(it must return exactly one per completion)")
        values: list[Reward] = []
        failed: list[bool] = []
        for value in raw:
            number = None if value is None else float(value)
            bad = number is not None and not math.isfinite(number)
            values.append(self.fallback if bad else number)
            failed.append(bad)
        error = f"reward `{self.name}` returned non-finite values for {sum(failed)} samples" if any(failed) else None
        return values, failed, error

    def _account(self, failed: list[bool], error: str | None) -> None:
        self.budget.record(failed)
        if error is None:
            return
        if self.first_error is None:
            self.first_error = error
            log.warning("reward %s failed on %d/%d samples (fallback %g):\n%s",
                        self.name, sum(failed), len(failed), self.fallback, error)
        else:
            log.warning("reward %s failed on %d/%d samples (fallback %g)", self.name, sum(failed), len(failed), self.fallback)
        if self.budget.exceeded():
            raise AlignError(
                f"reward `{self.name}` failed on {self.budget.rate:.0%} of recent samples, more than "
                f"max_failure_rate={self.budget.max_rate:g}; fix the function or raise "
                f"stages.<stage>.reward_isolation.max_failure_rate. "
                f"First failure:\n{self.first_error}")
