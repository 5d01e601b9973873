"""Every recipe key is documented once, in the schema, and `align recipe` prints that documentation."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from align.cli import app
from align.recipe.schema import GRPOStage, Recipe
from align.errors import AlignError
from align.recipe.load import load_recipe

ROOT = Path(__file__).resolve().parents[1]
GRPO_TINY = ROOT / "recipes" / "tests" / "grpo_tiny.yaml"


def reachable_models(tp, seen: dict[str, type[BaseModel]] | None = None) -> dict[str, type[BaseModel]]:
    """Every pydantic model a type refers to, found by walking all type arguments (Optional, list,
    dict, Annotated, unions, discriminated unions) and every field of every model found."""
    seen = {} if seen is None else seen
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        if tp.__qualname__ not in seen:
            seen[tp.__qualname__] = tp
            for field in tp.model_fields.values():
                reachable_models(field.annotation, seen)
    for arg in get_args(tp):
        reachable_models(arg, seen)
    return seen


def test_every_recipe_key_has_a_description():
    models = reachable_models(Recipe)
    # the walk reaches the nested sections, the three stage kinds and the packages' own schemas
    assert {"ModelConfig", "TinyModelSpec", "SynthSpec", "SFTStage", "RewardModelStage", "GRPOStage",
            "DataSource", "LoraConfig", "SamplingConfig", "RolloutConfig", "RewardSpec", "RewardsConfig",
            "LoggingConfig", "EvaluateConfig"} <= set(models)
    missing = [f"{name}.{key}" for name, model in models.items()
               for key, field in model.model_fields.items() if not (field.description or "").strip()]
    assert not missing, f"{len(missing)} recipe key(s) without a description=: {', '.join(missing)}"


def run(*args: str, columns: int = 200):
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": str(columns)})
    return result, result.output.splitlines()


def leaf_paths(node, prefix: str = ""):
    """Dotted paths of a dumped recipe's values (non-empty mappings and lists of them are opened;
    stages are named by name, as --set takes them). Right for recipes whose free-form mappings
    (`kwargs`, `when`) are empty, as in grpo_tiny.yaml."""
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from leaf_paths(value, f"{prefix}.{key}" if prefix else key)
    elif isinstance(node, list) and node and all(isinstance(v, dict) and v for v in node):
        for i, item in enumerate(node):
            yield from leaf_paths(item, f"{prefix}.{item['name'] if prefix == 'stages' else i}")
    else:
        yield prefix


def test_check_explain_prints_every_key_with_its_value_and_description():
    result, lines = run("recipe", "check", str(GRPO_TINY), "--explain", "--set", "stages.rl.beta=0.1")
    assert result.exit_code == 0, result.output
    assert "stages.rl.beta = 0.1  (default 0.04)" in lines  # an override, and the default it replaced
    assert "stages.rl.group_size = 4  (default 8)" in lines  # a recipe value
    assert "stages.rl.loss_type = grpo" in lines  # a default, unmarked
    below = lines[lines.index("stages.rl.loss_type = grpo") + 1].strip()
    assert below and GRPOStage.model_fields["loss_type"].description.startswith(below)
    heads = [line.split(" = ")[0] for line in lines if " = " in line and not line.startswith(" ")]
    leaves = list(leaf_paths(load_recipe(GRPO_TINY, check_files=False).model_dump(mode="json")))
    assert len(leaves) > 100 and "stages.rl.rollout.engine" in leaves and "stages.rl.rewards.1.weight" in leaves
    assert heads == leaves  # every value of the recipe, in order, each once
    assert lines[-1].startswith("ok: ")


def test_explain_fits_the_terminal_width():
    result, lines = run("recipe", "check", str(GRPO_TINY), "--explain", columns=80)
    assert result.exit_code == 0, result.output
    assert max(len(line.rstrip()) for line in lines) <= 80


def test_keys_lists_one_kind_with_types_and_defaults():
    result, lines = run("recipe", "keys", "--kind", "grpo")
    assert result.exit_code == 0, result.output
    text = result.output
    assert "stages.*.loss_type: grpo | bnpo | dr_grpo | dapo = grpo" in lines
    assert "stages.*.beta: float (≥ 0) = 0.04" in lines
    assert "stages.*.rewards.*.weight: float = 1.0" in lines
    assert "stages.*.lr: float (> 0) = 5e-06" in lines  # shared by every kind, listed with it
    assert "stages.*.packing" not in text and "model.path" not in text  # sft's and the recipe's keys: not asked for


def test_keys_lists_shared_stage_keys_once_and_filters_by_text():
    result, lines = run("recipe", "keys")
    assert result.exit_code == 0, result.output
    assert sum(line.startswith("stages.*.seed:") for line in lines) == 1  # one definition in every kind
    # a key a kind redefines (DPO's lr default, TRL's 1e-6) is listed under each kind instead
    assert sum(line.startswith("stages.*.lr:") for line in lines) == 4
    assert "model.path: str, required" in lines
    result, lines = run("recipe", "keys", "epsilon")
    heads = [line for line in lines if line.startswith("stages.")]
    assert heads == ["stages.*.epsilon_low: float (> 0) = 0.2", "stages.*.epsilon_high: float (> 0) = 0.2"]


@pytest.mark.parametrize("args, message", [(("--kind", "ppo"), "choose one of dpo, grpo, reward_model, sft"),
                                           (("no_such_key",), "no recipe key contains 'no_such_key'")])
def test_keys_rejects_an_unknown_kind_or_key(args, message):
    result, _ = run("recipe", "keys", *args)
    assert isinstance(result.exception, AlignError) and message in str(result.exception)
