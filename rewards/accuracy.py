"""`math_accuracy`: is the completion's final answer equal to the reference, by math-verify.

math-verify parses LaTeX (`\\boxed{}`, `\\frac`), plain numbers and "The answer is 42." style text
and compares the results symbolically. Its timeouts use `signal.alarm`, which only works in the
main thread, so off the main thread they are switched off and the isolation layer's thread timeout
(`timeout_s` in the recipe) bounds the call instead.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from rewards.contract import Completion, Reward, text_of


class MathAccuracy:
    """1.0 when the completion's answer matches the `answer` (or `solution`) column, else 0.0.

    Samples whose reference cannot be parsed get None (not applicable), as in TRL's accuracy_reward.

    >>> reward = MathAccuracy()
    >>> reward(prompts=["q"] * 4,
    ...        completions=["The answer is 42.", r"So \\boxed{\\frac{1}{3}}", "The answer is 7.", "no idea"],
    ...        answer=["42", r"\\frac{1}{3}", "8", "not math"])
    [1.0, 1.0, 0.0, None]
    """

    __name__ = "math_accuracy"

    def __init__(self, parsing_timeout_s: int = 5, verify_timeout_s: int = 5):
        self.parsing_timeout_s, self.verify_timeout_s = parsing_timeout_s, verify_timeout_s

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Completion], answer: Sequence[Any] | None = None,
                 solution: Sequence[Any] | None = None, **kwargs: Any) -> list[Reward]:
        from math_verify import parse, verify

        references = answer if answer is not None else solution
        if references is None:
            raise ValueError("math_accuracy needs an `answer` or `solution` column in the prompt dataset")
        on_main = threading.current_thread() is threading.main_thread()
        if not on_main:  # math-verify warns on every call when its timeout is off; we time out elsewhere
            for name in ("math_verify.parser", "math_verify.grader"):
                logging.getLogger(name).setLevel(logging.ERROR)
        parse_timeout = self.parsing_timeout_s if on_main else None
        verify_timeout = self.verify_timeout_s if on_main else None
        rewards: list[Reward] = []
        for completion, reference in zip(completions, references, strict=True):
            gold = parse(str(reference), parsing_timeout=parse_timeout)
            if not gold:
                rewards.append(None)
                continue
            predicted = parse(text_of(completion), parsing_timeout=parse_timeout)
            rewards.append(float(verify(gold, predicted, timeout_seconds=verify_timeout)))
        return rewards

