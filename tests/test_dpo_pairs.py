"""`align data pairs`: samples from a real checkpoint (HF engine), labelled by a real reward model.

The reward model is the nano backbone with a seeded, untrained score head: its scores are real
(and deterministic), which is all the labelling needs. The file must pass `align data check`,
record chosen above rejected with the scores the scorer gives, be the same bytes for the same seed,
and feed a dpo stage.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from align.data.cli import app
from align.data.io import write_jsonl
from align.data.pairs import label_pair
from align.data.synth import generate

runner = CliRunner()


@pytest.fixture(scope="module")
def reward_model(model_dir, tmp_path_factory):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("rm")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    with torch.no_grad():
        model.score.weight.mul_(50.0)  # spread the untrained scores so ties are rare
    model.config.pad_token_id = AutoTokenizer.from_pretrained(model_dir).pad_token_id
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    write_jsonl(generate("chat", 6, seed=3, form="prompts"), path)
    return path


def _pairs(model_dir, prompts, reward_model, out, seed=0):
    return runner.invoke(app, ["pairs", "--model", str(model_dir), "--prompts", str(prompts), "--reward-model",
                               str(reward_model), "--n-samples", "3", "--seed", str(seed), "--max-new-tokens", "8",
                               "--out", str(out)])


def test_pairs_are_a_valid_preference_file_labelled_by_the_reward_model(model_dir, prompts, reward_model, tmp_path):
    from rewards.model import RewardModelScorer

    done = _pairs(model_dir, prompts, reward_model, tmp_path / "a.jsonl")
    assert done.exit_code == 0, done.output
    assert "samples" in done.output and "18 samples" in done.output  # 6 prompts × 3
    check = runner.invoke(app, ["check", str(tmp_path / "a.jsonl"), "--kind", "preferences"])
    assert check.exit_code == 0, check.output
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert rows and all(r["chosen_score"] > r["rejected_score"] for r in rows)
    assert all(r["chosen"][0]["role"] == "assistant" for r in rows)
    scorer = RewardModelScorer(reward_model)
    rescored = scorer([r["prompt"] for r in rows] * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows])
    torch.testing.assert_close(torch.tensor(rescored), torch.tensor([r["chosen_score"] for r in rows]
                                                                    + [r["rejected_score"] for r in rows]))

    again = _pairs(model_dir, prompts, reward_model, tmp_path / "b.jsonl")
    assert again.exit_code == 0 and (tmp_path / "b.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()
    other = _pairs(model_dir, prompts, reward_model, tmp_path / "c.jsonl", seed=1)
    assert other.exit_code == 0 and (tmp_path / "c.jsonl").read_bytes() != (tmp_path / "a.jsonl").read_bytes()


def test_label_pair_picks_extremes_and_skips_ties():
    assert label_pair([0.3, -1.0, 2.5, 0.0]) == (2, 1)
    assert label_pair([0.7, 0.7, 0.7]) is None


def test_one_sample_per_prompt_is_refused(model_dir, prompts, reward_model, tmp_path):
    done = runner.invoke(app, ["pairs", "--model", str(model_dir), "--prompts", str(prompts), "--reward-model",
                               str(reward_model), "--n-samples", "1", "--out", str(tmp_path / "x.jsonl")])
    assert done.exit_code != 0 and "at least 2 samples" in str(done.exception) + done.output
