"""GRPO prompts: read, tokenised once, and the order a run walks them in.

Shared by the GRPO stage and by evaluation, which must tokenise and score prompts exactly as
training does (so a reported accuracy and the training signal cannot drift apart).
"""

from __future__ import annotations

import functools
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from align.errors import AlignError


@dataclass
class PromptSet:
    """Prompts as token ids plus the raw prompt and extra columns each reward function receives."""

    ids: list[list[int]]
    prompts: list[Any]  # str or list of messages, as in the data file
    columns: dict[str, list[Any]]
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, idx: list[int]) -> "PromptSet":
        return PromptSet([self.ids[i] for i in idx], [self.prompts[i] for i in idx],
                         {k: [v[i] for i in idx] for k, v in self.columns.items()})

    @classmethod
    def concat(cls, parts: list["PromptSet"]) -> "PromptSet":
        """The parts' rows one after the other (the parts share their columns)."""
        return cls([i for p in parts for i in p.ids], [q for p in parts for q in p.prompts],
                   {k: [v for p in parts for v in p.columns[k]] for k in parts[0].columns})

    def repeat(self, g: int) -> "PromptSet":
        """Each prompt `g` times in a row: one entry per sample of its group."""
        return PromptSet([p for p in self.ids for _ in range(g)], [p for p in self.prompts for _ in range(g)],
                         {k: [v for v in vals for _ in range(g)] for k, vals in self.columns.items()})


def load_prompts(sources, tokenizer, max_prompt_len: int) -> PromptSet:
    """Read prompt files (validated, bad rows skipped and counted) and tokenise each prompt once.
    Conversational prompts go through the chat template with the generation prompt appended;
    a plain string is used as is (TRL's convention). Overlong prompts keep their last tokens."""
    from align.data.io import read_prompts

    ids, prompts, columns, cut = [], [], defaultdict(list), 0
    rows = [row for src in sources for row in read_prompts(src.path)]
    keys = sorted({k for row in rows for k in row if k != "prompt"})
    for row in rows:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            tokens = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            tokens = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"]
        if len(tokens) > max_prompt_len:
            tokens, cut = tokens[-max_prompt_len:], cut + 1
        ids.append(list(tokens))
        prompts.append(prompt)
        for k in keys:
            columns[k].append(row.get(k))
    if not ids:
        raise AlignError(f"no usable prompts in {[s.path for s in sources]}; check them with `align data "
                         "check PATH --kind prompts`")
    return PromptSet(ids, prompts, dict(columns), cut)


def completion_texts(tokenizer, samples) -> list[str]:
    return tokenizer.batch_decode([s.completion_ids for s in samples], skip_special_tokens=True)


def as_completions(prompts: list[Any], texts: list[str]) -> list[Any]:
    """TRL's convention: conversational prompts get `[{"role": "assistant", "content": text}]`."""
    return [[{"role": "assistant", "content": t}] if isinstance(p, list) else t
            for p, t in zip(prompts, texts, strict=True)]


def step_prompt_indices(seed: int, step: int, per_step: int, n: int, rank: int = 0, world: int = 1,
                        stream: int = 0) -> list[int]:
    """Rank `rank`'s prompt indices for `step`: a seeded permutation per epoch, walked in order,
    so the data position is a pure function of (seed, step) and a resume needs no iterator state.
    Each rank takes a contiguous `per_step / world` share, so whole groups stay on one rank.
    `stream` > 0 walks another seeded order (the extra rounds of dynamic sampling)."""
    local = per_step // world
    start = step * per_step + rank * local
    return [_epoch_order(seed + stream * 7_777_777, epoch, n)[offset]
            for epoch, offset in (divmod(pos, n) for pos in range(start, start + local))]


def step_seed(seed: int, step: int, round_: int = 0, first_sample: int = 0) -> int:
    """The sampling seed of a rank's generate call for `step` (and dynamic-sampling round): distinct
    per step, offset by the rank's first sample, so the seed of a sample depends on its global
    position only (with one prompt per generate call the samples are then the same whatever the
    number of ranks). Engines add the per-sample offset."""
    return (seed * 1_000_003 + step * 7919 + round_ * 104_729 + first_sample) % (2**31)


@functools.lru_cache(maxsize=4)  # the current epoch, and the next one at a boundary
def _epoch_order(seed: int, epoch: int, n: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)
