"""Preference pairs from the policy itself: sample completions from a checkpoint, let a reward model
pick chosen (higher score) and rejected (lower score).

This is how offline DPO and online GRPO get the same judge: the reward model GRPO is trained
against labels the pairs DPO learns from, and the answers come from the SFT policy both start
from (on-policy data for DPO, as in RLHF-style "self-rewarding" or iterative DPO). The output is
an ordinary preference file (`align data check --kind preferences` validates it); prompt columns
such as `category` are kept, and each row also records the two scores.

Sampling is seeded (the engine derives one seed per sample from the call's seed), so the same
command writes the same file. Prompts whose samples cannot make a pair are skipped and counted:
all samples scored alike (`ties`), or the two picked answers identical or empty after decoding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.errors import AlignError


@dataclass
class PairStats:
    prompts: int = 0
    pairs: int = 0
    samples_generated: int = 0
    ties: int = 0
    unusable: int = 0  # identical or empty answers


def label_pair(scores: list[float]) -> tuple[int, int] | None:
    """(index of chosen, index of rejected): the highest- and lowest-scored of one prompt's samples;
    None when every score is equal (no preference to learn)."""
    best = max(range(len(scores)), key=lambda i: scores[i])
    worst = min(range(len(scores)), key=lambda i: scores[i])
    if scores[best] == scores[worst]:
        return None
    return best, worst


def sample_pairs(model: str | Path, prompts: str | Path, reward_model: str | Path, *, n_samples: int = 2,
                 seed: int = 0, temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 128,
                 max_prompt_len: int = 512, batch_size: int = 16,
                 stats: PairStats | None = None, progress: bool = False) -> Iterator[dict[str, Any]]:
    """Preference rows for every prompt of `prompts` with a usable pair; `stats` counts them.
    `progress`: a bar over the prompts on the console (generation is the long part)."""
    from rich.progress import track

    from align.data.prompts import as_completions, completion_texts, load_prompts
    from align.models.load import load_tokenizer
    from align.recipe.schema import DataSource
    from rewards.model import RewardModelScorer
    from rollout.base import SamplingParams
    from rollout.config import RolloutConfig
    from rollout.factory import build_engine

    if n_samples < 2:
        raise AlignError(f"--n-samples {n_samples}: a pair needs at least 2 samples per prompt")
    stats = stats if stats is not None else PairStats()
    tokenizer = load_tokenizer(model)
    prompt_set = load_prompts([DataSource(path=str(prompts))], tokenizer, max_prompt_len)
    engine = build_engine(RolloutConfig(engine="hf", dtype="float32"), model, seed=seed)
    scorer = RewardModelScorer(reward_model, batch_size=batch_size)
    starts = range(0, len(prompt_set), batch_size)
    for start in track(starts, description=f"sampling {n_samples} per prompt", disable=not progress):
        batch = prompt_set.take(list(range(start, min(start + batch_size, len(prompt_set)))))
        sampling = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                  seed=seed * 1_000_003 + start * n_samples, logprobs=False)
        groups = engine.generate(batch.ids, n_samples, sampling)
        for i, group in enumerate(groups):
            stats.prompts += 1
            stats.samples_generated += len(group)
            prompt = batch.prompts[i]
            texts = completion_texts(tokenizer, group)
            completions = as_completions([prompt] * len(texts), texts)
            scores = [float(s) for s in scorer([prompt] * len(texts), completions)]
            picked = label_pair(scores)
            if picked is None:
                stats.ties += 1
                continue
            c, r = picked
            if texts[c] == texts[r] or not texts[c].strip() or not texts[r].strip():
                stats.unusable += 1
                continue
            stats.pairs += 1
            yield {"prompt": prompt, "chosen": completions[c], "rejected": completions[r],
                   "chosen_score": scores[c], "rejected_score": scores[r],
                   **{k: v[i] for k, v in batch.columns.items() if k not in ("chosen", "rejected")}}
