"""Non-finite gradients are skipped and counted, and a run of them stops training with a
diagnosis; non-finite rewards are treated like failed rewards (fallback + count)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from align.errors import AlignError
from align.train_utils import NonFiniteGuard, optimizer_step
from helpers.save_loop import small_model

ROOT = Path(__file__).resolve().parents[1]


def test_inf_gradients_are_skipped_counted_and_then_stop_the_run():
    from accelerate import Accelerator

    from align.recipe.load import load_recipe

    stage = load_recipe(ROOT / "recipes" / "tests" / "sft_tiny.yaml", check_files=False).stages[0]
    accelerator = Accelerator(cpu=True)
    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    poison = {"on": False}
    model.lm_head.weight.register_hook(lambda g: g * math.inf if poison["on"] else g)
    guard = NonFiniteGuard(patience=3)
    batch = torch.tensor([[1, 2, 3, 4]])

    def step(n: int, bad: bool) -> float:
        poison["on"] = bad
        model(input_ids=batch).logits.float().logsumexp(-1).mean().backward()
        return optimizer_step(accelerator, model, optimizer, scheduler, stage, guard, n)

    step(0, bad=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not math.isfinite(step(1, bad=True)) and not math.isfinite(step(2, bad=True))
    assert guard.skipped == 2 and guard.consecutive == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing applied
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(step(3, bad=False)) and guard.consecutive == 0  # a good step resets the streak
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    step(4, bad=True)
    step(5, bad=True)
    with pytest.raises(AlignError, match="non-finite for 3 steps in a row .*step 6.*lower `lr`"):
        step(6, bad=True)
    assert guard.skipped == 5


def test_nan_rewards_get_the_fallback_and_are_counted():
    from rewards.config import RewardSpec
    from rewards.reward_set import RewardSet

    suite = RewardSet([RewardSpec(name="helpers.fuzz_rewards:not_a_number", fallback=-0.5),
                         RewardSpec(name="format")])
    scored = suite(["q"] * 4, ["a", "b", "c", "d"])
    assert scored.components["not_a_number"] == [-0.5] * 4
    assert scored.metrics["rewards/not_a_number/failures"] == 4
    assert "non-finite" in scored.errors["not_a_number"]
    assert all(v is not None and math.isfinite(v) for v in scored.total)
