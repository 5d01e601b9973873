"""PPO-ptx in a GRPO stage (align/grpo/ptx.py): γ × the SFT loss on conversations joins every
optimizer step. With a reward that is the same for every sample, every advantage is 0, so the RL
loss has no gradient and one GRPO step with ptx (γ = 1) must be exactly one SFT step on the same
conversations; without ptx the same step leaves the weights where they were."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from align.data.batching import target_counts
from align.data.cache import tokenized_source
from align.data.io import write_jsonl
from align.data.synth import generate
from align.errors import AlignError
from align.grpo.ptx import _Plan
from align.models.tiny import build_tiny
from align.pipeline import run_pipeline
from align.recipe.load import load_recipe
from align.sft import SFTData, forward_backward

OPTIMIZER = {"lr": 1e-3, "warmup_ratio": 0.0, "scheduler": "constant", "max_steps": 1, "per_device_batch_size": 8}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ptx")
    write_jsonl(generate("math", 8, seed=4, form="prompts"), root / "prompts.jsonl")
    write_jsonl(generate("math", 8, seed=7), root / "sft.jsonl")  # 8 conversations: step 0 takes them all
    return root, build_tiny(root / "base", size="nano")


def run(tmp_path: Path, model: Path, stage: dict) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{stage['name']}.yaml"
    path.write_text(json.dumps({"output_dir": str(tmp_path / stage["name"]), "model": {"path": str(model)},
                                "logging": {"report_to": ["none"]}, "stages": [stage]}))
    return run_pipeline(load_recipe(path))[stage["name"]].final


def grpo(root: Path, **extra) -> dict:
    # an untrained nano model never answers right: math_accuracy is 0 on every sample, so A = 0
    return {"name": "rl", "kind": "grpo", "prompts": str(root / "prompts.jsonl"), "rewards": [{"name": "math_accuracy"}],
            "group_size": 4, "prompts_per_step": 2, "beta": 0.0, "sampling": {"max_new_tokens": 8}, **OPTIMIZER,
            **extra}


def max_diff(a: Path, b: Path) -> float:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def test_a_grpo_step_with_zero_advantages_and_ptx_is_an_sft_step(tmp_path, inputs):
    root, model = inputs
    ptx = {"data": str(root / "sft.jsonl"), "coef": 1.0, "batch_size": 8, "max_seq_len": 128}
    with_ptx = run(tmp_path, model, grpo(root, ptx=ptx))
    sft = run(tmp_path, model, {"name": "sft", "kind": "sft", "data": str(root / "sft.jsonl"), "max_seq_len": 128,
                                "packing": False, **OPTIMIZER})
    without = run(tmp_path / "plain", model, grpo(root))
    assert max_diff(model, sft) > 1e-4, "the SFT step must move the weights"
    # the SFT stage shuffles its rows, so the same 8 conversations sit in another order in the batch:
    # sums differ in their last bits, which Adam's first step (≈ lr·sign g) magnifies where g ≈ 0
    assert max_diff(with_ptx, sft) < 1e-2 * max_diff(model, sft)
    assert max_diff(without, model) == 0.0, "zero advantages: the RL loss alone has no gradient"
    step = [json.loads(line) for line in (tmp_path / "rl/rl/metrics.jsonl").read_text().splitlines()
            if '"ptx/loss"' in line][0]
    assert step["advantage/zero_std_frac"] == 1.0
    sft_loss = [json.loads(line) for line in (tmp_path / "sft/sft/metrics.jsonl").read_text().splitlines()
                if '"loss"' in line][0]["loss"]
    assert step["ptx/loss"] == pytest.approx(sft_loss, rel=1e-6)  # the same mean per target token
    assert step["ptx/target_tokens"] > 0


def test_ptx_coef_scales_the_sft_gradient(inputs):
    """forward_backward(scale=γ) gives γ × the gradient of scale 1, the term GRPO adds."""
    root, path = inputs
    tok, net = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    rows, _ = tokenized_source(root / "sft.jsonl", tok, max_seq_len=128, overlong="truncate", assistant_only=True,
                               cache_root=root / "cache")
    data = SFTData(train=rows, eval=None, train_targets=target_counts(rows, False), eval_targets=None, lengths=None)
    grads = []
    for scale in (1.0, 0.25):
        net.zero_grad()
        forward_backward(net, data, np.arange(8), _Plan(4, 2), Accelerator(cpu=True), tok.pad_token_id, scale=scale)
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], 0.25 * grads[0])


def test_ptx_batch_must_split_over_micro_batches_and_fit_the_data(tmp_path, inputs):
    root, model = inputs
    with pytest.raises(AlignError, match="ptx.data: 8 usable conversations, fewer than ptx.batch_size 16"):
        run(tmp_path, model, grpo(root, ptx={"data": str(root / "sft.jsonl"), "coef": 0.1, "batch_size": 16}))
    with pytest.raises(AlignError, match="per_device_batch_size 4"):
        run(tmp_path / "b", model, grpo(root, per_device_batch_size=4,
                                        ptx={"data": str(root / "sft.jsonl"), "coef": 0.1, "batch_size": 6}))


def test_a_missing_ptx_file_is_named_before_anything_runs(tmp_path, inputs):
    root, model = inputs
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path / "out"), "model": {"path": str(model)},
                                "stages": [grpo(root, ptx={"data": str(tmp_path / "nope.jsonl"), "coef": 0.1})]}))
    with pytest.raises(AlignError, match=r"stages\[0\]\.ptx\.data\[0\]\.path: .*nope\.jsonl does not exist"):
        load_recipe(path)
