"""Dynamic sampling (align/grpo/dynamic_sampling.py): only groups whose rewards differ are trained,
the batch stays full, and the counts are in the metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align.data.io import write_jsonl
from align.data.prompts import PromptSet
from align.data.synth import generate
from align.grpo.dynamic_sampling import fill_batch, groups_with_spread
from align.pipeline import run_pipeline
from align.recipe.load import load_recipe
from rewards.reward_set import ScoredBatch

FIXTURES = Path(__file__).parent / "fixtures"


def test_spread_is_by_std_so_non_binary_flat_groups_go():
    # groups of 3: (0.3, 0.3, 0.3) flat but not 0/1; (0, 1, 1) spread; (None, 2, None) one value only;
    # (1, 1.05, 1) std 0.029 — above 0, below 0.05
    totals = [0.3, 0.3, 0.3, 0.0, 1.0, 1.0, None, 2.0, None, 1.0, 1.05, 1.0]
    assert groups_with_spread(totals, 3, 0.0) == [False, True, False, True]
    assert groups_with_spread(totals, 3, 0.05) == [False, True, False, False]


def _round(totals: list[float], tag: int):
    """A generation round of 2-sample groups: samples and rows tagged with the round number."""
    n = len(totals)
    rows = PromptSet([[tag, i] for i in range(n)], [f"r{tag}p{i}" for i in range(n)], {"round": [tag] * n})
    return [f"s{tag}.{i}" for i in range(n)], rows, ScoredBatch(totals, {}, {}, {"rewards/total/mean": tag})


def test_fill_batch_refills_from_later_rounds_then_tops_up():
    rounds = {0: [1, 1, 0, 1, 2, 2], 1: [3, 3, 0, 5, 4, 4], 2: [7, 7, 7, 7, 1, 0]}  # groups of 2
    calls = []

    def gen(r):
        calls.append(r)
        return _round(rounds[r], r)

    got = fill_batch(gen, groups=2, group_size=2, max_rounds=3, min_std=0.0)
    assert calls == [0, 1]  # round 0 gave one group with spread, round 1 the second
    assert got.totals == [0, 1, 0, 5] and got.samples == ["s0.2", "s0.3", "s1.2", "s1.3"]
    assert got.rows.columns["round"] == [0, 0, 1, 1] and got.reward_metrics == {"rewards/total/mean": 0}
    assert got.metrics == {"dynamic/rounds": 2.0, "dynamic/dropped_groups": 4.0, "dynamic/filled": 0.0}
    # a bound of one round: the batch is topped up with a dropped group, and says so
    short = fill_batch(gen, groups=2, group_size=2, max_rounds=1, min_std=0.0)
    assert short.totals == [0, 1, 1, 1] and short.metrics["dynamic/filled"] == 1.0


@pytest.mark.slow
def test_grpo_trains_only_groups_with_spread(tmp_path, model_dir):
    write_jsonl(generate("math", 64, seed=4, form="prompts"), tmp_path / "prompts.jsonl")
    stage = {"name": "rl", "kind": "grpo", "prompts": str(tmp_path / "prompts.jsonl"),
             "rewards": [{"name": f"{FIXTURES}/user_rewards.py:flat_on_even_answers"}],
             "group_size": 4, "prompts_per_step": 4, "per_device_batch_size": 8, "max_steps": 3, "lr": 1e-3,
             "beta": 0.0, "sampling": {"max_new_tokens": 8}, "dynamic_sampling": {"max_rounds": 8}}
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path / "run"), "model": {"path": str(model_dir)},
                                "logging": {"report_to": ["none"]}, "stages": [stage]}))
    run_pipeline(load_recipe(path))
    rows = [json.loads(line) for line in (tmp_path / "run/rl/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 3
    for r in steps:
        assert r["advantage/zero_std_frac"] == 0.0, r  # every trained group has spread
        assert r["completions/length_mean"] > 0 and r["dynamic/filled"] == 0.0
    assert sum(r["dynamic/dropped_groups"] for r in steps) > 0  # about half the prompts have even answers
