"""`align data check` and `align data synth` through the CLI, on real files and a real tokenizer."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from typer.testing import CliRunner

from align.data.check import percentiles
from align.data.cli import app
from align.data.synth import corpus

runner = CliRunner()

FIVE_DEFECTS = [
    '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}',
    '{"messages": [{"role": "user", "content": "hi"}, {"role": "asistant", "content": "hello"}]}',
    '{"messages": [{"role": "user", "content": "hi"',
    '{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}',
    '{"msgs": [{"role": "user", "content": "hi"}]}',
    '{"messages": [{"role": "user", "content": "hi"}], "category": "safety"}',
    '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}',
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from align.models.tiny import train_tokenizer

    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(corpus(500, seed=0), vocab_size=400).save_pretrained(path)
    return path


def test_five_defects_all_reported_with_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(FIVE_DEFECTS) + "\n")
    result = runner.invoke(app, ["check", str(path)], terminal_width=200)
    assert result.exit_code == 1
    for line, words in ((2, "did you mean 'assistant'?"), (3, "invalid JSON"), (4, "(user turn) is empty"),
                        (5, "no 'messages' field"), (6, "no assistant turn")):
        assert f"{path}:{line}: " in result.output and words in result.output
    as_json = json.loads(runner.invoke(app, ["check", str(path), "--json"]).output)
    assert as_json["rows"]["good"] == 2 and as_json["rows"]["bad"] == 5
    # line 4: the empty user turn is dropped, then the assistant turn left first, then nothing is left
    assert as_json["rows"]["defects"] == {"unknown_role": 1, "bad_json": 1, "empty_turn": 1, "leading_assistant": 1,
                                          "missing_field": 1, "no_assistant_turn": 2}


def test_synth_then_check_with_tokenizer(tmp_path, tokenizer_dir):
    out = tmp_path / "chat.jsonl"
    result = runner.invoke(app, ["synth", "--kind", "chat", "--n", "400", "--seed", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["check", str(out), "--tokenizer", str(tokenizer_dir), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["kind"] == "conversations" and report["rows"]["good"] == 400
    assert sum(report["categories"].values()) == 400 and set(report["categories"]) == {"helpfulness", "safety"}
    assert report["roles"]["user"] == report["roles"]["assistant"]
    tokens = report["tokens"]
    assert 0 < tokens["p50"] <= tokens["p90"] <= tokens["p99"] <= tokens["max"]
    table = runner.invoke(app, ["check", str(out), "--tokenizer", str(tokenizer_dir)], terminal_width=200)
    assert "tokens (per sequence)" in table.output and "safety" in table.output


def test_prompts_are_measured_with_generation_prompt(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    out = tmp_path / "math.parquet"
    runner.invoke(app, ["synth", "--kind", "math", "--format", "prompts", "--n", "50", "--out", str(out)])
    report = json.loads(runner.invoke(app, ["check", str(out), "--tokenizer", str(tokenizer_dir), "--json"]).output)
    assert report["kind"] == "prompts" and report["turns"]["max"] == 1
    import pyarrow.parquet as pq

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    prompts = pq.read_table(out).column("prompt").to_pylist()
    lengths = [len(tok.apply_chat_template(p, add_generation_prompt=True, return_dict=True)["input_ids"])
               for p in prompts]
    assert report["tokens"]["max"] == max(lengths)


def test_empty_file_fails(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    result = runner.invoke(app, ["check", str(tmp_path / "empty.jsonl")])
    assert result.exit_code == 1 and "no rows" in result.output


def test_missing_path_is_a_user_error(tmp_path):
    from align.errors import AlignError

    result = runner.invoke(app, ["check", str(tmp_path / "nope.jsonl")])
    assert isinstance(result.exception, AlignError) and "no such file" in str(result.exception)


def test_installed_command_exit_codes(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(FIVE_DEFECTS) + "\n")
    run = [sys.executable, "-m", "align", "data", "check"]
    result = subprocess.run([*run, str(bad)], capture_output=True, text=True)
    assert result.returncode == 1 and f"{bad}:6: " in result.stdout
    result = subprocess.run([*run, str(tmp_path / "nope.jsonl")], capture_output=True, text=True)
    assert result.returncode == 2 and "no such file" in result.stderr and "Traceback" not in result.stderr


def test_percentiles_from_histogram():
    hist = Counter({1: 50, 2: 40, 10: 9, 100: 1})  # 100 values
    assert percentiles(hist) == {"p50": 1, "p90": 2, "p99": 10, "max": 100, "mean": 3.2}
    assert percentiles(Counter()) == {}
