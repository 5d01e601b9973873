"""The GRPO learning-rate schedule counts optimizer steps: μ = num_iterations of them per step."""

from __future__ import annotations

import json

import pytest

from align.data.io import write_jsonl
from align.data.synth import generate
from align.errors import AlignError
from align.pipeline import run_pipeline
from align.recipe.load import load_recipe


def _recipe(tmp_path, model_dir, **stage):
    write_jsonl(generate("math", 8, seed=4, form="prompts"), tmp_path / "prompts.jsonl")
    body = {"name": "rl", "kind": "grpo", "prompts": str(tmp_path / "prompts.jsonl"),
            "rewards": [{"name": "format"}], "group_size": 2, "prompts_per_step": 2, "per_device_batch_size": 4,
            "max_steps": 2, "lr": 1e-3, "beta": 0.0, "sampling": {"max_new_tokens": 6}, **stage}
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path / "run"), "model": {"path": str(model_dir)},
                                "logging": {"report_to": ["none"]}, "stages": [body]}))
    return path


def test_linear_decay_spans_every_optimizer_step_of_every_iteration(tmp_path, model_dir):
    run_pipeline(load_recipe(_recipe(tmp_path, model_dir, num_iterations=2, scheduler="linear")))
    rows = [json.loads(line) for line in (tmp_path / "run/rl/metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "loss" in r]
    # 2 steps × μ 2 = 4 optimizer steps; after step 1 two of them are done: 1e-3 × (1 − 2/4)
    assert lrs == pytest.approx([5e-4, 0.0], abs=1e-12)


def test_greedy_sampling_is_refused_with_the_reason(tmp_path, model_dir):
    with pytest.raises(AlignError, match="temperature: 0 makes every sample of a group the same"):
        load_recipe(_recipe(tmp_path, model_dir, sampling={"temperature": 0.0}))
