"""Bounded off-policy rollouts (`max_staleness`, align/grpo/async_rollout.py): GRPO on the nano
model with two real `align rollout serve --engine hf` workers, max_staleness: 1.

  - every sample's staleness is ≤ 1 (per step exactly [0, 1, 1, 1, 1]: the first batch comes from
    the starting weights, every later one from the previous step's), as the workers report it;
  - the importance correction is on and bites: off-policy steps show a trainer–rollout gap and IS
    weights away from 1, the on-policy first step none;
  - a stop after step 2 checkpoints the two batches generated ahead (steps 2 and 3, from versions
    1 and 2), and the resumed run ends on the uninterrupted run's weights, bit for bit;
  - so does a real `align train` SIGKILLed while a batch is generated ahead;
  - the refusals name their recipe key.
Dynamic sampling is on throughout, so a batch ahead is the trainer's whole rollout of its step.
"""

from __future__ import annotations

import importlib
import json
import math
import signal
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from align.data.io import write_jsonl
from align.data.synth import generate
from align.errors import AlignError
from align.grpo.async_rollout import Ahead, refuse_processes, staleness_metrics, weight_version
from align.grpo.dynamic_sampling import Rollout
from align.data.prompts import PromptSet
from align.recipe.load import load_recipe
from align.stage import StageContext, StopFlag, TrainingInterrupted
from align.tracking import read_metrics
from helpers.reliability import interrupt_at, max_abs_diff, train, write_recipe
from helpers.workers import running_workers
from rollout.base import Sample

FIXTURES = Path(__file__).parent / "fixtures"
STEPS = 5
RUNNING_COUNTS = ("rollout/requests", "rollout/retries", "rollout/dead_workers", "rollout/samples", "rollout/syncs",
                  "rollout/readmitted")


@pytest.fixture(scope="module")
def servers(model_dir):
    with running_workers(model_dir, 2) as urls:
        yield urls


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("async-data")
    write_jsonl(generate("math", 16, seed=4, form="prompts"), root / "prompts.jsonl")
    write_jsonl(generate("math", 2, seed=104, form="prompts"), root / "eval.jsonl")
    return root


def stage_body(data: Path, servers: list[str], **extra) -> dict:
    return {"name": "rl", "kind": "grpo", "prompts": str(data / "prompts.jsonl"),
            "eval_prompts": str(data / "eval.jsonl"), "eval_steps": 2,
            "rewards": [{"name": "math_accuracy"}, {"name": f"{FIXTURES}/user_rewards.py:char_diversity",
                                                     "normalize": "running"}],
            "group_size": 4, "prompts_per_step": 2, "per_device_batch_size": 4, "lr": 1e-3, "beta": 0.04,
            "sampling": {"max_new_tokens": 10}, "max_steps": STEPS, "save_steps": 1, "max_staleness": 1,
            "dynamic_sampling": {"max_rounds": 2, "min_std": 0.25},  # some steps take a second round
            "rollout": {"mode": "server", "servers": servers}, **extra}


def recipe_at(out: Path, model: Path, body: dict):
    path = out / "recipe.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"output_dir": str(out), "seed": 3, "model": {"path": str(model)},
                                "logging": {"report_to": ["none"]}, "stages": [body]}))
    return load_recipe(path)


def run(out: Path, model: Path, body: dict, stop: StopFlag | None = None, resume_from: Path | None = None):
    recipe = recipe_at(out, model, body)
    ctx = StageContext(recipe=recipe, stage=recipe.stages[0], stage_dir=out / "rl", init_model=model,
                       resume_from=resume_from, stop=stop or StopFlag())
    return importlib.import_module("align.grpo.trainer").run(ctx)


class StopAfter(StopFlag):
    """A stop requested (as SIGTERM would) once `steps` steps have run: the loop asks after each."""

    def __init__(self, steps: int):
        self.steps, self.asked = steps, 0

    @property
    def requested(self) -> bool:
        self.asked += 1
        return self.asked >= self.steps


def train_rows(stage_dir: Path) -> list[dict]:
    return [r for r in read_metrics(stage_dir) if "loss" in r]


def comparable(stage_dir: Path) -> list[dict]:
    """Every logged row without wall times and the servers' running counts (they restart with a process)."""
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k not in RUNNING_COUNTS}
            for r in read_metrics(stage_dir)]


@pytest.fixture(scope="module")
def whole(servers, model_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    result = run(out, model_dir, stage_body(data, servers))
    versions = [httpx.get(url + "/health").json()["weight_version"] for url in servers]
    return result, out / "rl", versions


@pytest.mark.slow
def test_every_sample_is_at_most_one_version_old_and_corrected(whole):
    result, stage_dir, versions = whole
    rows = train_rows(stage_dir)
    assert [r["rollout/staleness_max"] for r in rows] == [0, 1, 1, 1, 1]
    assert [r["rollout/staleness_mean"] for r in rows] == [0, 1, 1, 1, 1]
    assert [r["rollout/off_policy_samples"] for r in rows] == [0, 8, 8, 8, 8]  # 2 prompts × 4
    assert all(r["rollout/stale_samples"] == 0 for r in rows)  # no worker served weights older than pushed
    assert versions == [STEPS, STEPS]  # both workers got every push
    assert all(r["rollout/sync_check_gap"] < 1e-6 for r in rows)  # and served it (float32 on both sides)
    on, off = rows[0], rows[1:]
    # on-policy: the engine's logprobs are the trainer's up to numerics, so the IS weights are 1
    assert on["mismatch/logp_diff_max"] < 1e-4 and abs(on["rollout_is/weight_mean"] - 1) < 1e-4
    for r in off:  # one step behind at lr 1e-3: a real gap, corrected token by token
        assert r["mismatch/logp_diff_max"] > 1e-3
        assert r["rollout_is/weight_min"] < 1 - 1e-4 or r["rollout_is/weight_max"] > 1 + 1e-4
        assert r["rollout_is/weight_max"] <= 2.0  # the default cap
        assert r["time/rollout_wait"] >= 0 and r["time/sync_wait"] >= 0
    assert result.summary["steps"] == STEPS and math.isfinite(rows[-1]["loss"])
    assert max(r["dynamic/rounds"] for r in rows) == 2  # so the resume below restores two-round batches too


@pytest.mark.slow
def test_stop_and_resume_equals_the_uninterrupted_run(whole, servers, model_dir, data, tmp_path):
    reference, ref_dir, _ = whole
    body = stage_body(data, servers)
    with pytest.raises(TrainingInterrupted) as stopped:
        run(tmp_path, model_dir, body, stop=StopAfter(2))
    checkpoint = stopped.value.checkpoint
    assert stopped.value.step == 2
    ahead = json.loads((checkpoint / "trainer_state.json").read_text())["state"]["stage"]["ahead"]["batches"]
    # in flight at the stop: the batch of step 3, finished before the checkpoint was written
    assert [b["step"] for b in ahead] == [2, 3]
    assert [sorted({s["weight_version"] for s in b["samples"]}) for b in ahead] == [[1], [2]]
    resumed = run(tmp_path, model_dir, body, resume_from=checkpoint)
    a, b = load_file(reference.final / "model.safetensors"), load_file(resumed.final / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert comparable(tmp_path / "rl") == comparable(ref_dir)


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_gives_the_same_weights(servers, model_dir, data, tmp_path):
    """A real `align train` killed while a batch is being generated ahead: the batch in flight is
    lost and generated again after the resume, from the same weights and seeds."""
    def recipe(name: str) -> Path:
        body = {**stage_body(data, servers), "eval_prompts": [], "eval_steps": None}
        return write_recipe(tmp_path / f"{name}.yaml", {"output_dir": str(tmp_path / name), "seed": 3,
                                                        "model": {"path": str(model_dir)}, "stages": [body]})

    reference = train(recipe("ref"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = interrupt_at(recipe("run"), tmp_path / "run" / "rl", 3, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    resumed = train(recipe("run"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from checkpoint-" in resumed.stdout
    assert max_abs_diff(tmp_path / "ref/rl/final/model.safetensors", tmp_path / "run/rl/final/model.safetensors") == 0
    assert [r["rollout/staleness_max"] for r in train_rows(tmp_path / "run/rl")] == [0, 1, 1, 1, 1]


def test_schedule_and_staleness_counts():
    assert [weight_version(s, 1) for s in range(5)] == [0, 0, 1, 2, 3]
    assert [weight_version(s, 2) for s in range(5)] == [0, 0, 0, 1, 2]
    assert staleness_metrics(3, [2, 3, 3, 1]) == {"staleness_max": 2.0, "staleness_mean": 0.75,
                                                  "off_policy_samples": 2.0}


def test_a_batch_ahead_round_trips_through_the_checkpoint_exactly():
    samples = [Sample([5, 6], [-0.1, float("nan")], "length", weight_version=2,
                      routes=torch.tensor([[[1, 2]], [[3, -1]]])),
               Sample([7], [-1e-12], "stop", weight_version=2)]
    rows = PromptSet([[1, 2], [1, 2]], [[{"role": "user", "content": "1+1?"}]] * 2, {"answer": ["2", "2"]})
    ahead = Ahead(4, Rollout(samples, rows, [0.5, None], {"rewards/format/mean": 0.25}, {}),
                  {"requests": 2.0}, {"time/rollout": 0.1})
    back = Ahead.from_json(json.loads(json.dumps(ahead.to_json())))
    assert back.to_json() == json.loads(json.dumps(ahead.to_json()))  # NaN aside, equal as JSON
    assert torch.equal(back.rollout.samples[0].routes, samples[0].routes)
    assert back.rollout.samples[0].logprobs[0] == -0.1 and math.isnan(back.rollout.samples[0].logprobs[1])
    assert (back.rollout.rows.ids, back.rollout.rows.columns, back.rollout.totals) == (rows.ids, rows.columns,
                                                                                      [0.5, None])


def test_importance_sampling_defaults_on_and_null_is_refused(model_dir, data, tmp_path):
    servers = ["http://127.0.0.1:9"]
    stage = recipe_at(tmp_path / "a", model_dir, stage_body(data, servers)).stages[0]
    assert stage.importance_sampling.model_dump() == {"level": "token", "mode": "truncate", "cap": 2.0}
    mask = recipe_at(tmp_path / "b", model_dir, stage_body(data, servers, importance_sampling={"mode": "mask"}))
    assert mask.stages[0].importance_sampling.mode == "mask"
    sync = recipe_at(tmp_path / "c", model_dir, stage_body(data, servers, max_staleness=0)).stages[0]
    assert sync.importance_sampling is None  # the synchronous default is unchanged
    with pytest.raises(AlignError, match=r"stages\.rl\.importance_sampling: null turns off the correction"):
        recipe_at(tmp_path / "d", model_dir, stage_body(data, servers, importance_sampling=None))


@pytest.mark.parametrize("extra, reason", [
    ({"rollout": {"mode": "colocate"}}, "rollout.mode: colocate runs the engine in this process"),
    ({"offload": True}, "set offload: false"),
])
def test_engines_that_cannot_overlap_are_refused(extra, reason, model_dir, data, tmp_path):
    with pytest.raises(AlignError, match=r"stages\.rl\.max_staleness: ") as err:
        recipe_at(tmp_path, model_dir, stage_body(data, ["http://127.0.0.1:9"], **extra))
    assert reason in " ".join(str(err.value).split())


def test_several_training_processes_are_refused(model_dir, data, tmp_path):
    stage = recipe_at(tmp_path, model_dir, stage_body(data, ["http://127.0.0.1:9"])).stages[0]
    refuse_processes(stage, 1)
    with pytest.raises(AlignError, match=r"stages\.rl\.max_staleness: .*one training process .*has 2"):
        refuse_processes(stage, 2)
