"""Built-in rewards: their doctests, edge cases, and agreement with TRL's equivalents."""

import doctest
import importlib

import pytest

from align.errors import AlignError
from rewards.accuracy import MathAccuracy
from rewards.rules import Format, Length, Repetition, Rules
from rewards.steps import MathSteps

MODULES = ["rewards.contract", "rewards.accuracy", "rewards.steps", "rewards.rules", "rewards.code"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0


def test_math_accuracy_forms():
    completions = ["The answer is 42.", r"so $\boxed{0.5}$", r"\boxed{\frac{2}{4}}", "The answer is 41.",
                   [{"role": "assistant", "content": "The answer is 1,000."}]]
    answers = ["42", r"\frac{1}{2}", "0.5", "42", "1000"]
    assert MathAccuracy()(prompts=[""] * 5, completions=completions, answer=answers) == [1.0, 1.0, 1.0, 0.0, 1.0]


def test_math_steps_catches_the_lucky_samples_of_the_moe_sft_checkpoint():
    """Samples the MoE quickstart's SFT checkpoint wrote at T = 1 that math_accuracy scores 1.0;
    only the first shows its work truly."""
    completions = ["4 * 5 = 20. 20 - 14 = 6. The answer is 6.", "4 * 5 = 25. 14 - 14 = 6. The answer is 6.",
                   "2 * 4 = 12. 12 + 4 = 16. The answer is 16.", "25 - 7 = 14. The answer is 14.",
                   "19 - 7 = 13. The answer is 14.", "The answer is 14.", "12 / 4 = 3. 3 × 7 = 21. The answer is 21.",
                   "1.5 + 2.5 = 4. The answer is 4.0.", "7 / 0 = 0. The answer is 0."]
    assert MathSteps()(prompts=[""] * 9, completions=completions) == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    assert MathSteps(require_work=False)(prompts=[""], completions=["The answer is 14."]) == [1.0]


def test_math_accuracy_is_not_fooled_by_restating_the_question():
    """Completions the quickstart policy learned (reasoning step 200): math-verify's default evaluates
    them and calls them correct; strict scoring wants an anchored value."""
    hacks = ["7 - 0 = ", "7 - 0 =  harms the", "1 + 1 = 9. 9 - 2 = 7'.", "The answer is 7 - 0."]
    honest = ["7 - 0 = 7. The answer is 7.", "Answer: 7", r"so \boxed{7}", "The answer is 7"]
    assert MathAccuracy(strict=False)(prompts=[""] * 4, completions=hacks, answer=["7"] * 4) == [1.0] * 4
    assert MathAccuracy()(prompts=[""] * 4, completions=hacks, answer=["7"] * 4) == [0.0] * 4
    assert MathAccuracy()(prompts=[""] * 4, completions=honest, answer=["7"] * 4) == [1.0] * 4


def test_math_accuracy_solution_column_and_missing_column():
    assert MathAccuracy()(prompts=[""], completions=["The answer is 3."], solution=["3"]) == [1.0]
    with pytest.raises(ValueError, match="answer"):
        MathAccuracy()(prompts=[""], completions=["3"])


def test_format_default_requires_final_sentence():
    reward = Format()
    texts = ["x. The answer is -3.5.", "The answer is 42. Then more text", "The answer is 1,234.\n"]
    assert reward(prompts=[""] * 3, completions=texts) == [1.0, 0.0, 1.0]


def test_format_custom_pattern_and_conflict():
    assert Format(pattern=r"^\d+$")(prompts=["", ""], completions=["12", "12a"]) == [1.0, 0.0]
    with pytest.raises(AlignError, match="not both"):
        Format(pattern="x", tags=["think"])


def test_length_and_repetition_match_trl():
    from trl.rewards import get_repetition_penalty_reward, get_soft_overlong_punishment

    ids = [[1] * n for n in (10, 80, 81, 95, 100, 101, 300)]
    ours = Length(max_length=100, cache=20)(prompts=[""] * 7, completions=[""] * 7, completion_ids=ids)
    assert ours == get_soft_overlong_punishment(100, 20)(completion_ids=ids)
    token_ids = [[1, 2, 3, 1, 2, 3, 1, 2], [5] * 6, [1, 2]]
    ours = Repetition(ngram_size=3, unit="tokens")(prompts=[""] * 3, completions=[""] * 3, completion_ids=token_ids)
    assert ours == pytest.approx(get_repetition_penalty_reward(3)(completion_ids=token_ids))


def test_length_needs_ids():
    with pytest.raises(ValueError, match="completion_ids"):
        Length(max_length=10, cache=5)(prompts=[""], completions=["x"])


def test_rules_from_yaml(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("must_not_match: ['(?i)as an ai']\nrequired_keywords: [Paris]\nmax_chars: 40\nscore: all\n")
    reward = Rules(file=str(path))
    texts = ["The capital is Paris.", "As an AI, I think Paris.", "paris"]
    assert reward(prompts=[""] * 3, completions=texts) == [1.0, 0.0, 1.0]


def test_rules_errors_name_source(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("must_macth: [x]\n")
    with pytest.raises(AlignError, match="rules.yaml.*must_macth"):
        Rules(file=str(path))
    with pytest.raises(AlignError, match="does not exist"):
        Rules(file=str(tmp_path / "missing.yaml"))
