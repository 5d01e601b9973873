"""`align train` under FSDP2 (`distributed.strategy: fsdp2`) on two gloo ranks, started by torchrun:
the SFT, reward-model, DPO and GRPO stages shard the model (align/sharding.py, through the shared
stage loop) and end with the same weights as one process within 1e-5 (at lr 1e-4: Adam's normalised
step turns float-order differences of tiny gradients into weight differences proportional to lr,
1.8e-5 at lr 1e-3 for the reward model); a stop and a resume from the sharded checkpoint equal the
uninterrupted sharded run (SFT; GRPO with dynamic sampling).

GRPO generates with the sharded policy itself (colocated HF engine, in lock-step: rollout/hf.py)
and scores with a sharded frozen reference (beta > 0); its 3 held-out prompts split 2 + 1 over the
ranks, so rank 1 runs stand-in generate calls. DPO's frozen reference is sharded too, and its
20% held-out pairs split unevenly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.data.io import write_jsonl
from align.data.synth import generate
from helpers.launch import train as _train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
STAGES = {
    "sft": lambda d: {"kind": "sft", "data": str(d / "math.jsonl"), "eval_split": 0.1, "max_seq_len": 96},
    "reward_model": lambda d: {"kind": "reward_model", "data": str(d / "prefs.jsonl"), "eval_split": 0.2,
                               "max_seq_len": 96},
    "dpo": lambda d: {"kind": "dpo", "data": str(d / "prefs.jsonl"), "eval_split": 0.2, "max_seq_len": 96,
                      "reference": "frozen_copy"},
    "grpo": lambda d: {"kind": "grpo", "prompts": str(d / "prompts.jsonl"), "eval_prompts": str(d / "prompts.jsonl"),
                       "eval_max_prompts": 3, "rewards": [{"name": f"{ROOT}/tests/fixtures/user_rewards.py:char_diversity"}],
                       "group_size": 4, "prompts_per_step": 4, "per_device_batch_size": 4,
                       "gradient_accumulation_steps": 1, "beta": 0.04, "reference": "frozen_copy",
                       "sampling": {"max_new_tokens": 8}, "rollout": {"engine": "hf", "batch_size": 1},
                       "ptx": {"data": str(d / "math.jsonl"), "coef": 0.5, "batch_size": 4, "max_seq_len": 96}},
}


def _recipe(path: Path, model: Path, data: Path, kind: str, world: int, strategy: str, **stage) -> Path:
    body = {"name": "s", "lr": 1e-4, "max_steps": 3, "per_device_batch_size": 2,
            "gradient_accumulation_steps": 4 // world, **STAGES[kind](data), **stage}
    path.write_text(json.dumps({"output_dir": str(path.parent / "run"), "seed": 1, "model": {"path": str(model)},
                                "logging": {"report_to": ["none"]}, "distributed": {"strategy": strategy},
                                "stages": [body]}))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sharded-data")
    write_jsonl(generate("math", 200, seed=0), root / "math.jsonl")
    write_jsonl(generate("preference", 80, seed=1), root / "prefs.jsonl")
    write_jsonl(generate("math", 16, seed=4, form="prompts"), root / "prompts.jsonl")
    return root


def _final(recipe: Path) -> dict[str, torch.Tensor]:
    return load_file(recipe.parent / "run" / "s" / "final" / "model.safetensors")


@pytest.mark.parametrize("kind", sorted(STAGES))
def test_two_sharded_ranks_train_like_one_process(kind, model_dir, data, tmp_path):
    one = _recipe(Path(tmp_path / "one").mkdir() or tmp_path / "one" / "r.json", model_dir, data, kind, 1, "ddp")
    two = _recipe(Path(tmp_path / "two").mkdir() or tmp_path / "two" / "r.json", model_dir, data, kind, 2, "fsdp2")
    for recipe, world in ((one, 1), (two, 2)):
        done = _train(recipe, world)
        assert done.returncode == 0, done.stderr[-4000:]
    a, b = _final(one), _final(two)
    assert a.keys() == b.keys()
    base = load_file(model_dir / "model.safetensors")
    assert any(not torch.equal(a[k], base[k]) for k in a), "training must move the weights"
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"{kind}: max |Δw| one process vs 2 FSDP2 ranks = {worst:.2e}")
    assert worst < 1e-5
    shards = list((two.parent / "run" / "s").glob("checkpoint-*/shards"))
    assert not shards or all(len(list(s.iterdir())) == 2 for s in shards)
    summary = json.loads((two.parent / "run" / "manifest.json").read_text())["stages"]["s"]
    assert summary["processes"] == 2


@pytest.mark.parametrize("kind,extra", [("sft", {}), ("grpo", {"dynamic_sampling": {"max_rounds": 2}})])
def test_sharded_stop_and_resume_equals_the_uninterrupted_sharded_run(kind, extra, model_dir, data, tmp_path):
    whole = _recipe(Path(tmp_path / "whole").mkdir() or tmp_path / "whole" / "r.json", model_dir, data, kind, 2,
                    "fsdp2", max_steps=4, **extra)
    assert _train(whole, 2).returncode == 0
    cut = _recipe(Path(tmp_path / "cut").mkdir() or tmp_path / "cut" / "r.json", model_dir, data, kind, 2, "fsdp2",
                  max_steps=4, save_steps=2, **extra)
    first = _train(cut, 2)
    assert first.returncode == 0, first.stderr[-4000:]
    ckpt = cut.parent / "run" / "s" / "checkpoint-2"
    assert len(list((ckpt / "shards").iterdir())) == 2  # every rank wrote its own shard
    # forget the finished stage and its final/, keep checkpoint-2: the rerun resumes from it
    manifest = cut.parent / "run" / "manifest.json"
    entry = json.loads(manifest.read_text())
    entry["stages"]["s"]["status"] = "stopped"
    manifest.write_text(json.dumps(entry))
    resumed = _train(cut, 2)
    assert resumed.returncode == 0 and "resuming from checkpoint-2" in resumed.stdout, resumed.stderr[-4000:]
    a, b = _final(whole), _final(cut)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0
