"""`align eval` end to end on real nano models (HF engine): every suite writes results.json,
report.md, samples.jsonl and valid PNGs; the same seed gives byte-identical results; run
directories expand to their stages; bad suite files fail with the key and line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from align.cli import app
from align.errors import AlignError

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
FAST = ["--engine", "hf", "--limit", "2", "--k", "1,2", "--max-new-tokens", "8", "--seed", "7"]
ALL_SUITES = ["math", "code", "reward", "safety", "loss"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Two policies (different seeds) and a reward model built on the nano config."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from align.models.load import load_tokenizer
    from align.models.tiny import build_tiny

    root = tmp_path_factory.mktemp("eval_models")
    sft, grpo = build_tiny(root / "sft", "nano", seed=0), build_tiny(root / "grpo", "nano", seed=1)
    config = AutoConfig.from_pretrained(sft, num_labels=1)
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_config(config)
    rm.save_pretrained(root / "rm", safe_serialization=True)
    load_tokenizer(sft).save_pretrained(root / "rm")
    return {"sft": sft, "grpo": grpo, "rm": root / "rm"}


@pytest.fixture(scope="module")
def run_dir(models, tmp_path_factory) -> Path:
    """A run directory as the pipeline writes it: stages in order, a reward model among them."""
    run = tmp_path_factory.mktemp("run")
    stages = {"sft": {"status": "done", "kind": "sft", "final": str(models["sft"])},
              "helpful_rm": {"status": "done", "kind": "reward_model", "final": str(models["rm"])},
              "reasoning": {"status": "done", "kind": "grpo", "final": str(models["grpo"])},
              "preference": {"status": "running", "kind": "grpo", "checkpoint": "x"}}
    (run / "manifest.json").write_text(json.dumps({"recipe": "t", "stages": stages}))
    return run


@pytest.fixture(scope="module")
def user_suite(tmp_path_factory) -> Path:
    from align.data.io import write_jsonl
    from align.data.synth import generate

    d = tmp_path_factory.mktemp("user_suite")
    write_jsonl(generate("chat", 4, seed=3, form="prompts"), d / "prompts.jsonl")
    (d / "brevity.yaml").write_text(
        "name: brevity\nprompts: prompts.jsonl\nrewards:\n"
        "  - {name: rules, alias: short, kwargs: {max_words: 3}}\n"
        "  - {name: repetition, weight: 0.5}\n")
    return d / "brevity.yaml"


def invoke(args: list[str]):
    result = CliRunner().invoke(app, ["eval", *map(str, args)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def two_runs(run_dir, user_suite, tmp_path_factory) -> tuple[Path, Path]:
    outs = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    suites = [x for s in [*ALL_SUITES, str(user_suite)] for x in ("--suite", s)]
    for out in outs:
        invoke([run_dir, *suites, "--prompts", f"code={FIXTURES / 'code_problems.jsonl'}", *FAST, "--out", out])
    return outs


@pytest.mark.slow
def test_every_suite_reports_for_every_stage(two_runs, models):
    out = two_runs[0]
    results = json.loads((out / "results.json").read_text())
    assert [c["label"] for c in results["checkpoints"]] == ["sft", "reasoning"]  # RM and unfinished skipped
    assert results["meta"]["judge"] == str(models["rm"])  # the run's reward model judges
    suites = results["suites"]
    assert set(suites) == {*ALL_SUITES, "brevity"}
    assert set(suites["math"]) == {"greedy_accuracy", "format", "pass@1", "pass@2"}
    assert set(suites["safety"]) == {"refusal_rate", "over_refusal"}
    assert suites["safety"]["over_refusal"]["higher_is_better"] is False
    assert set(suites["brevity"]) == {"short", "repetition", "reward"}
    assert suites["reward"]["win_rate"]["values"]["sft"] == 0.5  # the baseline against itself
    for suite in suites.values():
        for metric in suite.values():
            assert set(metric["values"]) == {"sft", "reasoning"}
    for name in ("math", "code", "safety"):
        for metric in suites[name].values():
            assert all(0.0 <= v <= 1.0 for v in metric["values"].values())
    loss = suites["loss"]
    for label in ("sft", "reasoning"):  # perplexity is exp(loss); a random 1k-vocab model sits near ln(1024)
        assert loss["perplexity"]["values"][label] == pytest.approx(2.718281828 ** loss["loss"]["values"][label])
        assert 5.0 < loss["loss"]["values"][label] < 9.0
    report = (out / "report.md").read_text()
    assert "| suite | metric | sft | reasoning (Δ vs sft) |" in report and "## Alignment tax" in report


@pytest.mark.slow
def test_plots_are_valid_pngs(two_runs):
    from PIL import Image

    plots = sorted((two_runs[0] / "plots").glob("*.png"))
    assert [p.stem for p in plots] == sorted([*ALL_SUITES, "brevity"])
    for path in plots:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as image:
            image.verify()
            assert image.size[0] > 100 and image.size[1] > 100


@pytest.mark.slow
def test_same_seed_gives_identical_results(two_runs):
    a, b = two_runs
    assert (a / "results.json").read_bytes() == (b / "results.json").read_bytes()
    # ... because the completions themselves are identical, sampled ones included
    assert (a / "samples.jsonl").read_bytes() == (b / "samples.jsonl").read_bytes()
    rows = [json.loads(line) for line in (a / "samples.jsonl").read_text().splitlines()]
    math_rows = [r for r in rows if r["suite"] == "math" and r["checkpoint"] == "sft"]
    assert len(math_rows) == 2 + 2 * 2  # greedy + 2 samples per prompt for pass@2


@pytest.mark.slow
def test_math_pass_at_k_counts_correct_samples(models, tmp_path):
    """A random model's samples hold stray numbers: make one of them each prompt's answer, then
    pass@k in results.json must equal the closed form over the verdicts recomputed here (lax
    scoring: a random model states no anchored answer)."""
    from math import comb

    from math_verify import parse, verify

    from align.data.io import write_jsonl
    from align.data.synth import generate

    rows, data, n = list(generate("math", 3, seed=11, form="prompts")), tmp_path / "p.jsonl", 4
    args = [models["sft"], "--suite", "math", "--prompts", f"math={data}", "--engine", "hf", "--k", "1,2,4",
            "--samples", str(n), "--temperature", "1.0", "--max-new-tokens", "24", "--seed", "3"]

    def run(answers: list[str], scoring: str = "--math-lax") -> tuple[dict, list[dict]]:
        write_jsonl([{**r, "answer": a} for r, a in zip(rows, answers)], data)
        out = tmp_path / "out"
        invoke([*args, scoring, "--out", out])
        sampled = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()][len(rows):]
        return json.loads((out / "results.json").read_text())["suites"]["math"], sampled

    _, sampled = run(["0"] * len(rows))
    stated = [[str(p[-1]) for s in sampled[i * n:(i + 1) * n] if (p := parse(s["completion"]))] for i in range(3)]
    answers = [found[0] if found else "0" for found in stated]
    math, sampled = run(answers)  # same seed: the same samples, now scored against these answers
    correct = [sum(verify(parse(answers[i]), parse(s["completion"])) for s in sampled[i * n:(i + 1) * n])
               for i in range(3)]
    assert sum(correct) > 0, "no sample stated a number; the check would be vacuous"
    for k in (1, 2, 4):
        expected = sum(1 - comb(n - c, k) / comb(n, k) for c in correct) / 3
        assert math[f"pass@{k}"]["values"]["sft"] == pytest.approx(expected)
    strict, _ = run(answers, "--math-strict")  # the default: stray numbers are not answers
    assert strict["pass@4"]["values"]["sft"] == 0.0


def test_code_fixture_is_solvable_by_reference_solutions():
    """The shipped code problems pass with correct code and fail with wrong code, in the sandbox."""
    from rewards.code import CodeTests

    rows = [json.loads(line) for line in (FIXTURES / "code_problems.jsonl").read_text().splitlines()]
    solutions = ["def add(a, b):\n    return a + b", "def is_even(n):\n    return n % 2 == 0",
                 "def reverse(s):\n    return s[::-1]", "def largest(xs):\n    return max(xs)",
                 "def count_vowels(s):\n    return sum(c in 'aeiou' for c in s)"]
    reward = CodeTests(wall_s=10)
    right = reward(prompts=[r["prompt"] for r in rows], completions=[f"```python\n{s}\n```" for s in solutions],
                   tests=[r["tests"] for r in rows])
    wrong = reward(prompts=[r["prompt"] for r in rows], completions=["def nothing():\n    pass"] * len(rows),
                   tests=[r["tests"] for r in rows])
    assert right == [1.0] * 5 and wrong == [0.0] * 5


def test_explicit_checkpoints_are_labelled_by_directory(tmp_path):
    from align.evaluate.checkpoints import resolve_checkpoints

    for name in ("base", "sft/final", "other/final"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "config.json").write_text("{}")
    resolved = resolve_checkpoints([tmp_path / "base", tmp_path / "sft/final"])
    assert [c.label for c in resolved.checkpoints] == ["base", "sft"]
    with pytest.raises(AlignError, match="no config.json"):
        resolve_checkpoints([tmp_path / "nowhere"])


def test_unknown_suite_lists_the_suites(tmp_path):
    from align.evaluate.context import EvalOptions
    from align.evaluate.suites import build_suite

    with pytest.raises(AlignError, match=r"unknown suite 'maths'; did you mean 'math'\? Suites: math, code"):
        build_suite("maths", EvalOptions(out=tmp_path))


def test_malformed_suite_yaml_names_file_line_and_key(models, tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    bad = tmp_path / "bad.yaml"
    bad.write_text("prompts: p.jsonl\nrewards:\n  - {name: rules}\n  - {nam: format}\nsampels: 2\n")
    result = subprocess.run([sys.executable, "-m", "align", "eval", str(models["sft"]), "--suite", str(bad),
                             "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())  # rich wraps long lines
    assert "the suite has 2 problem(s)" in message
    assert "bad.yaml:4: rewards[1].nam: unknown key 'nam'; did you mean 'name'?" in message
    assert "bad.yaml:5: sampels: unknown key 'sampels'; did you mean 'samples'?" in message
    assert not (tmp_path / "o").exists()  # nothing ran


def test_suite_yaml_value_errors_name_the_key(tmp_path):
    from align.evaluate.suites.user import load_spec

    bad = tmp_path / "bad.yaml"
    bad.write_text("prompts: p.jsonl\nrewards:\n  - {name: rules, model: x}\nsamples: 0\n")
    with pytest.raises(AlignError) as err:
        load_spec(bad)
    assert f"{bad}:3: rewards[0]: a reward needs exactly one of `name`" in str(err.value)
    assert f"{bad}:4: samples: Input should be greater than or equal to 1" in str(err.value)
