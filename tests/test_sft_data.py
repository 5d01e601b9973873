"""SFT data path: assistant-only masks, overlong policy, mixtures, the Arrow cache."""

from __future__ import annotations

import numpy as np

from align.data.cache import tokenized_source
from align.data.mixture import mixture_indices, source_counts, split_eval
from align.data.synth import generate
from align.data.tokenize import TokenizeStats, tokenize_batch
from sft_helpers import math_data, nano_model, tokenizer  # noqa: F401  (fixtures)

CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "What is 2 + 3?"},
     {"role": "assistant", "content": "2 + 3 = 5. The answer is 5."},
     {"role": "user", "content": "And times 4?"},
     {"role": "assistant", "content": "5 * 4 = 20. The answer is 20."}],
    [{"role": "system", "content": "Be kind."},
     {"role": "user", "content": "Say hello."},
     {"role": "assistant", "content": "Hello!"}],
]


def _target_text(tok, row) -> str:
    return tok.decode([t for t, m in zip(row["input_ids"], row["assistant_mask"]) if m])


def _expected(conv, tail: str) -> str:
    return "".join(m["content"] + tail for m in conv if m["role"] == "assistant")


def test_mask_decodes_to_exactly_the_assistant_turns(tokenizer):
    chats = CONVERSATIONS + [r["messages"] for r in generate("chat", 200, seed=3)]
    assert any(m["role"] == "system" for c in chats[2:] for m in c)  # synthetic data covers system prompts
    rows = tokenize_batch(tokenizer, chats, 4096, "truncate", True, TokenizeStats())
    assert len(rows) == len(chats)
    for conv, row in zip(chats, rows):
        assert _target_text(tokenizer, row) == _expected(conv, "<|im_end|>")


def test_template_without_generation_markers_uses_prefix_rendering(tokenizer):
    plain = tokenizer.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = plain
    rows = tokenize_batch(tok, CONVERSATIONS, 4096, "truncate", True, TokenizeStats())
    # The same targets as with markers: content + end-of-turn, not ChatML's newline after it.
    for conv, row in zip(CONVERSATIONS, rows):
        assert _target_text(tok, row) == _expected(conv, "<|im_end|>")


def test_overlong_rows_are_truncated_or_dropped_and_counted(tokenizer):
    chats = [r["messages"] for r in generate("math", 100, seed=1)]
    lengths = [len(r["input_ids"]) for r in tokenize_batch(tokenizer, chats, 10_000, "truncate", True,
                                                           TokenizeStats())]
    limit = int(np.median(lengths))
    n_over = sum(n > limit for n in lengths)
    drop, trunc = TokenizeStats(), TokenizeStats()
    kept = tokenize_batch(tokenizer, chats, limit, "drop", True, drop)
    cut = tokenize_batch(tokenizer, chats, limit, "truncate", True, trunc)
    assert drop.dropped["overlong"] == n_over and len(kept) == 100 - n_over
    assert trunc.truncated == n_over and all(len(r["input_ids"]) <= limit for r in cut)
    assert trunc.kept + sum(trunc.dropped.values()) == 100
    # A row cut before its answer has nothing to learn from: dropped, and counted as such.
    tiny = TokenizeStats()
    assert tokenize_batch(tokenizer, chats, 12, "truncate", True, tiny) == []
    assert tiny.dropped["no_target_tokens"] == 100


def test_mixture_counts_weights_and_determinism():
    sizes, names = [1000, 300, 50], ["help", "safety", "extra"]
    assert source_counts(sizes, [None, None, None], [1200, 100, None]) == [1200, 100, 50]
    assert source_counts(sizes, [3.0, 1.0, None], [None, None, None]) == [975, 325, 50]
    idx = mixture_indices(sizes, [None, None, None], [1200, 100, None], seed=7, names=names)
    per_source = np.bincount(np.searchsorted([1000, 1300, 1350], idx, side="right"), minlength=3)
    assert per_source.tolist() == [1200, 100, 50]
    assert np.array_equal(idx, mixture_indices(sizes, [None] * 3, [1200, 100, None], seed=7))
    assert not np.array_equal(idx, mixture_indices(sizes, [None] * 3, [1200, 100, None], seed=8))
    assert len(set(idx[(idx >= 1000) & (idx < 1300)].tolist())) == 100  # down-sampling: no repeats
    train, held = split_eval(idx, 0.1)
    assert len(held) == 135 and np.array_equal(np.concatenate([train, held]), idx)


def test_cache_is_reused_and_invalidated_by_settings(tokenizer, math_data, tmp_path):
    kw = dict(max_seq_len=256, overlong="truncate", assistant_only=True, cache_root=tmp_path)
    first, st1 = tokenized_source(math_data, tokenizer, **kw)
    again, st2 = tokenized_source(math_data, tokenizer, **kw)
    assert not st1["cached"] and st2["cached"]
    assert again["input_ids"][:50] == first["input_ids"][:50] and len(again) == len(first) == 600
    _, st3 = tokenized_source(math_data, tokenizer, **{**kw, "max_seq_len": 64})
    assert not st3["cached"] and st3["tokenize"]["truncated"] > 0
