"""The shared stage loop (align/loop.py): one set of rules for SFT, reward-model, GRPO and DPO stages.

Each test runs every stage kind on the nano model, in process, through the kind's real `run`:
  - every stage writes tensorboard events when the recipe asks for them (SFT used not to);
  - a stop requested during the last step finishes the stage (final/ written) instead of
    interrupting it (the reward-model and GRPO stages used to raise);
  - a stop, then a resume from the checkpoint it wrote, gives the uninterrupted run's weights
    and its summary: the "before" evaluation, the first step's metric (a resumed reward-model
    run used to lose both) — including a LoRA reward model, whose resume used to start a fresh
    adapter, and GRPO with dynamic sampling, whose extra rounds are a function of the step.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.data.io import write_jsonl
from align.data.synth import generate
from align.errors import AlignError
from align.pipeline import RUNNERS
from align.recipe.load import load_recipe
from align.stage import StageContext, StopFlag, TrainingInterrupted

STAGES = {
    "sft": lambda d: {"kind": "sft", "data": str(d / "math.jsonl"), "eval_split": 0.1, "max_seq_len": 128,
                      "lr": 3e-3, "per_device_batch_size": 4, "gradient_accumulation_steps": 2},
    "reward_model": lambda d: {"kind": "reward_model", "data": str(d / "prefs.jsonl"), "eval_split": 0.2,
                               "max_seq_len": 96, "lr": 3e-3, "per_device_batch_size": 4},
    "reward_model_lora": lambda d: {"kind": "reward_model", "data": str(d / "prefs.jsonl"), "eval_split": 0.2,
                                    "max_seq_len": 96, "lr": 3e-3, "per_device_batch_size": 4,
                                    "lora": {"r": 4, "alpha": 8}},
    "grpo": lambda d: {"kind": "grpo", "prompts": str(d / "prompts.jsonl"), "eval_prompts": str(d / "eval.jsonl"),
                       "rewards": [{"name": "math_accuracy"}, {"name": "format", "normalize": "running"}],
                       "group_size": 4, "prompts_per_step": 2, "per_device_batch_size": 4, "num_iterations": 2,
                       "lr": 1e-3, "beta": 0.04, "sampling": {"max_new_tokens": 10}},
    "dpo": lambda d: {"kind": "dpo", "data": str(d / "prefs.jsonl"), "eval_split": 0.2, "max_seq_len": 96,
                      "lr": 3e-3, "per_device_batch_size": 4, "gradient_accumulation_steps": 2},
    "dpo_lora_disabled": lambda d: {"kind": "dpo", "data": str(d / "prefs.jsonl"), "eval_split": 0.2,
                                    "max_seq_len": 96, "lr": 3e-3, "per_device_batch_size": 4, "loss_type": "ipo",
                                    "reference": "lora_disabled", "lora": {"r": 4, "alpha": 8}},
}
STAGES["grpo_dynamic"] = lambda d: {**STAGES["grpo"](d), "dynamic_sampling": {"max_rounds": 3}}
KINDS = ["sft", "reward_model", "grpo", "dpo"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loop-data")
    write_jsonl(generate("math", 200, seed=0), root / "math.jsonl")
    write_jsonl(generate("preference", 80, seed=1), root / "prefs.jsonl")
    write_jsonl(generate("math", 16, seed=4, form="prompts"), root / "prompts.jsonl")
    write_jsonl(generate("math", 4, seed=104, form="prompts"), root / "eval.jsonl")
    return root


def context(out: Path, model: Path, data: Path, kind: str, report_to=("none",), resume_from=None,
            **stage) -> StageContext:
    body = {"name": "s", **STAGES[kind](data), **stage}
    path = out / "recipe.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"output_dir": str(out), "seed": 3, "model": {"path": str(model)},
                                "logging": {"report_to": list(report_to)}, "stages": [body]}))
    recipe = load_recipe(path)
    return StageContext(recipe=recipe, stage=recipe.stages[0], stage_dir=out / "s", init_model=model,
                        resume_from=resume_from)


def run(ctx: StageContext):
    return importlib.import_module(RUNNERS[ctx.stage.kind]).run(ctx)


def stopping(ctx: StageContext) -> StageContext:
    ctx.stop = StopFlag()
    ctx.stop.requested = True  # as if SIGTERM arrived during the first step
    return ctx


@pytest.mark.parametrize("kind", KINDS)
def test_every_stage_kind_writes_tensorboard(kind, model_dir, data, tmp_path):
    run(context(tmp_path, model_dir, data, kind, report_to=["tensorboard"], max_steps=1))
    assert list((tmp_path / "s").rglob("events.out.tfevents.*")), f"{kind}: no tensorboard events"


@pytest.mark.parametrize("kind", KINDS)
def test_a_stop_at_the_last_step_finishes_the_stage(kind, model_dir, data, tmp_path):
    result = run(stopping(context(tmp_path / "last", model_dir, data, kind, max_steps=1)))
    assert (result.final / "config.json").exists() and result.summary["steps"] == 1
    with pytest.raises(TrainingInterrupted) as stopped:  # before the last step it does interrupt
        run(stopping(context(tmp_path / "early", model_dir, data, kind, max_steps=2)))
    assert stopped.value.step == 1 and (stopped.value.checkpoint / "trainer_state.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sft", "reward_model", "reward_model_lora", "grpo", "grpo_dynamic", "dpo",
                                  "dpo_lora_disabled"])
def test_stop_and_resume_equals_the_uninterrupted_run(kind, model_dir, data, tmp_path):
    whole = run(context(tmp_path / "whole", model_dir, data, kind, max_steps=3))
    with pytest.raises(TrainingInterrupted) as stopped:
        run(stopping(context(tmp_path / "cut", model_dir, data, kind, max_steps=3)))
    resumed = run(context(tmp_path / "cut", model_dir, data, kind, max_steps=3,
                          resume_from=stopped.value.checkpoint))
    a, b = load_file(whole.final / "model.safetensors"), load_file(resumed.final / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0, msg=f"{kind}: {name} differs")
    before = {k: v for k, v in whole.summary.items() if k.endswith("(before)") or k.endswith("(first step)")}
    assert before and all(v is not None for v in before.values()), whole.summary
    for key, value in before.items():
        assert resumed.summary[key] == pytest.approx(value, abs=1e-6), key
    assert resumed.summary["steps"] == 3
    if "tokens" in whole.summary:  # the compute a stage reports counts every resumed run once
        assert resumed.summary["tokens"] == whole.summary["tokens"] > 0


@pytest.mark.parametrize("lora, reference", [(None, "frozen_copy"), ({"r": 4, "alpha": 8}, "lora_disabled")])
def test_dpo_references_train_alike(lora, reference, model_dir, data, tmp_path):
    """π_ref scored per batch (a frozen copy, or the LoRA policy with its adapter off) trains as the
    precomputed log-probs do: all three are the starting model."""
    extra = {"max_steps": 2, **({"lora": lora} if lora else {})}
    stored = run(context(tmp_path / "pre", model_dir, data, "dpo", reference="precomputed", **extra))
    scored = run(context(tmp_path / "ref", model_dir, data, "dpo", reference=reference, **extra))
    assert (tmp_path / "pre" / "s" / "reference_logps.safetensors").exists()
    a, b = load_file(stored.final / "model.safetensors"), load_file(scored.final / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=0, msg=f"{reference}: {name} differs")
    assert scored.summary["eval_rewards/margins (before)"] == pytest.approx(0.0, abs=1e-5)
    assert scored.summary["eval_rewards/accuracies (after)"] is not None


@pytest.mark.parametrize("kind", ["sft", "dpo", "grpo"])
def test_fsdp2_without_a_process_group_says_how_to_launch(kind, model_dir, data, tmp_path):
    ctx = context(tmp_path, model_dir, data, kind, max_steps=1)
    ctx.recipe = ctx.recipe.model_copy(update={"distributed": ctx.recipe.distributed.model_copy(
        update={"strategy": "fsdp2"})})
    with pytest.raises(AlignError, match="fsdp2 needs a process group; launch with `torchrun"):
        run(ctx)


def test_stages_of_one_process_may_differ_in_precision(model_dir, data, tmp_path):
    """accelerate keeps one state per process and refuses a new mixed precision; a recipe whose
    stages differ (float32, then bf16 autocast) must still run them one after the other."""
    first = run(context(tmp_path / "fp32", model_dir, data, "sft", max_steps=1, bf16=False))
    second = run(context(tmp_path / "bf16", model_dir, data, "sft", max_steps=1, bf16=True))
    assert first.summary["steps"] == second.summary["steps"] == 1
