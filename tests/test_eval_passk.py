"""pass@k against the closed form, by hand; report deltas judged by each metric's direction."""

from __future__ import annotations

from math import comb
from pathlib import Path

import pytest

from align.evaluate.checkpoints import Checkpoint
from align.evaluate.passk import mean_pass_at_k, pass_at_k
from align.evaluate.report import BETTER, WORSE, markdown
from align.evaluate.results import Results

# n = 5 samples, c = 2 correct. pass@k = 1 - C(n-c, k) / C(n, k) = 1 - C(3, k) / C(5, k):
#   k=1: 1 - 3/5   = 2/5   = 0.4
#   k=2: 1 - 3/10  = 7/10  = 0.7
#   k=3: 1 - 1/10  = 9/10  = 0.9
#   k=4: 1 - 0/5   = 1          (C(3, 4) = 0: any 4 of 5 samples include a correct one)
#   k=5: 1 - 0/1   = 1
BY_HAND = {1: 0.4, 2: 0.7, 3: 0.9, 4: 1.0, 5: 1.0}


@pytest.mark.parametrize("k", sorted(BY_HAND))
def test_pass_at_k_matches_hand_computation(k):
    assert pass_at_k(5, 2, k) == pytest.approx(BY_HAND[k], abs=1e-12)


@pytest.mark.parametrize("n,c,k", [(10, 3, 4), (20, 0, 5), (20, 20, 7), (50, 7, 10), (7, 6, 2)])
def test_pass_at_k_equals_binomial_closed_form(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_pass_at_1_is_the_share_correct_and_mean_is_over_problems():
    verdicts = [[True, False, False, False], [True, True, True, True], [False] * 4]
    assert mean_pass_at_k(verdicts, 1) == pytest.approx((0.25 + 1 + 0) / 3)
    # problem 1 with k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
    assert mean_pass_at_k(verdicts, 2) == pytest.approx((0.5 + 1 + 0) / 3)


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(3, 1, 4)


def test_report_flags_regressions_by_metric_direction():
    ckpts = [Checkpoint("sft", Path("a")), Checkpoint("grpo", Path("b"))]
    results = Results(ckpts)
    results.add("math", "sft", {"accuracy": 0.5, "loss": 2.0}, frozenset({"loss"}))
    results.add("math", "grpo", {"accuracy": 0.7, "loss": 2.5}, frozenset({"loss"}))
    results.add("safety", "sft", {"over_refusal": 0.3}, frozenset({"over_refusal"}))
    results.add("safety", "grpo", {"over_refusal": 0.1}, frozenset({"over_refusal"}))
    text = markdown(results)
    rows = {line.split("|")[2].strip(): line for line in text.splitlines() if line.startswith("| math") or
            line.startswith("| safety")}
    assert f"+0.2000 {BETTER}" in rows["accuracy ↑"]
    assert f"+0.5000 {WORSE}" in rows["loss ↓"]  # loss went up: the alignment tax
    assert f"-0.2000 {BETTER}" in rows["over_refusal ↓"]
    tax = text.split("## Alignment tax")[1]
    assert "math/loss" in tax and "accuracy" not in tax and "over_refusal" not in tax
