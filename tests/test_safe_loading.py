"""Loading never runs code from a model directory or a recipe: no remote code unless the recipe
sets `trust_remote_code`, no pickle weights unless `allow_pickle_weights` (and then torch's
weights_only loader), YAML through safe_load. Each attack writes a marker file if it runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from align.errors import AlignError
from align.models.load import load_causal_lm

MARKER = "pwned.txt"


@pytest.fixture(scope="module")
def clean_model(tmp_path_factory) -> Path:
    from align.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("safe") / "model", "nano")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def remote_code_model(clean_model, tmp_path) -> Path:
    """The nano model plus an `auto_map` to a modeling file that writes a marker when imported."""
    model = _copy(clean_model, tmp_path / "remote")
    (model / "evil.py").write_text(  # subclasses, not aliases: loading tags its classes as custom code
        f"open({str(tmp_path / MARKER)!r}, 'w').write('ran')\n"
        "from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification\n"
        "class EvilConfig(Qwen2Config): pass\n"
        "class EvilModel(Qwen2ForCausalLM): config_class = EvilConfig\n"
        "class EvilClassifier(Qwen2ForSequenceClassification): config_class = EvilConfig\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel",
                          "AutoModelForSequenceClassification": "evil.EvilClassifier"}
    (model / "config.json").write_text(json.dumps(config))
    return model


def _loaders(path: Path) -> dict:
    from align.recipe.load import load_recipe
    from align.reward_model import load_score_model
    from rewards.model import RewardModelScorer
    from rollout.hf import HFEngine

    def reward_stage():
        recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "tests" / "sft_tiny.yaml",
                             [f"model.path={path}", "model.tiny=null"], check_files=False)
        return load_score_model(recipe, path, pad_id=0)

    return {"align.models.load.load_causal_lm": lambda: load_causal_lm(path),
            "align.reward_model.load_score_model": reward_stage,
            "rewards.model.RewardModelScorer": lambda: RewardModelScorer(path)._load(),
            "rollout.hf.HFEngine.from_pretrained": lambda: HFEngine.from_pretrained(path)}


@pytest.mark.parametrize("loader", ["align.models.load.load_causal_lm", "align.reward_model.load_score_model",
                                    "rewards.model.RewardModelScorer", "rollout.hf.HFEngine.from_pretrained"])
def test_custom_modeling_code_is_never_imported(remote_code_model, loader):
    try:
        _loaders(remote_code_model)[loader]()
    except (AlignError, ValueError, OSError):  # refusing is as good as ignoring the auto_map
        pass
    assert not (remote_code_model.parent / MARKER).exists(), f"{loader} executed the model's own code"


def test_the_attack_is_real_when_the_recipe_opts_in(remote_code_model):
    load_causal_lm(remote_code_model, trust_remote_code=True)
    assert (remote_code_model.parent / MARKER).exists()


class _Evil:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.fixture
def pickle_only_model(clean_model, tmp_path) -> Path:
    model = _copy(clean_model, tmp_path / "pickled")
    (model / "model.safetensors").unlink()
    return model


def test_pickle_only_weights_are_refused_with_a_clear_message(pickle_only_model, clean_model):
    from safetensors.torch import load_file

    torch.save(load_file(clean_model / "model.safetensors"), pickle_only_model / "pytorch_model.bin")
    with pytest.raises(AlignError, match="only pickle weights.*allow_pickle_weights"):
        load_causal_lm(pickle_only_model)
    loaded = load_causal_lm(pickle_only_model, allow_pickle=True)  # opted in: loads the plain tensors
    expected = load_file(clean_model / "model.safetensors")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())


def test_a_malicious_pickle_is_not_executed_even_when_pickles_are_allowed(pickle_only_model, tmp_path):
    marker = tmp_path / MARKER
    torch.save({"model.embed_tokens.weight": _Evil(marker)}, pickle_only_model / "pytorch_model.bin")
    with pytest.raises(Exception) as err:  # torch's weights_only unpickler refuses the global
        load_causal_lm(pickle_only_model, allow_pickle=True)
    assert not marker.exists()
    assert "weights_only" in str(err.value) or "Unsupported global" in str(err.value)


def test_yaml_python_tags_are_refused_not_executed(tmp_path):
    from align.recipe.load import load_recipe

    marker = tmp_path / MARKER
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"name: x\nmodel: !!python/object/apply:os.system ['touch {marker}']\nstages: []\n")
    with pytest.raises(AlignError, match=r"evil.yaml:2: not valid YAML"):
        load_recipe(recipe)
    assert not marker.exists()
