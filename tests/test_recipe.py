"""Recipe schema and loader: every shipped recipe validates; every mistake gets a useful message."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from align.errors import AlignError
from align.recipe.load import apply_override, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)

MINIMAL = """\
model: {{path: {model}}}
stages:
  - name: sft
    kind: sft
    data: {data}
{extra}"""


@pytest.fixture
def files(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    data = tmp_path / "conv.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    return model, data


def write(tmp_path, files, extra="", **subs):
    model, data = files
    path = tmp_path / "recipe.yaml"
    path.write_text(MINIMAL.format(model=subs.get("model", model), data=subs.get("data", data), extra=extra))
    return path


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_recipe_validates(recipe):
    loaded = load_recipe(recipe, check_files=False)
    assert loaded.stages


def test_misspelt_key_suggests_the_right_one_with_path_and_line(tmp_path, files):
    path = write(tmp_path, files, extra="    epochz: 2\n")
    with pytest.raises(AlignError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert f"{path}:6: stages[0].epochz: unknown key 'epochz'; did you mean 'epochs'?" in msg


def test_misspelt_nested_key_in_a_grpo_stage(tmp_path, files):
    extra = ("  - name: rl\n    kind: grpo\n    init: sft\n    prompts: {data}\n"
             "    rewards: [{{name: math_accuracy}}]\n    rollout: {{engin: vllm}}\n").format(data=files[1])
    with pytest.raises(AlignError) as err:
        load_recipe(write(tmp_path, files, extra=extra))
    assert "stages[1].rollout.engin: unknown key 'engin'; did you mean 'engine'?" in str(err.value)


def test_wrong_type_names_value_and_expected_type(tmp_path, files):
    with pytest.raises(AlignError) as err:
        load_recipe(write(tmp_path, files, extra="    lr: fast\n"))
    msg = str(err.value)
    assert "stages[0].lr" in msg and "valid number" in msg and "'fast'" in msg


def test_unknown_stage_kind_lists_the_kinds(tmp_path, files):
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{path: {files[0]}}}\nstages: [{{name: a, kind: ppo, data: x}}]\n")
    with pytest.raises(AlignError) as err:
        load_recipe(path)
    assert "'sft', 'reward_model', 'grpo'" in str(err.value)


def test_missing_data_file_names_the_path(tmp_path, files):
    with pytest.raises(AlignError) as err:
        load_recipe(write(tmp_path, files, data=tmp_path / "nope.jsonl"))
    assert "stages[0].data[0].path" in str(err.value) and "nope.jsonl does not exist" in str(err.value)


def test_missing_model_dir_names_the_path(tmp_path, files):
    with pytest.raises(AlignError) as err:
        load_recipe(write(tmp_path, files, model=tmp_path / "absent"))
    assert "model.path" in str(err.value) and "absent" in str(err.value)


def test_init_must_name_an_earlier_stage(tmp_path, files):
    with pytest.raises(AlignError) as err:
        load_recipe(write(tmp_path, files, extra="    init: rl\n"))
    assert "stages[0].init: 'rl' is not an earlier stage" in str(err.value)


@pytest.mark.parametrize("extra, message", [
    ("evaluate: {stages: [rm]}\n", "evaluate.stages[0]: 'rm' is not a policy stage; use one of ['sft']"),
    ("evaluate: {judge: sft}\n", "evaluate.judge: 'sft' is not a reward_model stage; use one of ['rm']"),
    ("evaluate: {suites: []}\n", "evaluate.suites"),
])
def test_evaluate_section_names_real_stages(tmp_path, files, extra, message):
    rm = "  - name: rm\n    kind: reward_model\n    init: sft\n    data: {data}\n".format(data=files[1])
    with pytest.raises(AlignError) as err:
        load_recipe(write(tmp_path, files, extra=rm + extra))
    assert message in str(err.value)


def test_invalid_yaml_gives_the_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  path: [unclosed\nstages: []\n")
    with pytest.raises(AlignError) as err:
        load_recipe(path)
    assert f"{path}:" in str(err.value) and "not valid YAML" in str(err.value)


def test_overrides_by_index_and_by_stage_name(tmp_path, files):
    r = load_recipe(write(tmp_path, files), ["stages.0.lr=1e-5", "stages.sft.epochs=3", "seed=7"])
    assert r.stages[0].lr == 1e-5 and r.stages[0].epochs == 3 and r.seed == 7


def test_override_errors_are_clear():
    data = {"stages": [{"name": "sft"}]}
    with pytest.raises(AlignError, match="expected KEY=VALUE"):
        apply_override(data, "stages.0.lr")
    with pytest.raises(AlignError, match="no item named 'rl'"):
        apply_override(data, "stages.rl.lr=1")
    with pytest.raises(AlignError, match="out of range"):
        apply_override(data, "stages.3.lr=1")


def test_stage_hash_changes_with_the_stage_and_its_ancestors(tmp_path, files):
    extra = ("  - name: rl\n    kind: grpo\n    init: sft\n    prompts: {data}\n"
             "    rewards: [{{name: math_accuracy}}]\n").format(data=files[1])
    path = write(tmp_path, files, extra=extra)
    base = load_recipe(path)
    assert load_recipe(path, ["stages.rl.beta=0.1"]).stage_hash("sft") == base.stage_hash("sft")
    assert load_recipe(path, ["stages.rl.beta=0.1"]).stage_hash("rl") != base.stage_hash("rl")
    assert load_recipe(path, ["stages.sft.lr=1e-4"]).stage_hash("rl") != base.stage_hash("rl")


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "align", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_recipe_check_misspelt_key_exits_nonzero_with_suggestion(tmp_path, files):
    proc = _cli("recipe", "check", str(write(tmp_path, files, extra="    epochz: 2\n")))
    assert proc.returncode == 2
    assert "did you mean 'epochs'?" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_recipe_check_prints_the_resolved_recipe(tmp_path, files):
    proc = _cli("recipe", "check", str(write(tmp_path, files)), "--set", "stages.0.lr=3e-5")
    assert proc.returncode == 0, proc.stderr
    assert "lr: 3.0e-05" in proc.stdout and "max_grad_norm: 1.0" in proc.stdout


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dry_run_every_recipe(recipe):
    proc = _cli("train", str(recipe), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "dry run" in proc.stdout and "steps" in proc.stdout


def test_readme_quickstart_command_resolves():
    """`make quickstart` runs the command under the Makefile's quickstart target: it must parse."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    command = lines[lines.index("quickstart: setup") + 1].strip().replace("$(PY)", sys.executable)
    proc = subprocess.run([*command.split(), "--dry-run"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "dry run: quickstart" in proc.stdout


def test_moe_quickstart_is_the_quickstart_on_deepseek_v2():
    """quickstart_moe.yaml differs from quickstart.yaml only in name, paths, architecture, replay and
    the reasoning stage's sampling and eval_steps (T = 0.3 with dynamic sampling: at T = 1 the MoE
    model's stage lost greedy accuracy, docs/benchmarks.md)."""
    dense = load_recipe(ROOT / "recipes" / "quickstart.yaml", check_files=False).model_dump(mode="json")
    moe = load_recipe(ROOT / "recipes" / "quickstart_moe.yaml", check_files=False).model_dump(mode="json")
    moe_text = json.dumps(moe).replace("runs/quickstart-moe", "runs/quickstart")
    moe = json.loads(moe_text)
    assert moe["model"]["tiny"].pop("arch") == "deepseek_v2" and dense["model"]["tiny"].pop("arch") == "qwen2"
    for stage in moe["stages"]:
        if stage["kind"] == "grpo":
            assert stage["routing_replay"] is True
            stage["routing_replay"] = False
    reasoning = next(s for s in moe["stages"] if s["name"] == "reasoning")
    assert (reasoning["sampling"]["temperature"], reasoning["dynamic_sampling"]["max_rounds"]) == (0.3, 3)
    dense_reasoning = next(s for s in dense["stages"] if s["name"] == "reasoning")
    for key in ("sampling", "dynamic_sampling", "eval_steps"):
        reasoning[key] = dense_reasoning[key]
    moe["name"] = dense["name"]
    assert moe == dense


def test_tiny_llama_arch_builds_a_smollm2_shaped_model(tmp_path, files):
    """`model.tiny.arch: llama` gives what real chat models bring: Llama, tied embeddings, pad = eos."""
    from rich.console import Console
    from transformers import AutoConfig, AutoTokenizer

    from align.pipeline import Manifest, prepare_inputs

    model_dir = tmp_path / "built"
    path = write(tmp_path, files, model=f"{model_dir}, tiny: {{size: nano, arch: llama}}")
    recipe = load_recipe(path, check_files=False)
    prepare_inputs(recipe, Manifest.load(tmp_path / "out"), Console(quiet=True))
    config, tok = AutoConfig.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    assert (config.model_type, config.tie_word_embeddings) == ("llama", True)
    assert tok.pad_token_id == tok.eos_token_id
