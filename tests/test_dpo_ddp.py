"""DPO under two DDP ranks (gloo, CPU) equals one process at the same global batch.

Each rank takes its share of the global batch of pairs, the precomputed reference log-probs are
scored rank by rank and summed, and each micro-batch's loss is scaled by world / global batch so
DDP's gradient average is the single-process mean: the weights after two steps and the held-out
metrics must agree.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.data.io import write_jsonl
from align.data.synth import generate
from helpers.reliability import ROOT, env

pytestmark = pytest.mark.slow


def _recipe(tmp: Path, model: Path, prefs: Path, out: str, per_device: int) -> Path:
    path = tmp / f"{out}.yaml"
    path.write_text(json.dumps({
        "output_dir": str(tmp / out), "model": {"path": str(model)}, "logging": {"report_to": ["none"]},
        "stages": [{"name": "dpo", "kind": "dpo", "data": str(prefs), "eval_split": 0.25, "max_seq_len": 96,
                    "per_device_batch_size": per_device, "max_steps": 2, "lr": 1e-4, "beta": 0.1}]}))
    return path


def test_two_ranks_equal_one_process(model_dir, tmp_path):
    prefs = tmp_path / "prefs.jsonl"
    write_jsonl(generate("preference", 24, seed=1), prefs)
    single = subprocess.run([sys.executable, "-m", "align", "train", str(_recipe(tmp_path, model_dir, prefs, "one", 4))],
                            capture_output=True, text=True, cwd=ROOT, env=env(), timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", "0",
                          "--config_file", str(ROOT / "recipes/accelerate/cpu_ddp2.yaml"), "-m", "align", "train",
                          str(_recipe(tmp_path, model_dir, prefs, "two", 2))],
                         capture_output=True, text=True, cwd=ROOT, env=env(), timeout=900)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = (load_file(tmp_path / run / "dpo/final/model.safetensors") for run in ("one", "two"))
    base = load_file(model_dir / "model.safetensors")
    assert any(not torch.equal(one[k], base[k]) for k in one), "training must move the weights"
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert worst < 1e-5, f"1 process vs 2 DDP ranks differ by {worst}"
    summaries = [json.loads((tmp_path / run / "manifest.json").read_text())["stages"]["dpo"]["summary"]
                 for run in ("one", "two")]
    for key in ("eval_loss (after)", "eval_rewards/margins (after)", "train_pairs", "eval_pairs", "tokens"):
        assert summaries[1][key] == pytest.approx(summaries[0][key], abs=1e-5), key
