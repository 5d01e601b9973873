"""Exact resume and graceful stop of a real `align train` process, for every stage kind (SFT,
reward model with LoRA, GRPO, DPO with precomputed reference log-probs).

One chain per trainer, on CPU with the nano model, saving every step:
  1. the reference: the recipe run uninterrupted;
  2. the same command SIGKILLed at a seeded random step after a checkpoint exists;
  3. rerun (it resumes from `latest`), then stopped by SIGTERM (GRPO, DPO) or SIGINT (SFT, RM): it must save,
     exit 2 with a message saying how to resume and no traceback, manifest status "stopped";
  4. rerun to the end.
The final weights and metrics.jsonl (wall-time keys aside) must equal the reference's.
"""

from __future__ import annotations

import random
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.reliability import comparable_metrics, interrupt_at, manifest_status, max_abs_diff, train, write_recipe

pytestmark = pytest.mark.slow
STEPS = 6
KILL_RNG = random.Random(20240611)


def _sft_recipe(out: Path, model: Path, data: Path) -> dict:
    return {"name": "sft-resume", "output_dir": str(out), "seed": 0, "model": {"path": str(model)},
            "stages": [{"name": "sft", "kind": "sft", "data": str(data), "eval_split": 0.1, "max_seq_len": 128,
                        "packing": True, "lr": 3.0e-3, "warmup_ratio": 0.1, "scheduler": "cosine",
                        "max_steps": STEPS, "per_device_batch_size": 4, "gradient_accumulation_steps": 2,
                        "save_steps": 1, "logging_steps": 1}]}


def _grpo_recipe(out: Path, model: Path, data: Path) -> dict:
    return {"name": "grpo-resume", "output_dir": str(out), "seed": 0, "model": {"path": str(model)},
            "stages": [{"name": "rl", "kind": "grpo", "prompts": str(data), "eval_prompts": str(data),
                        "rewards": [{"name": "math_accuracy"},
                                    {"name": "format", "weight": 0.5, "normalize": "running"}],
                        "group_size": 4, "prompts_per_step": 2, "per_device_batch_size": 4,
                        "num_iterations": 2, "max_steps": STEPS, "lr": 1.0e-3, "beta": 0.04,
                        "sampling": {"max_new_tokens": 12}, "save_steps": 1,
                        # the ptx batch of a step is a function of the step: resume takes the same rows
                        "ptx": {"data": str(data.parent / "math.jsonl"), "coef": 0.1, "batch_size": 4,
                                "max_seq_len": 96}}]}


def _rm_recipe(out: Path, model: Path, data: Path) -> dict:
    return {"name": "rm-resume", "output_dir": str(out), "seed": 0, "model": {"path": str(model)},
            "stages": [{"name": "rm", "kind": "reward_model", "data": str(data), "eval_split": 0.2,
                        "max_seq_len": 96, "lr": 3.0e-3, "lora": {"r": 4, "alpha": 8}, "max_steps": STEPS,
                        "per_device_batch_size": 4, "save_steps": 1, "logging_steps": 1}]}


def _dpo_recipe(out: Path, model: Path, data: Path) -> dict:
    return {"name": "dpo-resume", "output_dir": str(out), "seed": 0, "model": {"path": str(model)},
            "stages": [{"name": "dpo", "kind": "dpo", "data": str(data), "eval_split": 0.2, "max_seq_len": 96,
                        "lr": 3.0e-3, "beta": 0.1, "reference": "precomputed", "max_steps": STEPS,
                        "per_device_batch_size": 2, "gradient_accumulation_steps": 2, "save_steps": 1,
                        "logging_steps": 1}]}


TRAINERS = {"sft": ("sft", "math", _sft_recipe, signal.SIGINT),
            "rm": ("rm", "prefs", _rm_recipe, signal.SIGINT),
            "dpo": ("dpo", "prefs", _dpo_recipe, signal.SIGTERM),
            "grpo": ("rl", "prompts", _grpo_recipe, signal.SIGTERM)}


@dataclass
class Chain:
    stage: str
    reference: Path  # stage dir of the uninterrupted run
    resumed: Path  # stage dir of the killed, stopped and resumed run
    killed_at: int
    stopped_at: int
    killed_rc: int
    stopped: object  # CompletedProcess of the run stopped by SIGTERM/SIGINT
    status_after_stop: str
    final_out: str  # stdout of the last rerun


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    from align.data.io import write_jsonl
    from align.data.synth import generate
    from align.models.tiny import build_tiny

    root = tmp_path_factory.mktemp("inputs")
    write_jsonl(generate("math", 600, seed=0), root / "math.jsonl")
    write_jsonl(generate("math", 32, seed=4, form="prompts"), root / "prompts.jsonl")
    write_jsonl(generate("preference", 80, seed=1), root / "prefs.jsonl")
    return {"model": build_tiny(root / "model", "nano"), "math": root / "math.jsonl",
            "prompts": root / "prompts.jsonl", "prefs": root / "prefs.jsonl"}


@pytest.fixture(scope="module", params=sorted(TRAINERS))
def chain(request, inputs, tmp_path_factory) -> Chain:
    stage, data_key, make, stop_signal = TRAINERS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    ref_recipe = write_recipe(root / "ref.yaml", make(root / "ref", inputs["model"], inputs[data_key]))
    run_recipe = write_recipe(root / "run.yaml", make(root / "run", inputs["model"], inputs[data_key]))
    done = train(ref_recipe)
    assert done.returncode == 0, done.stderr[-3000:]

    killed_at = KILL_RNG.randint(1, STEPS - 3)
    stopped_at = KILL_RNG.randint(killed_at + 1, STEPS - 1)
    killed = interrupt_at(run_recipe, root / "run" / stage, killed_at, signal.SIGKILL)
    stopped = interrupt_at(run_recipe, root / "run" / stage, stopped_at, stop_signal)
    status = manifest_status(root / "run", stage)
    final = train(run_recipe)
    assert final.returncode == 0, final.stderr[-3000:]
    return Chain(stage, root / "ref" / stage, root / "run" / stage, killed_at, stopped_at, killed.returncode,
                 stopped, status, final.stdout)


def test_sigkill_then_rerun_gives_the_same_weights(chain):
    assert chain.killed_rc == -signal.SIGKILL
    assert "resuming from checkpoint-" in chain.final_out
    diff = max_abs_diff(chain.reference / "final" / "model.safetensors", chain.resumed / "final" / "model.safetensors")
    print(f"{chain.stage}: killed at step {chain.killed_at}, stopped at {chain.stopped_at}; max |Δw| = {diff}")
    assert diff == 0.0


def test_sigkill_then_rerun_gives_the_same_metrics(chain):
    reference, resumed = comparable_metrics(chain.reference), comparable_metrics(chain.resumed)
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]
    assert resumed == reference


def test_signal_saves_and_exits_with_a_resume_hint(chain):
    stopped = chain.stopped
    message = " ".join(stopped.stderr.split())  # rich wraps long lines
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    assert "Rerun the same command to resume" in message
    assert "Traceback" not in stopped.stderr + stopped.stdout
    assert chain.status_after_stop == "stopped"
    step = int(message.split("stopped at step ")[1].split(";")[0])
    assert step >= chain.stopped_at
