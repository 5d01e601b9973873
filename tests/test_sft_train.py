"""The SFT stage end to end on a nano model: exact resume, batch-split invariance, LoRA, learning,
and two DDP ranks on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.sft import run
from align.stage import StopFlag
from align.stage import TrainingInterrupted
from sft_helpers import ROOT, losses, make_ctx, math_data, nano_model  # noqa: F401  (fixtures)


def _weights(final: Path) -> dict[str, torch.Tensor]:
    return load_file(final / "model.safetensors")


def test_stop_and_resume_equals_an_uninterrupted_run(nano_model, math_data, tmp_path):
    whole = run(make_ctx(tmp_path / "a", nano_model, math_data))
    assert whole.summary["steps"] == 8 and (tmp_path / "a" / "sft" / "checkpoint-4").is_dir()

    ctx = make_ctx(tmp_path / "b", nano_model, math_data)
    ctx.stop = StopFlag()
    ctx.stop.requested = True  # as if SIGTERM arrived during the first step
    with pytest.raises(TrainingInterrupted) as stopped:
        run(ctx)
    assert stopped.value.step == 1 and stopped.value.checkpoint.name == "checkpoint-1"
    resumed = run(make_ctx(tmp_path / "b", nano_model, math_data, resume_from=stopped.value.checkpoint))

    expected, got = losses(tmp_path / "a" / "sft"), losses(tmp_path / "b" / "sft")
    assert len(got) == len(expected) == 8
    assert got == pytest.approx(expected, abs=1e-6, rel=0)
    a, b = _weights(whole.final), _weights(resumed.final)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0)
    assert resumed.summary["eval_loss (after)"] == pytest.approx(whole.summary["eval_loss (after)"], abs=1e-6)
    assert whole.summary["eval_loss (after)"] < whole.summary["eval_loss (before)"]


def test_batch_split_does_not_change_the_loss_curve(nano_model, math_data, tmp_path):
    """Loss normalised over the global batch: 4×2 (the recipe), 2×4 and 8×1 train identically."""
    short = ["stages.0.max_steps=3", "stages.0.save_steps=null"]
    curves = []
    for bs, accum in ((4, 2), (2, 4), (8, 1)):
        out = tmp_path / f"{bs}x{accum}"
        run(make_ctx(out, nano_model, math_data, [*short, f"stages.0.per_device_batch_size={bs}",
                                                  f"stages.0.gradient_accumulation_steps={accum}"]))
        curves.append(losses(out / "sft"))
    assert curves[1] == pytest.approx(curves[0], abs=1e-5, rel=0)
    assert curves[2] == pytest.approx(curves[0], abs=1e-5, rel=0)


def test_lora_run_writes_a_merged_model_that_loads_anywhere(nano_model, math_data, tmp_path):
    from transformers import AutoModelForCausalLM

    result = run(make_ctx(tmp_path, nano_model, math_data,
                          ["stages.0.lora={r: 4, alpha: 8}", "stages.0.max_steps=3", "stages.0.save_steps=2"]))
    assert 0 < result.summary["trainable_params"] < result.summary["params"] / 5  # counted before the merge
    assert (tmp_path / "sft" / "checkpoint-2" / "adapter_model.safetensors").exists()
    assert not (result.final / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(result.final)
    base = AutoModelForCausalLM.from_pretrained(nano_model)
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert any("q_proj" in n for n in changed) and not any("embed" in n for n in changed)


def test_unpacked_padded_batches_train(nano_model, math_data, tmp_path):
    result = run(make_ctx(tmp_path, nano_model, math_data, ["stages.0.packing=false", "stages.0.max_steps=3",
                                                            "stages.0.save_steps=null"]))
    s = result.summary
    assert s["train_rows"] == 540 and s["eval_loss (after)"] < s["eval_loss (before)"]


@pytest.mark.slow
def test_training_halves_held_out_loss_on_math(nano_model, math_data, tmp_path):
    result = run(make_ctx(tmp_path, nano_model, math_data,
                          ["stages.0.max_steps=150", "stages.0.save_steps=null", "stages.0.logging_steps=10"]))
    s = result.summary
    assert s["eval_loss (after)"] < s["eval_loss (before)"] / 2, s


@pytest.mark.slow
def test_two_ddp_ranks_on_cpu_match_one_process(nano_model, math_data, tmp_path):
    """2 gloo ranks × batch 4 × accumulation 1 = 1 process × 4 × 2: same global batch, same curve."""
    steps = ["stages.0.max_steps=4", "stages.0.save_steps=null"]
    run(make_ctx(tmp_path / "one", nano_model, math_data, steps))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", "0", "--config_file",
           str(ROOT / "recipes" / "accelerate" / "cpu_ddp2.yaml"), str(ROOT / "tests" / "sft_helpers.py"),
           str(tmp_path / "two"), str(nano_model), str(math_data), *steps, "stages.0.gradient_accumulation_steps=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(tmp_path / "two" / "sft") == pytest.approx(losses(tmp_path / "one" / "sft"), abs=1e-5, rel=0)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["steps"] == 4


def test_moe_model_trains_with_router_balance_loss(math_data, tmp_path):
    from align.models.tiny import build_tiny

    model = build_tiny(tmp_path / "moe", "nano", arch="deepseek_v2", corpus_texts=2000)
    result = run(make_ctx(tmp_path / "run", model, math_data, ["stages.0.moe_aux_loss_coef=0.003",
                                                               "stages.0.max_steps=2", "stages.0.save_steps=null"]))
    assert result.summary["eval_loss (after)"] < result.summary["eval_loss (before)"]
