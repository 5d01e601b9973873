"""Combiner maths against hand-computed numbers."""

import math

import pytest

from rewards.combine import ComponentRule, Moments, RunningNorm, combine, moments


def test_weighted_sum_and_none_reweighting():
    rules = [ComponentRule("acc", 1.0), ComponentRule("fmt", 0.5)]
    raw = {"acc": [1.0, 0.0, None, None], "fmt": [1.0, 1.0, 0.0, None]}
    out = combine(rules, raw)
    # sample 2: only fmt applies -> 0.5*0.0 * 1.5/0.5 = 0; sample 1: 0 + 0.5 = 0.5; sample 3: nothing applies
    assert out.total == [1.5, 0.5, 0.0, None]
    out = combine(rules, {"acc": [None], "fmt": [1.0]})
    assert out.total == [pytest.approx(1.5)]  # 0.5 * 1.0 * (1.5 / 0.5)


def test_batch_zscore_population_std():
    out = combine([ComponentRule("a", 2.0, normalize="batch")], {"a": [1.0, 3.0, None]})
    # mean 2, population std 1 -> z = [-1, 1]; total = 2 * z
    assert out.normalized["a"][:2] == pytest.approx([-1.0, 1.0], abs=1e-5)
    assert out.total[:2] == pytest.approx([-2.0, 2.0], abs=1e-5) and out.total[2] is None


def test_gate_caps_total():
    rules = [ComponentRule("helpful", 1.0), ComponentRule("safety", 1.0, gate=0.0, gate_penalty=-1.0)]
    out = combine(rules, {"helpful": [3.0, 3.0, -3.0], "safety": [0.5, -0.1, -0.1]})
    assert out.total == [3.5, -1.0, -3.1]  # gated: min(2.9, -1) and min(-3.1, -1)
    assert out.metrics["rewards/gated_share"] == pytest.approx(2 / 3)


def test_metrics():
    out = combine([ComponentRule("a")], {"a": [1.0, 3.0, None, None]}, failures={"a": 1})
    m = out.metrics
    assert (m["rewards/a/mean"], m["rewards/a/std"], m["rewards/a/none_share"], m["rewards/a/failures"]) == (2.0, 1.0, 0.5, 1.0)
    assert math.isnan(combine([ComponentRule("a")], {"a": [None]}).metrics["rewards/a/mean"])


def test_moments_merge_equals_whole():
    merged = moments([1.0, 2.0]).merged(moments([4.0, None, 8.0]))
    whole = moments([1.0, 2.0, 4.0, 8.0])
    assert (merged.count, merged.mean, merged.m2) == pytest.approx((whole.count, whole.mean, whole.m2))
    assert Moments().merged(whole) == whole


def test_running_norm_resume_is_exact():
    rules = [ComponentRule("a", normalize="running")]
    batches = [[1.0, 2.0], [5.0, None], [0.5, 9.0]]
    straight = RunningNorm()
    expected = [combine(rules, {"a": b}, straight).total for b in batches]
    first = RunningNorm()
    combine(rules, {"a": batches[0]}, first)
    resumed = RunningNorm()
    resumed.load_state_dict(first.state_dict())
    assert [combine(rules, {"a": b}, resumed).total for b in batches[1:]] == expected[1:]
    # second batch: running stats over [1, 2, 5] -> mean 8/3, population std sqrt(26/9)
    assert expected[1][0] == pytest.approx((5 - 8 / 3) / (math.sqrt(26 / 9) + 1e-6))


def test_when_scores_only_matching_rows_and_reweights_the_rest():
    """Llama-2-style routing: a component applies to the rows of one category; the others get None
    and the remaining components carry their total (rescaled to the full weight mass)."""
    from pathlib import Path

    from align.errors import AlignError
    from rewards.config import RewardSpec
    from rewards.reward_set import RewardSet

    fixture = str(Path(__file__).parent / "fixtures" / "user_rewards.py")
    specs = [RewardSpec(name=f"{fixture}:text_length", alias="safety_len", weight=1.0, when={"category": ["safety"]}),
             RewardSpec(name=f"{fixture}:char_diversity", alias="diversity", weight=1.0)]
    suite = RewardSet(specs)
    prompts, completions = ["p0", "p1", "p2"], ["aa", "abc", "abcd"]
    out = suite(prompts, completions, category=["helpfulness", "safety", "helpfulness"])
    assert out.components["safety_len"] == [None, 3.0, None]
    assert out.extras["seen_prompt"] == [None, "p1", None]  # called on row 1 only, logged back in place
    # rows 0 and 2: only diversity applies, rescaled by 2/1; row 1: 3 + 0.3
    assert out.total == pytest.approx([0.2, 3.3, 0.8])  # "aa" has one distinct character
    with pytest.raises(AlignError, match="column 'category', which the prompts do not have"):
        suite(prompts, completions)
