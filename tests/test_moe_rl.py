"""MoE in RL (align.moe.rl) on the nano DeepSeek-V2 (MLA + DeepSeekMoE): the balance loss off by
default and exact when on, frozen routers, the rollout–trainer expert mismatch every step, and
`routing_replay: auto` switching on by measurement (and resuming in the same state)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.data.io import write_jsonl
from align.data.synth import generate
from align.errors import AlignError
from align.models.load import load_causal_lm
from align.moe.rl import RouterLoss, balance_loss, freeze_routers
from align.pipeline import run_pipeline
from align.recipe.load import load_recipe

FIXTURES = Path(__file__).parent / "fixtures"  # char_diversity: a reward that varies in a group


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("moe_rl") / "prompts.jsonl"
    write_jsonl(generate("math", 16, seed=4, form="prompts"), path)
    return path


def recipe(tmp_path: Path, model: Path, prompts: Path, **stage) -> Path:
    body = {"name": "rl", "kind": "grpo", "prompts": str(prompts),
            "rewards": [{"name": f"{FIXTURES}/user_rewards.py:char_diversity"}],
            "group_size": 4, "prompts_per_step": 2, "per_device_batch_size": 8, "max_steps": 2,
            "lr": 1e-2, "beta": 0.0, "sampling": {"max_new_tokens": 8}, "save_steps": 1, **stage}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps({"output_dir": str(tmp_path / "run"), "seed": 0, "model": {"path": str(model)},
                                "logging": {"report_to": ["none"]}, "stages": [body]}))
    return path


def train_steps(tmp_path: Path, model: Path, prompts: Path, **stage) -> list[dict]:
    run_pipeline(load_recipe(recipe(tmp_path, model, prompts, **stage)))
    rows = [json.loads(line) for line in (tmp_path / "run/rl/metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def test_balance_loss_is_one_when_uniform_and_e_when_collapsed():
    uniform = torch.zeros(8, 4)
    assert float(balance_loss(uniform, torch.tensor([[0, 1], [2, 3]] * 4))) == pytest.approx(1.0)
    collapsed = torch.tensor([[50.0, 0, 0, 0]] * 6)
    # every token picks experts 0 and 1 (f = 2, 2, 0, 0), the softmax puts all mass on 0 (P = 1, 0, 0, 0)
    assert float(balance_loss(collapsed, torch.tensor([[0, 1]] * 6))) == pytest.approx(2.0)
    masked = balance_loss(collapsed, torch.tensor([[0, 1]] * 6), torch.tensor([1, 1, 1, 0, 0, 0]))
    assert float(masked) == pytest.approx(2.0)


def test_router_loss_has_gradient_into_the_routers_only_through_their_scores(moe_dir):
    model = load_causal_lm(moe_dir)
    ids = torch.randint(0, 100, (2, 6))
    with RouterLoss(model) as aux:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    loss = aux.loss()
    assert 1.0 <= float(loss.detach()) < 8.0
    loss.backward()
    gate = model.model.layers[1].mlp.gate.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    assert model.lm_head.weight.grad is None  # the loss sits before the head


def test_aux_loss_is_off_by_default_and_adds_exactly_coef_times_aux(tmp_path, moe_dir, prompts):
    off = train_steps(tmp_path / "off", moe_dir, prompts, max_steps=1)[0]
    assert "moe/aux_loss" not in off
    on = train_steps(tmp_path / "on", moe_dir, prompts, max_steps=1, moe_aux_loss_coef=0.5)[0]
    # step 1: same weights, same rollout; only the balance term differs
    assert on["reward"] == off["reward"] and 1.0 <= on["moe/aux_loss"] < 8.0
    assert on["loss"] - off["loss"] == pytest.approx(0.5 * on["moe/aux_loss"], rel=1e-4, abs=1e-6)


def test_frozen_routers_stay_put_while_experts_train(tmp_path, moe_dir, prompts):
    run_pipeline(load_recipe(recipe(tmp_path, moe_dir, prompts, moe_freeze_router=True)))
    before, after = load_file(moe_dir / "model.safetensors"), load_file(tmp_path / "run/rl/final/model.safetensors")
    gates = [k for k in before if k.endswith("mlp.gate.weight")]
    experts = [k for k in before if ".mlp.experts." in k]
    assert gates and experts
    assert all(torch.equal(before[k], after[k]) for k in gates)
    assert any(not torch.equal(before[k], after[k]) for k in experts)  # an expert no token chose keeps its weights


def test_freeze_routers_removes_them_from_the_trainable_parameters(moe_dir):
    model = load_causal_lm(moe_dir)
    assert freeze_routers(model) == 1  # nano: one MoE layer (the first is dense)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["model.layers.1.mlp.gate.weight"]


def test_a_lora_grpo_stage_replays_routes_and_trains_the_experts_adapters(tmp_path, moe_dir, prompts):
    steps = train_steps(tmp_path, moe_dir, prompts, lora={"r": 4, "alpha": 8}, routing_replay=True,
                        num_iterations=2)
    assert [r["moe/replay_on"] for r in steps] == [1.0, 1.0]
    assert steps[0]["moe/route_mismatch"] > 0  # μ = 2: the update moved the routers off the rollout's experts
    before, after = load_file(moe_dir / "model.safetensors"), load_file(tmp_path / "run/rl/final/model.safetensors")
    experts = [k for k in before if ".mlp.experts." in k]
    assert experts and any(not torch.equal(before[k], after[k]) for k in experts)  # merged adapters moved them


def test_freeze_routers_freezes_their_lora_factors_too(moe_dir):
    from align.recipe.schema import LoraConfig
    from align.train_utils import apply_lora

    policy = apply_lora(load_causal_lm(moe_dir), LoraConfig(r=4, alpha=8))  # all-linear adapts the router
    router_factors = [n for n, p in policy.named_parameters() if ".mlp.gate." in n and p.requires_grad]
    assert len(router_factors) == 2  # lora_A, lora_B of the one MoE layer's router
    assert freeze_routers(policy) == 2
    assert not [n for n, p in policy.named_parameters() if ".mlp.gate." in n and p.requires_grad]
    assert any(p.requires_grad for n, p in policy.named_parameters() if ".experts." in n)


def test_route_mismatch_and_replay_state_logged_every_step_without_replay(tmp_path, moe_dir, prompts):
    steps = train_steps(tmp_path, moe_dir, prompts, max_steps=3, num_iterations=2)
    assert [r["moe/replay_on"] for r in steps] == [0.0, 0.0, 0.0]
    # μ = 2: the second pass follows an update at lr 1e-2, so the routers move off the rollout's
    assert all(0.0 <= r["moe/route_mismatch"] <= 1.0 for r in steps) and steps[0]["moe/route_mismatch"] > 0


def test_auto_replay_switches_on_past_the_threshold_and_stays_on(tmp_path, moe_dir, prompts):
    steps = train_steps(tmp_path, moe_dir, prompts, max_steps=3, num_iterations=2, routing_replay="auto",
                        routing_replay_threshold=0.0)
    assert steps[0]["moe/route_mismatch"] > 0
    assert [r["moe/replay_on"] for r in steps] == [0.0, 1.0, 1.0]
    state = json.loads((tmp_path / "run/rl/checkpoint-1/trainer_state.json").read_text())
    assert state["state"]["stage"]["moe"] == {"replay_on": True}  # decided at step 1, saved with it


def test_auto_replay_stays_off_below_the_threshold(tmp_path, moe_dir, prompts):
    steps = train_steps(tmp_path, moe_dir, prompts, max_steps=2, num_iterations=2, routing_replay="auto",
                        routing_replay_threshold=1.0)
    assert [r["moe/replay_on"] for r in steps] == [0.0, 0.0]
    assert steps[0]["moe/route_mismatch"] > 0  # past 0.05, the default threshold


def test_replay_on_logs_its_state(tmp_path, moe_dir, prompts):
    steps = train_steps(tmp_path, moe_dir, prompts, max_steps=1, routing_replay=True)
    assert steps[0]["moe/replay_on"] == 1.0 and steps[0]["moe/route_mismatch"] < 0.1


@pytest.mark.slow
def test_resumed_auto_run_keeps_the_replay_state(tmp_path, moe_dir, prompts):
    """SIGTERM after step 2 (replay switched on at step 1), resume: the same metrics and weights as
    the run that never stopped (a resumed run that re-decided from `off` would differ)."""
    from helpers.reliability import comparable_metrics, interrupt_at, max_abs_diff, train

    stage = dict(max_steps=4, num_iterations=2, routing_replay="auto", routing_replay_threshold=0.0)
    ref, run = tmp_path / "ref", tmp_path / "stopped"
    assert train(recipe(ref, moe_dir, prompts, **stage)).returncode == 0
    path = recipe(run, moe_dir, prompts, **stage)
    assert interrupt_at(path, run / "run/rl", 2, signal.SIGTERM).returncode == 2
    assert train(path).returncode == 0
    assert comparable_metrics(run / "run/rl") == comparable_metrics(ref / "run/rl")
    assert [r["moe/replay_on"] for r in comparable_metrics(ref / "run/rl") if "loss" in r] == [0, 1, 1, 1]
    assert max_abs_diff(run / "run/rl/final/model.safetensors", ref / "run/rl/final/model.safetensors") == 0


@pytest.mark.parametrize("key, value, match", [
    ("routing_replay", True, "routing_replay: the model has no MoE routers"),
    ("routing_replay", "auto", "routing_replay: the model has no MoE routers"),
    ("moe_aux_loss_coef", 0.01, "moe_aux_loss_coef: the model has no MoE routers"),
    ("moe_freeze_router", True, "moe_freeze_router: the model has no MoE routers"),
])
def test_moe_keys_refuse_a_dense_model(tmp_path, model_dir, prompts, key, value, match):
    with pytest.raises(AlignError, match=match):
        run_pipeline(load_recipe(recipe(tmp_path, model_dir, prompts, **{key: value})))


@pytest.mark.parametrize("stage, match", [
    ({"routing_replay_threshold": 0.1}, "routing_replay_threshold only applies with routing_replay: auto"),
    ({"routing_replay": "auto", "routing_replay_threshold": 1.5}, "routing_replay_threshold"),
    ({"moe_aux_loss_coef": -0.1}, "moe_aux_loss_coef"),
    ({"routing_replay": "sometimes"}, "routing_replay"),
])
def test_recipe_validation_names_the_key(tmp_path, moe_dir, prompts, stage, match):
    with pytest.raises(AlignError, match=match):
        load_recipe(recipe(tmp_path, moe_dir, prompts, **stage))


def test_auto_replay_refuses_an_engine_that_cannot_record_routes(tmp_path, moe_dir, prompts):
    with pytest.raises(AlignError, match="routing_replay: true or auto with rollout.engine: vllm"):
        run_pipeline(load_recipe(recipe(tmp_path, moe_dir, prompts, routing_replay="auto",
                                        rollout={"engine": "vllm"})))

