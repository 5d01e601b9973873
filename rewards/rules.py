"""Rule-based rewards: output format, DAPO overlong penalty, n-gram repetition, YAML rule sets.

Each is a picklable callable class whose constructor takes the recipe's `kwargs` (TRL's factory
pattern: closures cannot be sent to spawned workers; `__name__` is the metric key).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from align.errors import AlignError
from rewards.contract import Completion, Reward, text_of

# The quickstart's answer convention (GSM8K style): the completion ends with "The answer is <number>."
ANSWER_SENTENCE = r"The answer is -?\d[\d,]*(?:\.\d+)?\.\s*\Z"


class Format:
    """1.0 when the completion has the expected shape (regex or ordered tags), else 0.0.

    `pattern` is searched in the completion (default: it ends with "The answer is <number>.");
    `tags=["think", "answer"]` instead requires `<think>...</think>` then `<answer>...</answer>`
    and nothing else.

    >>> Format()(prompts=["q", "q"], completions=["6 * 7 = 42. The answer is 42.", "It is 42"])
    [1.0, 0.0]
    >>> Format(tags=["think"])(prompts=["q"], completions=[[{"role": "assistant", "content": "<think>hm</think> 42"}]])
    [0.0]
    >>> Format(tags=["think", "answer"])(prompts=["q"], completions=["<think>6*7</think>\\n<answer>42</answer>"])
    [1.0]
    """

    __name__ = "format"

    def __init__(self, pattern: str | None = None, tags: Sequence[str] | None = None):
        if pattern and tags:
            raise AlignError("format reward: give `pattern` or `tags` in kwargs, not both")
        if tags:
            pattern = r"\A\s*" + r"\s*".join(rf"<{t}>.*?</{t}>" for t in map(re.escape, tags)) + r"\s*\Z"
        self.pattern = re.compile(pattern or ANSWER_SENTENCE, re.DOTALL)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Completion], **kwargs: Any) -> list[Reward]:
        return [1.0 if self.pattern.search(text_of(c)) else 0.0 for c in completions]


class Length:
    """DAPO soft overlong punishment: 0 up to `max_length - cache` tokens, then linear down to -1.

    DAPO (Yu et al., 2025, arXiv:2503.14476) eq. 13, with L_max = `max_length`, L_cache = `cache`:
    R = 0 if |y| <= L_max - L_cache; ((L_max - L_cache) - |y|) / L_cache if |y| <= L_max; -1 beyond.
    Needs `completion_ids` (passed by the trainer; `align rewards test --tokenizer` computes them).

    >>> Length(max_length=100, cache=20)(prompts=[""] * 3, completions=[""] * 3,
    ...                                  completion_ids=[[1] * 50, [1] * 90, [1] * 120])
    [0.0, -0.5, -1.0]
    """

    __name__ = "length"

    def __init__(self, max_length: int, cache: int):
        if not 0 < cache <= max_length:
            raise AlignError(f"length reward: need 0 < cache <= max_length, got cache={cache}, max_length={max_length}")
        self.max_length, self.cache = max_length, cache

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Completion],
                 completion_ids: Sequence[Sequence[int]] | None = None, **kwargs: Any) -> list[Reward]:
        if completion_ids is None:
            raise ValueError("length reward needs completion_ids (token counts); pass a tokenizer")
        free = self.max_length - self.cache
        return [0.0 if len(ids) <= free else max(-1.0, (free - len(ids)) / self.cache) for ids in completion_ids]


class Repetition:
    """N-gram repetition penalty: `max_penalty * (1 - unique n-grams / all n-grams)`, in [max_penalty, 0].

    Over whitespace words by default, or over `completion_ids` with `unit="tokens"` (as TRL's
    get_repetition_penalty_reward; "Demystifying Long CoT", arXiv:2502.03373, App. C.2).

    >>> Repetition(ngram_size=2)(prompts=["", ""], completions=["a b c d", "a a a a a"])
    [0.0, -0.75]
    """

    __name__ = "repetition"

    def __init__(self, ngram_size: int = 3, max_penalty: float = -1.0, unit: Literal["words", "tokens"] = "words"):
        if max_penalty > 0 or ngram_size < 1:
            raise AlignError("repetition reward: need ngram_size >= 1 and max_penalty <= 0")
        self.ngram_size, self.max_penalty, self.unit = ngram_size, max_penalty, unit

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Completion],
                 completion_ids: Sequence[Sequence[int]] | None = None, **kwargs: Any) -> list[Reward]:
        if self.unit == "tokens":
            if completion_ids is None:
                raise ValueError("repetition reward with unit=tokens needs completion_ids")
            units = [list(ids) for ids in completion_ids]
        else:
            units = [text_of(c).split() for c in completions]
        return [self._penalty(u) for u in units]

    def _penalty(self, units: list[Any]) -> float:
        if len(units) < self.ngram_size:
            return 0.0
        ngrams = list(zip(*(units[i:] for i in range(self.ngram_size))))
        return (1 - len(set(ngrams)) / len(ngrams)) * self.max_penalty + 0.0  # +0.0: no -0.0


class RuleSet(BaseModel):
    """Checks a `rules` reward applies; every field is optional, each given one counts as one check."""

    model_config = ConfigDict(extra="forbid")

    must_match: list[str] = []
    must_not_match: list[str] = []
    required_keywords: list[str] = []
    forbidden_keywords: list[str] = []
    case_sensitive: bool = False
    json_valid: bool = False
    max_chars: int | None = None
    max_words: int | None = None
    score: Literal["share", "all"] = "share"


class Rules:
    """Share of YAML rules met (regex must/must-not match, keywords, JSON validity, max length).

    kwargs: the rule fields inline, or `file: rules.yaml` holding them.

    >>> rules = Rules(must_match=[r"\\d"], forbidden_keywords=["sorry"], max_words=5)
    >>> rules(prompts=["", ""], completions=["It is 42.", "Sorry, I cannot answer that question"])
    [1.0, 0.0]
    >>> Rules(json_valid=True)(prompts=[""], completions=['{"a": 1}'])
    [1.0]
    """

    __name__ = "rules"

    def __init__(self, file: str | None = None, **inline: Any):
        source = "kwargs"
        if file is not None:
            if inline:
                raise AlignError(f"rules reward: give `file` or inline rules, not both (got {sorted(inline)})")
            inline, source = _read_yaml(Path(file)), file
        try:
            self.rules = RuleSet(**inline)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise AlignError(f"rules reward ({source}): {problems}. Known rule fields: "
                             f"{', '.join(RuleSet.model_fields)}") from None
        flags = 0 if self.rules.case_sensitive else re.IGNORECASE
        self._must = [re.compile(p, flags | re.DOTALL) for p in self.rules.must_match]
        self._must_not = [re.compile(p, flags | re.DOTALL) for p in self.rules.must_not_match]

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Completion], **kwargs: Any) -> list[Reward]:
        return [self._score(self._checks(text_of(c))) for c in completions]

    def _checks(self, text: str) -> list[bool]:
        r = self.rules
        folded = text if r.case_sensitive else text.lower()
        fold = (lambda k: k) if r.case_sensitive else str.lower
        checks = [bool(p.search(text)) for p in self._must]
        checks += [not p.search(text) for p in self._must_not]
        checks += [fold(k) in folded for k in r.required_keywords]
        checks += [fold(k) not in folded for k in r.forbidden_keywords]
        if r.json_valid:
            checks.append(_is_json(text))
        if r.max_chars is not None:
            checks.append(len(text) <= r.max_chars)
        if r.max_words is not None:
            checks.append(len(text.split()) <= r.max_words)
        return checks

    def _score(self, checks: list[bool]) -> float:
        if not checks:
            return 1.0
        if self.rules.score == "all":
            return float(all(checks))
        return sum(checks) / len(checks)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise AlignError(f"rules reward: rule file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise AlignError(f"rules reward: {path} must hold a mapping of rule fields, got {type(data).__name__}")
    return data
