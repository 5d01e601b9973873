"""`align rewards list|test` through typer's runner, with built-ins and TRL's own functions."""

import json
import os
import re
import subprocess
import sys
import types

import pytest
from typer.testing import CliRunner

from align.errors import AlignError
from rewards.cli import app
from rewards.config import RewardSpec
from rewards.reward_set import RewardSet

runner = CliRunner()
ROWS = [
    {"prompt": "What is 6*7?", "completion": r"<think>6*7</think> \boxed{42}", "solution": "42"},
    {"prompt": "What is 2+2?", "completion": "The answer is 5.", "solution": "4"},
]


@pytest.fixture
def samples(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def test_list_shows_builtins():
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    assert all(name in result.output for name in ("math_accuracy", "math_steps", "format", "length", "repetition", "rules", "code_tests"))


def test_json_output_with_weights(samples):
    result = runner.invoke(app, ["test", "-r", "math_accuracy", "-r", "format", "-w", "1", "-w", "0.5",
                                 "-s", str(samples), "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines == [{"rewards": {"math_accuracy": 1.0, "format": 0.0}, "total": 1.0},
                     {"rewards": {"math_accuracy": 0.0, "format": 1.0}, "total": 0.5}]


def test_trl_functions_through_cli(samples):
    result = runner.invoke(app, ["test", "-r", "trl.rewards:accuracy_reward", "-r", "trl.rewards:think_format_reward",
                                 "--chat", "-s", str(samples), "--json"])
    assert result.exit_code == 0, result.output
    totals = [json.loads(line)["rewards"] for line in result.stdout.splitlines()]
    assert totals == [{"accuracy_reward": 1.0, "think_format_reward": 1.0},
                      {"accuracy_reward": 0.0, "think_format_reward": 0.0}]


def test_table_output(samples):
    result = runner.invoke(app, ["test", "-r", "format", "-s", str(samples)])
    assert result.exit_code == 0 and "total" in result.output and "format" in result.output


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"\n', r"samples.jsonl:2: not valid JSON"),
    ('{"prompt": "a"}\n', r"samples.jsonl:1: each line must be an object with `prompt` and `completion`"),
])
def test_bad_lines_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "samples.jsonl"
    path.write_text(content)
    result = runner.invoke(app, ["test", "-r", "format", "-s", str(path)])
    assert isinstance(result.exception, AlignError)
    assert re.search(message, str(result.exception))


def test_weight_count_must_match(samples):
    result = runner.invoke(app, ["test", "-r", "format", "-r", "math_accuracy", "-w", "1", "-s", str(samples)])
    assert isinstance(result.exception, AlignError) and "one per --reward" in str(result.exception)


def test_suite_passes_trainer_kwargs_like_trl():
    seen = {}

    def spy(prompts, completions, completion_ids, trainer_state, log_extra, log_metric, **columns):
        seen.update(columns=sorted(columns), ids=completion_ids, state=trainer_state)
        log_extra("why", ["a", "b"])
        log_metric("spy/calls", 1.0)
        return [0.0, None]

    module = types.ModuleType("spy_rewards")
    module.spy = spy
    sys.modules["spy_rewards"] = module
    try:
        suite = RewardSet([RewardSpec(name="spy_rewards:spy"), RewardSpec(name="trl.rewards:accuracy_reward")])
        chat = [[{"role": "assistant", "content": r"\boxed{3}"}]] * 2
        scored = suite(prompts=[[{"role": "user", "content": "q"}]] * 2, completions=chat, completion_ids=[[1], [2]],
                       trainer_state="STATE", solution=["3", "4"], level=[1, 2])
    finally:
        del sys.modules["spy_rewards"]
    assert seen == {"columns": ["level", "solution"], "ids": [[1], [2]], "state": "STATE"}
    assert scored.extras["why"] == ["a", "b"] and "gold_parsed" in scored.extras  # TRL's accuracy logs there
    assert scored.metrics["spy/calls"] == 1.0
    assert scored.total == [1.0, 0.0]  # sample 0: (0 + 1) * 2/2; sample 1: spy is None -> 0 * 2/1


def test_real_cli_prints_error_with_exit_2(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    proc = subprocess.run([sys.executable, "-m", "align", "rewards", "test", "-r", "format", "-s", str(path)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "300"})  # rich wraps at the terminal width
    assert proc.returncode == 2 and "samples.jsonl:2: not valid JSON" in proc.stderr and "Traceback" not in proc.stderr
