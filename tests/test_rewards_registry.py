"""Registry: built-ins, module paths, file paths, factories, TRL functions unchanged, errors."""

import pickle

import pytest

from align.errors import AlignError
from rewards.config import RewardSpec
from rewards.registry import BUILTINS, build, builtin_docs, resolve

CHAT = [[{"role": "assistant", "content": r"<think>ok</think> \boxed{\frac{1}{3}}"}],
        [{"role": "assistant", "content": r"\boxed{\frac{1}{2}}"}]]


def test_every_builtin_resolves_and_pickles():
    defaults = {"length": {"max_length": 10, "cache": 5}}
    for name in BUILTINS:
        fn = resolve(name, defaults.get(name))
        assert callable(fn)
        assert callable(pickle.loads(pickle.dumps(fn)))
    assert set(builtin_docs()) == set(BUILTINS)


def test_unknown_name_suggests():
    with pytest.raises(AlignError, match="did you mean `math_accuracy`.*Built-ins: math_accuracy"):
        resolve("math_acuracy")


def test_bad_kwargs_name_the_signature():
    with pytest.raises(AlignError, match="bad kwargs.*max_length"):
        resolve("length", {"max_len": 3})


def test_trl_functions_unchanged():
    accuracy = resolve("trl.rewards:accuracy_reward")
    assert accuracy(prompts=[[]] * 2, completions=CHAT, solution=[r"\frac{1}{3}"] * 2) == [1.0, 0.0]
    think = resolve("trl.rewards:think_format_reward")
    assert think(prompts=[[]] * 2, completions=CHAT) == [1.0, 0.0]
    overlong = resolve("trl.rewards:get_soft_overlong_punishment", {"max_completion_len": 100, "soft_punish_cache": 20})
    assert overlong(prompts=[""], completions=[""], completion_ids=[[1] * 90]) == [-0.5]


def test_user_file_and_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def short(prompts, completions, **kw):\n    return [1.0 if len(c) < 5 else 0.0 for c in completions]\n"
        "class Scaled:\n    def __init__(self, factor=2.0):\n        self.factor = factor\n"
        "    def __call__(self, prompts, completions, **kw):\n        return [self.factor] * len(completions)\n")
    by_file = resolve(f"{tmp_path}/my_rewards.py:short")
    assert by_file(prompts=["", ""], completions=["abc", "abcdef"]) == [1.0, 0.0]
    assert pickle.loads(pickle.dumps(by_file)) is by_file
    assert resolve("my_rewards.py:Scaled", {"factor": 3.0}, base_dir=tmp_path)(prompts=[""], completions=[""]) == [3.0]
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve("my_rewards:Scaled")(prompts=[""], completions=[""]) == [2.0]


@pytest.mark.parametrize("name, message", [
    ("no_such_module_xyz:f", "cannot import module"),
    ("os:no_such_function", "has no attribute"),
    ("missing/file.py:f", "does not exist"),
    ("os:sep", "not a function"),
])
def test_import_errors(name, message):
    with pytest.raises(AlignError, match=message):
        resolve(name)


def test_spec_validation():
    with pytest.raises(ValueError, match="exactly one"):
        RewardSpec(name="format", model="./rm")
    with pytest.raises(ValueError, match="extra"):
        RewardSpec(name="format", wieght=2)
    assert RewardSpec(name="trl.rewards:accuracy_reward").key == "accuracy_reward"
    assert RewardSpec(model="runs/rm-safety/").key == "rm-safety"
    with pytest.raises(AlignError, match="config.json"):
        build(RewardSpec(model="/nonexistent/rm"))
