"""Batches for SFT: padding-free packing, or length-bucketed padding, in a seeded order.

Packing: conversations are binned into rows of at most `max_seq_len` tokens by TRL's best-fit
decreasing `pack_dataset` (which records each conversation's length in `seq_lengths`). A
micro-batch is a [B, T] batch of such rows with `position_ids` restarting at 0 at every conversation
and no attention mask: transformers' masking utilities detect the restarts
(`find_packed_sequence_indices`) and build a block-diagonal causal mask for sdpa/eager, and flash
attention uses the same position_ids as cu_seqlens. transformers only does this when the forward
pass has no KV cache (`use_cache=False`, as the trainer calls it). Only the tail of rows shorter than the longest is padding, and no conversation sees
another (tests/test_sft_packing.py checks logits against separate forward passes).

Without packing: a micro-batch is right-padded to its longest row with an attention mask; rows are
bucketed by length (sorted inside windows of 64 global batches) so that little is padding.

Order: `epoch_order` is a pure function of (seed, epoch), so a resumed run skips to its position
instead of replaying the data.
"""

from __future__ import annotations

import numpy as np
import torch

IGNORE = -100
BUCKET_WINDOW = 64  # global batches per length-sorting window


def pack(dataset, max_seq_len: int, batch_size: int = 20_000):
    """Bin conversations into rows of ≤ max_seq_len tokens (best-fit decreasing within blocks of
    `batch_size` conversations). Columns: input_ids, assistant_mask, seq_lengths."""
    from trl.data_utils import pack_dataset

    ds = dataset.select_columns(["input_ids", "assistant_mask"])
    return pack_dataset(ds, max_seq_len, strategy="bfd", map_kwargs={"batch_size": batch_size})


def target_counts(dataset, packed: bool, chunk: int = 50_000) -> np.ndarray:
    """Tokens each row contributes to the loss: its masked tokens except each conversation's first
    (which nothing before it predicts). Read in chunks from the Arrow table: bounded memory."""
    rows = dataset.with_format("arrow")  # respects a select()'s index mapping, unlike `.data`
    out = np.zeros(len(dataset), dtype=np.int64)
    for start in range(0, len(dataset), chunk):
        part = rows[start:start + chunk]
        mask = part.column("assistant_mask").combine_chunks()
        flat = mask.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        row_offsets = mask.offsets.to_numpy() - mask.offsets[0].as_py()
        lengths = (np.asarray(part.column("seq_lengths").to_pylist(), dtype=object) if packed
                   else [[n] for n in np.diff(row_offsets)])
        for i, seqs in enumerate(lengths):
            lo, hi = row_offsets[i], row_offsets[i + 1]
            starts = lo + np.concatenate([[0], np.cumsum(seqs)[:-1]]).astype(np.int64)
            out[start + i] = flat[lo:hi].sum() - flat[starts].sum()
    return out


def epoch_order(n_rows: int, global_batch: int, seed: int, epoch: int,
                lengths: np.ndarray | None = None) -> np.ndarray:
    """Row indices of one epoch as [n_batches, global_batch] (the incomplete last batch is dropped).

    With `lengths`, rows are length-bucketed: sorted by length inside windows of BUCKET_WINDOW
    global batches, and the batches shuffled, so every batch holds rows of similar length.
    """
    rng = np.random.default_rng([seed, epoch, 0xA11])
    order = rng.permutation(n_rows)
    n_batches = n_rows // global_batch
    if lengths is not None:
        window = global_batch * BUCKET_WINDOW
        order = np.concatenate([chunk[np.argsort(lengths[chunk], kind="stable")]
                                for chunk in np.split(order, range(window, n_rows, window))]
                               ) if n_rows else order
        batches = order[: n_batches * global_batch].reshape(n_batches, global_batch)
        return batches[rng.permutation(n_batches)]
    return order[: n_batches * global_batch].reshape(n_batches, global_batch)


def _labels(ids: list[int], mask: list[int], seq_lengths: list[int]) -> list[int]:
    labels = [t if m else IGNORE for t, m in zip(ids, mask)]
    start = 0
    for n in seq_lengths:
        labels[start] = IGNORE  # nothing in this conversation predicts its first token
        start += n
    return labels


def collate_packed(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed rows as a [B, T] batch: input_ids, labels, position_ids (no attention mask). A row
    shorter than T is filled with one more "conversation" of padding (positions from 0, labels
    -100), which the block-diagonal mask keeps apart from the real ones. Rows are not flattened
    into one [1, B·T] row: with sdpa's materialised mask that costs (B·T)² instead of B·T²."""
    width = max(len(r["input_ids"]) for r in rows)
    ids, labels, positions = [], [], []
    for row in rows:
        n = len(row["input_ids"])
        seqs = row.get("seq_lengths") or [n]
        ids.append(row["input_ids"] + [pad_id] * (width - n))
        labels.append(_labels(row["input_ids"], row["assistant_mask"], seqs) + [IGNORE] * (width - n))
        positions.append([p for k in [*seqs, width - n] for p in range(k)])
    as_tensor = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return {"input_ids": as_tensor(ids), "labels": as_tensor(labels), "position_ids": as_tensor(positions)}


def collate_padded(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row: input_ids, labels (-100 on padding), attention_mask."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(_labels(r["input_ids"], r["assistant_mask"], [n]))
        attn[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attn}
