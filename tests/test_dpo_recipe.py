"""recipes/online_vs_offline.yaml, shrunk with `--set` (nano model, a few steps), run as a user runs
it: every stage finishes, the evaluation table holds sft, dpo and grpo side by side, and each
branch's compute is in its summary (dpo generates no samples, grpo does; both train tokens)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers.reliability import ROOT, train

pytestmark = pytest.mark.slow

SMALL = [
    "model.tiny.size=nano",
    *(f"synth.{i}.n={n}" for i, n in enumerate([200, 80, 60, 16, 8])),
    "stages.sft.max_steps=6", "stages.sft.save_steps=3",
    "stages.rm.max_steps=2",
    "stages.dpo.max_steps=3", "stages.dpo.per_device_batch_size=4", "stages.dpo.save_steps=2",
    "stages.grpo.max_steps=2", "stages.grpo.prompts_per_step=2", "stages.grpo.group_size=4",
    "stages.grpo.sampling.max_new_tokens=12", "stages.grpo.save_steps=1",
    "evaluate.limit=6", "evaluate.max_new_tokens=12", "evaluate.base_model=true",
]
ARGS = [arg for item in SMALL for arg in ("--set", item)]


def test_shrunk_online_vs_offline_recipe_compares_both_branches(tmp_path):
    recipe = shutil.copy(ROOT / "recipes" / "online_vs_offline.yaml", tmp_path / "recipe.yaml")
    done = train(Path(recipe), timeout=1200, args=ARGS, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "online_vs_offline"
    manifest = json.loads((run / "manifest.json").read_text())
    stages = manifest["stages"]
    assert all(stages[n]["status"] == "done" for n in ("sft", "rm", "dpo", "grpo"))
    dpo, grpo = stages["dpo"]["summary"], stages["grpo"]["summary"]
    assert dpo["samples"] == 0 and dpo["tokens"] > 0 and dpo["time_s"] > 0
    assert grpo["samples"] == 2 * 2 * 4 and grpo["time_s"] > 0
    assert abs(dpo["eval_rewards/margins (before)"]) < 1e-4  # π = π_ref before the first step
    assert "eval_rewards/accuracies (after)" in dpo
    metrics = manifest["evaluation"]["metrics"]
    assert all(list(metric["values"]) == ["base", "sft", "dpo", "grpo"] for metric in metrics.values())
    assert metrics["reward/win_rate"]["values"]["sft"] == 0.5  # win rates stay against SFT, not the base
    report = (run / "eval" / "report.md").read_text()
    assert "- baseline: `sft`" in report
    compute = report.split("## Compute by stage")[1]
    for stage in ("| dpo | dpo | sft |", "| grpo | grpo | sft |", "| sft | sft | model |"):
        assert stage in compute, compute
    assert "| dpo | dpo | sft | 0 |" in compute  # offline: no sample generated
