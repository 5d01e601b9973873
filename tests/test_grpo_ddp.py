"""GRPO under two DDP ranks (gloo, CPU) equals one process at the same global batch.

Each rank generates whole groups (one prompt per generate call, seeds by global sample position),
advantages come from the gathered rewards, and the loss (with its ptx SFT term) is normalised so
that DDP's gradient average equals the single-process mean: the weights after two steps must agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.data.io import write_jsonl
from align.data.synth import generate
from align.models.tiny import build_tiny

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


def _recipe(tmp: Path, model: Path, prompts: Path, out: str) -> Path:
    path = tmp / f"{out}.yaml"
    path.write_text(json.dumps({
        "output_dir": str(tmp / out), "model": {"path": str(model)}, "logging": {"report_to": ["none"]},
        "stages": [{"name": "rl", "kind": "grpo", "prompts": str(prompts),
                    "rewards": [{"name": f"{FIXTURES}/user_rewards.py:char_diversity"}],
                    "group_size": 4, "prompts_per_step": 4, "per_device_batch_size": 4, "max_steps": 2,
                    "lr": 1e-3, "beta": 0.04, "scale_rewards": "batch", "sampling": {"max_new_tokens": 10},
                    "rollout": {"engine": "hf", "batch_size": 1},
                    # PPO-ptx: each rank takes its share of the conversations, normalised over all of them
                    "ptx": {"data": str(prompts.parent / "sft.jsonl"), "coef": 0.5, "batch_size": 4,
                            "max_seq_len": 96}}]}))
    return path


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path):
    model = build_tiny(tmp_path / "base", size="nano")
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(generate("math", 16, seed=4, form="prompts"), prompts)
    write_jsonl(generate("math", 40, seed=7), tmp_path / "sft.jsonl")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "align", "train", str(_recipe(tmp_path, model, prompts, "one"))],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", "0",
                          "--config_file", str(ROOT / "recipes/accelerate/cpu_ddp2.yaml"), "-m", "align", "train",
                          str(_recipe(tmp_path, model, prompts, "two"))],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = load_file(tmp_path / "one/rl/final/model.safetensors")
    two = load_file(tmp_path / "two/rl/final/model.safetensors")
    base = load_file(model / "model.safetensors")
    assert any(not torch.equal(one[k], base[k]) for k in one), "training must move the weights"
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert worst < 1e-5, f"1 process vs 2 DDP ranks differ by {worst}"
    rewards = [json.loads(line)["reward"] for run in ("one", "two")
               for line in (tmp_path / run / "rl/metrics.jsonl").read_text().splitlines() if "reward" in line]
    assert rewards[:2] == pytest.approx(rewards[2:], abs=1e-6)  # same samples, same global rewards
