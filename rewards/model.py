"""Score completions with a sequence-classification reward model (the output of a reward_model stage).

The text scored is what the RM was trained on: for chat prompts the chat template applied to
prompt + completion messages, for plain prompts the concatenated strings (as TRL's GRPOTrainer does
with model rewards). Loading is lazy (first call), safetensors only, no remote code.

Scores are standardised when the model directory has `reward_calibration.json` (written by the
reward_model stage: centre and spread of its held-out chosen/rejected scores): (logit − centre) /
spread. A Bradley-Terry model's raw offset is arbitrary, so without this a gate threshold or the
balance between two reward models would depend on the score head's random init. `calibrate: false`
in the reward's kwargs reads raw logits.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from align.errors import AlignError
from rewards.contract import Completion, Reward, is_conversational, text_of

CALIBRATION_FILE = "reward_calibration.json"


class RewardModelScorer:
    """Scalar score (logit 0) of a sequence-classification reward model for each prompt + completion."""

    __name__ = "reward_model"

    def __init__(self, path: str | Path, device: str = "cpu", batch_size: int = 16, max_length: int = 2048,
                 calibrate: bool = True):
        self.path, self.device, self.batch_size, self.max_length = Path(path), device, batch_size, max_length
        if not (self.path / "config.json").is_file():
            raise AlignError(f"reward model {self.path}: no config.json there; point `model:` at a reward-model "
                             "directory (the output of a `kind: reward_model` stage)")
        self.center, self.scale = read_calibration(self.path) if calibrate else (0.0, 1.0)
        self._model = self._tokenizer = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the path and settings only; a worker loads its own copy."""
        return {**self.__dict__, "_model": None, "_tokenizer": None}

    def _load(self) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from align.models.load import load_pretrained

        if not any(self.path.glob("*.safetensors")):
            raise AlignError(f"reward model {self.path}: no *.safetensors weights (only safetensors are loaded)")
        tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=False)
        model = load_pretrained(AutoModelForSequenceClassification, self.path)
        if model.config.num_labels != 1:
            raise AlignError(f"reward model {self.path}: num_labels is {model.config.num_labels}; a reward model has 1")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:  # the model finds each row's last token through the pad id
            model.config.pad_token_id = tokenizer.pad_token_id
        self._model, self._tokenizer = model.to(self.device).eval(), tokenizer

    def texts(self, prompts: Sequence[Any], completions: Sequence[Completion]) -> list[str]:
        """What the model reads for each sample."""
        if not is_conversational(prompts[0]):
            return [text_of(p) + text_of(c) for p, c in zip(prompts, completions, strict=True)]
        return [self._tokenizer.apply_chat_template(list(p) + _messages(c), tokenize=False)
                for p, c in zip(prompts, completions, strict=True)]

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Completion], **kwargs: Any) -> list[Reward]:
        import torch

        if self._model is None:
            self._load()
        texts = self.texts(prompts, completions)
        scores: list[Reward] = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = self._tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                        truncation=True, max_length=self.max_length, add_special_tokens=False)
                logits = self._model(**batch.to(self.device)).logits[:, 0]
                scores += ((logits.float() - self.center) / self.scale).cpu().tolist()
        return scores


def read_calibration(path: Path) -> tuple[float, float]:
    """(centre, spread) from the model directory's calibration file; (0, 1) when it has none."""
    file = path / CALIBRATION_FILE
    if not file.is_file():
        return 0.0, 1.0
    try:
        data = json.loads(file.read_text())
        center, scale = float(data["center"]), float(data["scale"])
    except (ValueError, KeyError, TypeError) as exc:
        raise AlignError(f"{file}: unreadable calibration ({exc}); delete it to score raw logits") from None
    if not scale > 0:
        raise AlignError(f"{file}: scale must be > 0, got {scale}; delete the file to score raw logits")
    return center, scale


def _messages(completion: Completion) -> list[dict[str, Any]]:
    return [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion)
