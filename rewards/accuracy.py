"""`math_accuracy`: is the completion's final answer equal to the reference, by math-verify.

math-verify parses LaTeX (`\\boxed{}`, `\\frac`), plain numbers and "The answer is 42." style text
and compares the results symbolically. Symbolic comparison is a reward hack waiting to happen: by
default math-verify takes the last expression anywhere in the text and *evaluates* it, so a policy
that restates the question ("7 * 8 + 1 = ") is scored correct without computing anything. The
quickstart's reasoning stage learned exactly that (sampled answers at step 200: 91 of 192 correct
by math-verify's default, 22 by the check below; at the SFT checkpoint 65 and 64). So by default (`strict`) the answer must follow an anchor
("The answer is", "Answer:", `\\boxed{}`) and be a value, not an expression left to evaluate.

Its timeouts use `signal.alarm`, which only works in the main thread, so off the main thread they
are switched off and the isolation layer's thread timeout (`timeout_s` in the recipe) bounds the
call instead.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from typing import Any

from rewards.contract import Completion, Reward, text_of

# An operator between two operands: "7 - 0", "3*4", "2 ^ 5". A fraction "1/3" and a sign "-5" are values.
_UNEVALUATED = re.compile(r"[\d)}]\s*(?:[-+*^×·]|\\times|\\cdot)\s*[\d({\\]")


class MathAccuracy:
    """1.0 when the completion's answer matches the `answer` (or `solution`) column, else 0.0.

    Samples whose reference cannot be parsed get None (not applicable), as in TRL's accuracy_reward.
    `strict` (default): only an anchored value counts (module docstring); `strict=False` is
    math-verify's own default, the last expression anywhere, evaluated.

    >>> reward = MathAccuracy()
    >>> reward(prompts=["q"] * 4,
    ...        completions=["The answer is 42.", r"So \\boxed{\\frac{1}{3}}", "The answer is 7.", "no idea"],
    ...        answer=["42", r"\\frac{1}{3}", "8", "not math"])
    [1.0, 1.0, 0.0, None]
    >>> reward(prompts=["q"] * 3, completions=["7 * 8 + 1 = ", "The answer is 7 * 8 + 1.", "Answer: -57"],
    ...        answer=["57", "57", "-57"])
    [0.0, 0.0, 1.0]
    >>> MathAccuracy(strict=False)(prompts=["q"], completions=["7 * 8 + 1 = "], answer=["57"])
    [1.0]
    """

    __name__ = "math_accuracy"

    def __init__(self, parsing_timeout_s: int = 5, verify_timeout_s: int = 5, strict: bool = True):
        self.parsing_timeout_s, self.verify_timeout_s, self.strict = parsing_timeout_s, verify_timeout_s, strict

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Completion], answer: Sequence[Any] | None = None,
                 solution: Sequence[Any] | None = None, **kwargs: Any) -> list[Reward]:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

        references = answer if answer is not None else solution
        if references is None:
            raise ValueError("math_accuracy needs an `answer` or `solution` column in the prompt dataset")
        on_main = threading.current_thread() is threading.main_thread()
        if not on_main:  # math-verify warns on every call when its timeout is off; we time out elsewhere
            for name in ("math_verify.parser", "math_verify.grader"):
                logging.getLogger(name).setLevel(logging.ERROR)
        parse_timeout = self.parsing_timeout_s if on_main else None
        verify_timeout = self.verify_timeout_s if on_main else None
        anchored = {"extraction_config": [LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False),
                                          ExprExtractionConfig(try_extract_without_anchor=False)]} if self.strict else {}
        rewards: list[Reward] = []
        for completion, reference in zip(completions, references, strict=True):
            gold = parse(str(reference), parsing_timeout=parse_timeout)
            if not gold:
                rewards.append(None)
                continue
            predicted = parse(text_of(completion), parsing_timeout=parse_timeout, **anchored)
            if self.strict and predicted and _UNEVALUATED.search(predicted[-1]):
                predicted = []  # "The answer is 7 * 8 + 1.": an expression, not an answer
            rewards.append(float(verify(gold, predicted, timeout_seconds=verify_timeout)))
        return rewards

