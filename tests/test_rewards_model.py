"""Reward-model scorer on a real (tiny, random) Qwen2 sequence-classification model."""

import pytest
import torch

from align.errors import AlignError
from rewards.config import RewardSpec
from rewards.model import RewardModelScorer
from rewards.reward_set import RewardSet

TEXTS = ["What is 2 + 2? The answer is 4.", "Tell me a joke about cats.", "Paris is the capital of France."] * 20


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from align.models.tiny import train_tokenizer

    out = tmp_path_factory.mktemp("rm")
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    Qwen2ForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_batched_scores_equal_one_by_one(rm_dir):
    scorer = RewardModelScorer(rm_dir, batch_size=2)
    prompts = [[{"role": "user", "content": "What is 2 + 2?"}]] * 3
    completions = [[{"role": "assistant", "content": c}] for c in ("4", "The answer is 4.", "five")]
    batched = scorer(prompts, completions)
    single = [RewardModelScorer(rm_dir, batch_size=1)(prompts[:1], [c])[0] for c in completions]
    assert batched == pytest.approx(single, abs=1e-5)
    assert len(set(round(s, 6) for s in batched)) == 3  # different texts, different scores
    assert scorer.texts(prompts[:1], completions[:1])[0].startswith("<|im_start|>user\nWhat is 2 + 2?")


def test_plain_prompts_and_suite_gate(rm_dir):
    suite = RewardSet([RewardSpec(model=str(rm_dir), alias="rm", gate=1e9, gate_penalty=-5.0),
                         RewardSpec(name="format", weight=0.0)])
    scored = suite(prompts=["Q: 2+2? ", "Q: 3+3? "], completions=["The answer is 4.", "6"])
    assert scored.total == [-5.0, -5.0]  # every raw RM score is below the 1e9 gate
    assert scored.metrics["rewards/rm/failures"] == 0.0


def test_missing_or_unsafe_model(tmp_path, rm_dir):
    with pytest.raises(AlignError, match="config.json"):
        RewardModelScorer(tmp_path)
    (tmp_path / "config.json").write_text((rm_dir / "config.json").read_text())
    with pytest.raises(AlignError, match="safetensors"):
        RewardModelScorer(tmp_path)(["a"], ["b"])


def test_calibration_standardises_scores(tmp_path, rm_dir):
    import json
    import shutil

    calibrated = shutil.copytree(rm_dir, tmp_path / "rm")
    (calibrated / "reward_calibration.json").write_text(json.dumps({"center": 0.25, "scale": 2.0}))
    prompts, completions = ["Q: 2+2? "] * 2, ["The answer is 4.", "five"]
    raw = RewardModelScorer(rm_dir)(prompts, completions)
    assert RewardModelScorer(calibrated)(prompts, completions) == pytest.approx([(r - 0.25) / 2.0 for r in raw])
    assert RewardModelScorer(calibrated, calibrate=False)(prompts, completions) == pytest.approx(raw)
    (calibrated / "reward_calibration.json").write_text(json.dumps({"center": 0.0, "scale": 0.0}))
    with pytest.raises(AlignError, match="reward_calibration.json: scale must be > 0"):
        RewardModelScorer(calibrated)
