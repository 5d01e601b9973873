"""`math_steps`: is the arithmetic the completion shows true, and does its answer follow from it?

An outcome reward (math_accuracy) pays a right final number however it was reached. A small policy
sampled at temperature 1 reaches it by luck often enough to matter: on the MoE quickstart's SFT
checkpoint, 15 of the 35 correct samples on two-step problems wrote a false step ("4 * 5 = 25.
14 - 14 = 6. The answer is 6."). GRPO gives such a rare success in a failing group the largest
advantage of the batch, so the false equations are reinforced, and the arithmetic facts every
other problem needs are unlearned. This reward is the process check that stops that: used as a
gate on the total (`gate: 1.0, gate_penalty: 0.0`), a right answer with false work earns nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

from rewards.contract import Completion, Reward, text_of

_NUMBER = r"-?\d+(?:\.\d+)?"
# "7 * 8 = 56", "12-3=9", "6 × 7 = 42": one binary operation and its claimed result
_EQUATION = re.compile(rf"({_NUMBER})\s*([-+*×x/÷])\s*({_NUMBER})\s*=\s*({_NUMBER})(?!\d)")
_ANSWER = re.compile(rf"The answer is ({_NUMBER})")
_OPS: dict[str, Callable[[Fraction, Fraction], Fraction | None]] = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "×": lambda a, b: a * b,
    "x": lambda a, b: a * b, "/": lambda a, b: a / b if b else None, "÷": lambda a, b: a / b if b else None,
}


def steps_hold(text: str, require_work: bool = True) -> bool:
    """Every `a op b = c` in `text` is true, and the stated answer (if any) is the last result.

    >>> steps_hold("4 * 5 = 20. 20 - 14 = 6. The answer is 6.")
    True
    >>> steps_hold("4 * 5 = 25. 14 - 14 = 6. The answer is 6.")  # a false step
    False
    >>> steps_hold("2 + 2 = 4. The answer is 14.")  # the answer does not follow from the work
    False
    >>> steps_hold("The answer is 6."), steps_hold("The answer is 6.", require_work=False)
    (False, True)
    """
    equations = _EQUATION.findall(text)
    if not equations:
        return not require_work
    for left, op, right, result in equations:
        if _OPS[op](Fraction(left), Fraction(right)) != Fraction(result):
            return False
    answer = _ANSWER.search(text)
    return answer is None or Fraction(answer.group(1)) == Fraction(equations[-1][3])


class MathSteps:
    """1.0 when every arithmetic step the completion writes is true and its answer is the last
    step's result, else 0.0 (module docstring). `require_work` (default): a completion that shows
    no step scores 0.0, so skipping the work is no way around the check.

    >>> MathSteps()(prompts=["q"] * 3, completions=["6 * 7 = 42. The answer is 42.",
    ...                                            "6 * 7 = 41. The answer is 42.", "The answer is 42."])
    [1.0, 0.0, 0.0]
    """

    __name__ = "math_steps"

    def __init__(self, require_work: bool = True):
        self.require_work = require_work

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Completion], **kwargs: Any) -> list[Reward]:
        return [float(steps_hold(text_of(c), self.require_work)) for c in completions]
