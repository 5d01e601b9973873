"""Conversations → `input_ids` + an assistant mask (the tokens an SFT loss trains on).

How the mask is found: the chat template is rendered for a whole batch at once and the character
spans of the assistant turns come back from the template itself, then the texts go through the
fast tokenizer's batch path with `return_offsets_mapping`, and a token is an assistant token when
its character span overlaps an assistant span. This is what `apply_chat_template(...,
return_assistant_tokens_mask=True)` computes, minus its per-token Python loop.

Where the spans come from:
- templates with `{% generation %}` markers (TRL's assistant-only-loss convention): the marked
  text, i.e. the assistant content plus the end-of-turn token for ChatML;
- templates without markers: by rendering prefixes. For the k-th assistant turn, render
  messages[:k] with `add_generation_prompt=True` and messages[:k+1]; the turn is the text between
  the two. A template whose render of a longer conversation does not start with the render of its
  prefix (e.g. one that rewrites earlier turns) cannot be masked this way, and raises AlignError.
  With ChatML the span then also holds the newline after the end-of-turn token.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from align.errors import AlignError

_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")
Spans = list[tuple[int, int]]


def has_generation_markers(template: str) -> bool:
    return bool(_GENERATION.search(template or ""))


@dataclass
class TokenizeStats:
    """Rows seen, kept, truncated and dropped (by reason) while tokenising."""

    seen: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    tokens: int = 0
    target_tokens: int = 0

    def merge(self, other: "TokenizeStats") -> None:
        self.seen += other.seen
        self.kept += other.kept
        self.truncated += other.truncated
        self.dropped.update(other.dropped)
        self.tokens += other.tokens
        self.target_tokens += other.target_tokens

    def as_dict(self) -> dict:
        return {"seen": self.seen, "kept": self.kept, "truncated": self.truncated,
                "dropped": dict(self.dropped), "tokens": self.tokens, "target_tokens": self.target_tokens}


def check_tokenizer(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise AlignError("SFT tokenisation needs a fast (Rust) tokenizer for character offsets; "
                         "the model directory has only a slow one (add tokenizer.json)")
    if not tokenizer.chat_template:
        raise AlignError("the tokenizer has no chat template; set `chat_template` in tokenizer_config.json")


def render_with_spans(tokenizer, conversations: list[list[dict]]) -> tuple[list[str], list[Spans]]:
    """Rendered texts and, per text, the character spans of its assistant turns."""
    from transformers.utils.chat_template_utils import render_jinja_template

    template = tokenizer.chat_template
    kwargs = dict(tokenizer.special_tokens_map)
    if has_generation_markers(template):
        texts, spans = render_jinja_template(conversations, chat_template=template,
                                             return_assistant_tokens_mask=True, **kwargs)
        return texts, [list(s) for s in spans]
    return _render_by_prefix(conversations, template, kwargs)


def _render_by_prefix(conversations, template: str, kwargs: dict) -> tuple[list[str], list[Spans]]:
    from transformers.utils.chat_template_utils import render_jinja_template

    def render(msgs, gen):
        return render_jinja_template([msgs], chat_template=template, add_generation_prompt=gen, **kwargs)[0][0]

    texts, all_spans = [], []
    for messages in conversations:
        spans: Spans = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix, upto = render(messages[:k], True), render(messages[: k + 1], False)
            if not upto.startswith(prefix):
                raise AlignError("the chat template has no {% generation %} markers and rewrites earlier "
                                 "turns, so assistant tokens cannot be located; add {% generation %} ... "
                                 "{% endgeneration %} around the assistant content in the template, or set "
                                 "assistant_only_loss: false")
            spans.append((len(prefix), len(upto)))
        full = render(messages, False)
        texts.append(full)
        all_spans.append(spans)
    return texts, all_spans


def assistant_mask(offsets: np.ndarray, spans: Spans) -> np.ndarray:
    """1 for tokens whose character span [start, end) overlaps an assistant span. offsets: [T, 2]."""
    mask = np.zeros(len(offsets), dtype=np.int8)
    for start, end in spans:
        mask |= ((offsets[:, 1] > start) & (offsets[:, 0] < end)).astype(np.int8)
    return mask


def tokenize_batch(tokenizer, conversations: list[list[dict]], max_seq_len: int, overlong: str,
                   assistant_only: bool, stats: TokenizeStats) -> list[dict]:
    """Tokenise a batch; returns the kept rows as {input_ids, assistant_mask, length}.

    `overlong` is "truncate" (keep the first max_seq_len tokens) or "drop". A row left with no
    target token (nothing of an assistant turn fits) is dropped and counted either way.
    """
    texts, spans = render_with_spans(tokenizer, conversations)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False)
    rows = []
    for ids, offsets, sp in zip(enc["input_ids"], enc["offset_mapping"], spans):
        stats.seen += 1
        if assistant_only:
            mask = assistant_mask(np.asarray(offsets, dtype=np.int64).reshape(-1, 2), sp)
        else:
            mask = np.ones(len(ids), dtype=np.int8)
        if len(ids) > max_seq_len:
            if overlong == "drop":
                stats.dropped["overlong"] += 1
                continue
            ids, mask = ids[:max_seq_len], mask[:max_seq_len]
            stats.truncated += 1
        n_target = int(mask.sum())
        if n_target == 0:
            stats.dropped["no_target_tokens"] += 1
            continue
        stats.kept += 1
        stats.tokens += len(ids)
        stats.target_tokens += n_target
        rows.append({"input_ids": ids, "assistant_mask": mask.tolist(), "length": len(ids)})
    return rows


def labels_from_mask(input_ids: list[int], mask: list[int]) -> list[int]:
    """Labels for causal-LM loss: the token where the mask is 1, -100 (ignored) elsewhere."""
    return [t if m else -100 for t, m in zip(input_ids, mask)]
