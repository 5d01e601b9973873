"""`loss`: held-out next-token loss and perplexity on reference conversations, assistant tokens only.

Conversations are tokenised exactly as the SFT stage tokenises them (`align.data.tokenize`: chat
template, assistant mask from the template), so the number is comparable with SFT's eval loss.
`loss` = mean negative log-likelihood per assistant token over the whole set (a token-weighted mean,
not a mean of per-conversation means); `perplexity` = exp(loss). Both lower is better: a rise after
GRPO is the alignment tax on plain language modelling. Default: held-out synthetic math + chat.
"""

from __future__ import annotations

import math

from align.errors import AlignError
from align.evaluate import defaults
from align.evaluate.checkpoints import Checkpoint
from align.evaluate.context import EvalContext, EvalOptions

BATCH = 8


class LossSuite:
    name = "loss"
    lower_is_better = frozenset({"loss", "perplexity"})

    def __init__(self, options: EvalOptions):
        self.options = options
        self.source = options.prompts.get(self.name) or defaults.conversations(options.out, options.limit)

    def _rows(self, ckpt: Checkpoint, ctx: EvalContext) -> list[dict]:
        from itertools import islice

        from align.data.io import read_conversations
        from align.data.tokenize import TokenizeStats, check_tokenizer, tokenize_batch

        tokenizer = ctx.tokenizer(ckpt.path)
        check_tokenizer(tokenizer)
        conversations = [r["messages"] for r in islice(read_conversations(self.source), self.options.limit)]
        rows = tokenize_batch(tokenizer, conversations, self.options.max_prompt_len + self.options.max_new_tokens,
                              "truncate", assistant_only=True, stats=TokenizeStats())
        if not rows:
            raise AlignError(f"{self.source}: no conversation with an assistant turn to score "
                             "(check it with `align data check`)")
        return rows

    def run(self, ckpt: Checkpoint, ctx: EvalContext) -> dict[str, float]:
        import torch

        from align.data.tokenize import labels_from_mask

        model = ctx.causal_lm(ckpt.path)
        pad = ctx.tokenizer(ckpt.path).pad_token_id
        total, count = 0.0, 0
        rows = self._rows(ckpt, ctx)
        with torch.no_grad():
            for start in range(0, len(rows), BATCH):
                batch = rows[start:start + BATCH]
                width = max(r["length"] for r in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                labels = torch.full((len(batch), width), -100, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for i, r in enumerate(batch):
                    n = r["length"]
                    ids[i, :n] = torch.tensor(r["input_ids"])
                    mask[i, :n] = 1
                    labels[i, :n] = torch.tensor(labels_from_mask(r["input_ids"], r["assistant_mask"]))
                logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
                shifted = labels[:, 1:].to(model.device)
                total += float(torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), shifted.flatten(), ignore_index=-100, reduction="sum"))
                count += int((shifted != -100).sum())
        loss = total / count
        return {"loss": loss, "perplexity": math.exp(loss)}
