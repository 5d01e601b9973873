"""Isolation: failures become fallbacks with a logged traceback, until the failure budget is spent."""

import asyncio
import logging
import math
import threading

import pytest

from align.errors import AlignError
from rewards.accuracy import MathAccuracy
from rewards.isolation import IsolatedReward


def ok(prompts, completions, **kw):
    return [1.0] * len(completions)


def boom(prompts, completions, **kw):
    raise RuntimeError("kaboom")


def test_exception_gives_fallback_and_traceback(caplog):
    reward = IsolatedReward(boom, "boom", fallback=-0.5)
    with caplog.at_level(logging.WARNING, logger="rewards.isolation"):
        result = reward(prompts=["", ""], completions=["a", "b"])
    assert result.values == [-0.5, -0.5] and result.failures == 2
    assert "RuntimeError: kaboom" in result.error and "Traceback" in result.error
    assert "kaboom" in caplog.text


def test_timeout_and_async():
    release = threading.Event()

    def slow(prompts, completions, **kw):
        release.wait(30)
        return [1.0] * len(completions)

    result = IsolatedReward(slow, "slow", timeout_s=0.2, fallback=0.25)(prompts=[""], completions=[""])
    release.set()
    assert result.values == [0.25] and "TimedOut" in result.error

    async def judge(prompts, completions, **kw):
        await asyncio.sleep(0)
        return [0.5, None]

    assert IsolatedReward(judge, "judge")(prompts=["", ""], completions=["", ""]).values == [0.5, None]


def test_non_finite_and_wrong_length():
    result = IsolatedReward(lambda prompts, completions, **kw: [1.0, math.nan, math.inf], "nan", fallback=0.0)(
        prompts=[""] * 3, completions=[""] * 3)
    assert result.values == [1.0, 0.0, 0.0] and result.failures == 2 and "non-finite" in result.error
    short = IsolatedReward(lambda prompts, completions, **kw: [1.0], "short")(prompts=["", ""], completions=["", ""])
    assert short.failures == 2 and "returned 1 values for 2 completions" in short.error


def test_budget_exceeded_names_function_and_first_traceback():
    reward = IsolatedReward(boom, "boom", max_failure_rate=0.5, failure_min_samples=4)
    reward(prompts=[""] * 2, completions=[""] * 2)  # 2 samples seen: too few to judge
    with pytest.raises(AlignError, match=r"(?s)reward `boom` failed on 100%.*max_failure_rate=0.5.*kaboom"):
        reward(prompts=[""] * 2, completions=[""] * 2)


def test_window_forgets_old_failures():
    calls = iter([boom, ok, ok, ok, ok])
    reward = IsolatedReward(lambda **kw: next(calls)(**kw), "flaky", max_failure_rate=0.5,
                            failure_window=4, failure_min_samples=4)
    for _ in range(5):
        reward(prompts=[""] * 2, completions=[""] * 2)
    assert reward.budget.rate == 0.0  # the two failures of the first call left the window


def test_math_accuracy_in_worker_thread():
    # math-verify's signal timeouts would raise off the main thread; our reward switches them off there.
    reward = IsolatedReward(MathAccuracy(), "math_accuracy", timeout_s=60)
    result = reward(prompts=[""], completions=["The answer is 42."], answer=["42"])
    assert result.values == [1.0] and result.failures == 0
