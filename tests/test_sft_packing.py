"""Padding-free packing: a packed forward pass equals the conversations run one by one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from align.data import batching
from align.data.synth import generate
from align.data.tokenize import TokenizeStats, tokenize_batch
from sft_helpers import nano_model, tokenizer  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def rows(tokenizer):
    chats = [r["messages"] for r in generate("chat", 24, seed=5)]
    return tokenize_batch(tokenizer, chats, 512, "truncate", True, TokenizeStats())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_separate_forward_passes(nano_model, rows, attn):
    from datasets import Dataset

    from align.models.load import load_causal_lm

    model = load_causal_lm(nano_model, attn_implementation=attn).eval()
    packed = batching.pack(Dataset.from_list(rows), max_seq_len=256)
    assert len(packed) < len(rows)  # conversations really share rows
    chosen = packed.to_list()[-3:]  # the last rows are the shortest: the batch has a padded tail
    batch = batching.collate_packed(chosen, pad_id=0)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 3
    assert len({len(r["input_ids"]) for r in chosen}) > 1
    with torch.no_grad():
        # use_cache=False as in training: with a KV cache transformers does not look for packing.
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for b, row in enumerate(chosen):
            start = 0
            for n in row["seq_lengths"]:
                alone = model(input_ids=batch["input_ids"][b:b + 1, start:start + n]).logits[0]
                torch.testing.assert_close(logits[b, start:start + n], alone, atol=1e-5, rtol=0)
                start += n


def test_packed_labels_and_target_counts(rows):
    from datasets import Dataset

    packed = batching.pack(Dataset.from_list(rows), max_seq_len=256)
    batch = batching.collate_packed(packed.to_list(), pad_id=0)
    n_loss = int((batch["labels"][:, 1:] != batching.IGNORE).sum())  # labels[:, 0] are never predicted
    assert n_loss == batching.target_counts(packed, packed=True).sum()
    assert n_loss == sum(sum(r["assistant_mask"]) for r in rows)  # assistant-only: no first token masked
    assert (batch["labels"][batch["position_ids"] == 0] == batching.IGNORE).all()


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    a = batching.epoch_order(103, 8, seed=1, epoch=0)
    assert a.shape == (12, 8) and len(set(a.flatten().tolist())) == 96
    assert np.array_equal(a, batching.epoch_order(103, 8, seed=1, epoch=0))
    assert not np.array_equal(a, batching.epoch_order(103, 8, seed=1, epoch=1))
    lengths = np.random.default_rng(0).integers(1, 500, 103)
    b = batching.epoch_order(103, 8, seed=1, epoch=0, lengths=lengths)
    spread = np.ptp(lengths[b], axis=1).mean()
    assert spread < np.ptp(lengths[a], axis=1).mean() / 2  # bucketing groups similar lengths
