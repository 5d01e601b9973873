"""`code_tests`: run the completion's code against the sample's tests in the sandbox.

The code is the last ```python (or bare ```) fenced block of the completion, or the whole
completion when it has no fence. `tests` is Python that asserts (one string: 1.0 when code+tests
exit cleanly, else 0.0) or a list of such strings (the share that pass, each run separately).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from rewards.contract import Completion, Reward, text_of
from rewards.sandbox import Sandbox, SandboxLimits

FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> str:
    """The last fenced code block, or the text itself when there is none.

    >>> extract_code("Here:\\n```python\\ndef f():\\n    return 1\\n```\\nDone.")
    'def f():\\n    return 1\\n'
    >>> extract_code("x = 1")
    'x = 1'
    """
    blocks = FENCE.findall(text)
    return blocks[-1] if blocks else text


class CodeTests:
    """Share of the `tests` column that passes when run with the completion's code, in the sandbox.

    >>> reward = CodeTests(wall_s=5)
    >>> reward(prompts=["", ""], completions=["```python\\ndef add(a, b):\\n    return a + b\\n```",
    ...                                       "def add(a, b):\\n    return a - b"],
    ...        tests=[["assert add(1, 2) == 3", "assert add(0, 0) == 0"], "assert add(1, 2) == 3"])
    [1.0, 0.0]
    """

    __name__ = "code_tests"

    def __init__(self, wall_s: float = 10.0, memory_mb: int = 1024, workers: int | None = None):
        self.sandbox = Sandbox(SandboxLimits(wall_s=wall_s, memory_mb=memory_mb), workers=workers)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Completion],
                 tests: Sequence[str | Sequence[str] | None] | None = None, **kwargs: Any) -> list[Reward]:
        if tests is None:
            raise ValueError("code_tests needs a `tests` column (asserting Python, or a list of such strings)")
        programs: list[str] = []
        owners: list[int] = []  # which sample each program scores
        for i, (completion, sample_tests) in enumerate(zip(completions, tests, strict=True)):
            cases = [sample_tests] if isinstance(sample_tests, str) else list(sample_tests or [])
            code = extract_code(text_of(completion))
            programs += [f"{code}\n\n{case}\n" for case in cases]
            owners += [i] * len(cases)
        results = self.sandbox.run_many(programs)
        passed = [0] * len(completions)
        total = [0] * len(completions)
        for owner, result in zip(owners, results):
            total[owner] += 1
            passed[owner] += result.ok
        return [p / t if t else None for p, t in zip(passed, total)]
