"""The SFT stage: conversations → assistant-only next-token loss → `final/`.

One optimizer step, in order:
  1. take global batch `step` of the epoch order, a pure function of (seed, epoch)
     (`align.data.batching.epoch_order`), so a resumed run skips straight to its position;
  2. count the target tokens N of the whole global batch (all micro-batches, all ranks; every rank
     knows them from the cached dataset, so this needs no collective);
  3. per micro-batch: loss = Σ token cross-entropy × world_size / N, backward (DDP averages over
     ranks, hence × world_size; no all-reduce until the last micro-batch). The step's gradient is
     thus the gradient of the mean loss over the global batch's target tokens, whatever the split:
     per-device batch 1 × accumulation 8 equals 8 × 1 and 2 ranks × 4 equal 1 × 8;
  4. clip to `max_grad_norm`, skip the update if the norm is non-finite, step optimizer + schedule;
  5. on a logged step: the mean loss since the last logged step, lr, grad_norm, tokens/s, epoch
     (for an MoE model also the router metrics of the step's forward passes, `align.moe.metrics`).
Checkpoints, evaluation, stop and resume are the shared stage loop's (`align.loop`).

Recipe keys (SFTStage): data/eval_data/eval_split (sources and mixture: `align.data.mixture`),
max_seq_len + overlong (truncate | drop, counted), packing (padding-free, `align.data.batching`),
assistant_only_loss (`align.data.tokenize`), lr/warmup_ratio/scheduler/weight_decay, max_grad_norm,
epochs/max_steps, per_device_batch_size × gradient_accumulation_steps, bf16 (auto: GPU only),
gradient_checkpointing, lora (merged into final/ when merge_on_save), save_steps/keep_last,
logging_steps, moe_aux_loss_coef (adds the model's router balance loss).

Departures from TRL's SFTTrainer, which this replaces because it is measured faster here
(docs/benchmarks.md) and resumes exactly: the data order is not a sampler state but a function of
the step, and the loss is normalised over the global batch rather than per micro-batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from align.data import batching
from align.data.cache import tokenized_source
from align.data.mixture import mixture_indices, split_eval
from align.errors import AlignError
from align.sharding import is_sharded
from align.loop import StageTrainer, run_stage
from align.moe import RouterStats, moe_gates, router_stats
from align.stage import StageContext, StageResult
from align.train_utils import (NonFiniteGuard, backward, maybe_no_sync, model_summary, optimizer_step,
                               even_batches, prepare_training, reduce_sum, step_plan)


# ------------------------------------------------------------------------------------ data


@dataclass
class SFTData:
    train: object  # datasets.Dataset: input_ids, assistant_mask (+ seq_lengths when packed)
    eval: object | None
    train_targets: np.ndarray  # [rows] loss tokens per row
    eval_targets: np.ndarray | None
    lengths: np.ndarray | None  # [rows] tokens per row, for length bucketing (unpacked only)
    stats: dict = field(default_factory=dict)


def load_sources(sources, tokenizer, stage, cache_root: Path):
    """Tokenised (cached) conversations of every source, concatenated; `stage` gives max_seq_len,
    overlong and assistant_only_loss (an SFT stage or a GRPO stage's `ptx`)."""
    from datasets import concatenate_datasets

    parts, stats = [], {}
    for i, src in enumerate(sources):
        ds, st = tokenized_source(src.path, tokenizer, fmt=src.conversation_format(), max_seq_len=stage.max_seq_len,
                                  overlong=stage.overlong, assistant_only=stage.assistant_only_loss,
                                  cache_root=cache_root)
        parts.append(ds)
        stats[src.name or src.path] = st
    return concatenate_datasets(parts), [len(p) for p in parts], stats


def prepare_data(ctx: StageContext, tokenizer, accelerator) -> SFTData:
    """Tokenise (or load from cache), mix, split, pack. The main process builds caches first."""
    stage = ctx.stage
    cache_root = Path(ctx.recipe.output_dir) / "cache" / "sft"
    with accelerator.main_process_first():
        full, sizes, stats = load_sources(stage.data, tokenizer, stage, cache_root)
        idx = mixture_indices(sizes, [s.weight for s in stage.data], [s.count for s in stage.data], ctx.seed,
                              names=[s.name or s.path for s in stage.data])
        train_idx, eval_idx = split_eval(idx, 0.0 if stage.eval_data else stage.eval_split)
        train = full.select(train_idx)
        if stage.eval_data:
            eval_ds, _, eval_stats = load_sources(stage.eval_data, tokenizer, stage, cache_root)
            stats.update({f"eval:{k}": v for k, v in eval_stats.items()})
        else:
            eval_ds = full.select(eval_idx) if len(eval_idx) else None
        if stage.packing:
            train = batching.pack(train, stage.max_seq_len)
            eval_ds = batching.pack(eval_ds, stage.max_seq_len) if eval_ds is not None else None
    lengths = None if stage.packing else np.asarray(train["length"])
    return SFTData(train=train, eval=eval_ds, train_targets=batching.target_counts(train, stage.packing),
                   eval_targets=batching.target_counts(eval_ds, stage.packing) if eval_ds is not None else None,
                   lengths=lengths, stats=stats)


def _collate(rows: dict, packed: bool, pad_id: int) -> dict[str, torch.Tensor]:
    as_list = [dict(zip(rows, vals)) for vals in zip(*rows.values())]
    return batching.collate_packed(as_list, pad_id) if packed else batching.collate_padded(as_list, pad_id)


def _real_mask(batch: dict[str, torch.Tensor], lengths: list[int]) -> torch.Tensor:
    """[B, T] True on each row's real tokens. Both collates right-fill a row past its length;
    packed batches carry no attention mask, so the lengths are the only record of that fill."""
    width = batch["input_ids"].shape[1]
    return torch.arange(width) < torch.tensor(lengths).unsqueeze(1)


# ------------------------------------------------------------------------------------ loss


def token_loss_sum(model, batch: dict[str, torch.Tensor], aux_coef: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(Σ cross-entropy over target tokens, router balance loss or None). labels are per input
    token; position t's logits predict labels[t + 1]."""
    labels = batch.pop("labels")
    extra = {"output_router_logits": True} if aux_coef > 0 else {}
    out = model(**batch, use_cache=False, **extra)
    logits = out.logits[:, :-1].flatten(0, 1).float()
    ce = torch.nn.functional.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=batching.IGNORE,
                                           reduction="sum")
    return ce, (router_balance_loss(model, out) if aux_coef > 0 else None)


def router_balance_loss(model, out) -> torch.Tensor:
    """The model's own MoE aux loss, or, for models that only return router logits (transformers'
    DeepseekV2), the Switch/Mixtral balance loss E·Σ_i f_i·P_i over all layers, which is
    DeepSeek-V2's expert-level balance loss up to a constant factor."""
    if getattr(out, "aux_loss", None) is not None:
        return out.aux_loss
    config = getattr(model, "module", model).config
    experts = next((getattr(config, k) for k in ("n_routed_experts", "num_local_experts", "num_experts")
                    if getattr(config, k, None)), None)
    if getattr(out, "router_logits", None) is None or experts is None:
        raise AlignError("moe_aux_loss_coef > 0 but the model returns no router logits (not a MoE model); "
                         "set moe_aux_loss_coef: 0")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return load_balancing_loss_func(out.router_logits, experts, config.num_experts_per_tok)


@torch.no_grad()
def evaluate(model, data: SFTData, stage, accelerator, pad_id: int) -> float | None:
    """Mean held-out loss per target token over the eval rows (split across ranks). Forward passes
    go through the unwrapped model: ranks may hold different numbers of eval batches, and a DDP
    forward is a collective (buffer broadcast), so it would deadlock. Under FSDP2 every forward
    is a collective whatever the wrapper, so each rank runs the same number (`even_batches`)."""
    if data.eval is None or len(data.eval) == 0:
        return None
    model.eval()
    local = accelerator.unwrap_model(model)
    rank, world, bs = accelerator.process_index, accelerator.num_processes, stage.per_device_batch_size
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for rows in even_batches(len(data.eval), bs, rank, world):
        if rows is None and not is_sharded(local):
            break
        batch = _collate(data.eval[(rows or range(1)).start:(rows or range(1)).stop], stage.packing, pad_id)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            ce, _ = token_loss_sum(local, batch, 0.0)
        total[0] += ce.double() if rows is not None else 0.0
    total[1] = float(data.eval_targets.sum()) if rank == 0 else 0.0
    total = reduce_sum(accelerator, total)
    model.train()
    return float(total[0] / total[1])


# ------------------------------------------------------------------------------------ loop


def forward_backward(model, data: SFTData, rows: np.ndarray, stage, accelerator, pad_id: int,
                     stats: RouterStats | None = None, scale: float = 1.0) -> tuple[float, int, int]:
    """Gradients of one optimizer step over global batch `rows` ([global_batch], laid out as
    [accumulation, rank, per_device]). Returns (Σ token loss over the global batch, its target
    token count N, this rank's non-padding tokens). Each micro-batch's loss is scaled by
    world_size / N: DDP averages over ranks, so the gradient is that of the global mean (times
    `scale`: GRPO's ptx term adds γ × this gradient to the RL one, align/grpo/ptx.py). `stage`
    gives per_device_batch_size, gradient_accumulation_steps, packing and moe_aux_loss_coef.
    `stats` (entered by the caller) records this rank's routing of the real tokens."""
    world, rank, bs = accelerator.num_processes, accelerator.process_index, stage.per_device_batch_size
    accum, coef = stage.gradient_accumulation_steps, stage.moe_aux_loss_coef
    n_targets = int(data.train_targets[rows].sum())  # known on every rank: no collective needed
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    tokens = 0
    for a in range(accum):
        mine = rows[(a * world + rank) * bs:(a * world + rank + 1) * bs]
        chunk = data.train[np.sort(mine).tolist()]
        batch = _collate(chunk, stage.packing, pad_id)
        real = _real_mask(batch, [len(ids) for ids in chunk["input_ids"]])
        tokens += int(real.sum())
        if stats is not None:
            stats.token_mask = real
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with maybe_no_sync(accelerator, model, sync=a == accum - 1), accelerator.autocast():
            ce, aux = token_loss_sum(model, batch, coef)
            loss = ce * world / max(n_targets, 1) * scale
            if aux is not None:
                loss = loss + coef * aux / accum
            backward(accelerator, loss)
        loss_sum += ce.detach().double()
    return float(reduce_sum(accelerator, loss_sum)), n_targets, tokens


class SFTTrainer(StageTrainer):
    """Conversations → assistant-only next-token loss, on the shared stage loop."""

    def __init__(self, ctx: StageContext, accelerator, guard: NonFiniteGuard):
        stage, recipe = ctx.stage, ctx.recipe
        if stage.lora is not None and stage.lora.target_modules == []:
            raise AlignError(f"stage {stage.name!r}: lora.target_modules is empty; list module names or use all-linear")
        super().__init__(ctx, accelerator, guard)
        self.data = prepare_data(ctx, self.tokenizer, accelerator)
        self.global_batch, self.steps_per_epoch, self.total_steps = step_plan(
            stage, len(self.data.train), accelerator.num_processes,
            "training rows after packing" if stage.packing else "training rows")
        self.model, self.optimizer, self.scheduler = prepare_training(accelerator, recipe, stage, ctx.init_model,
                                                                      ctx.resume_from, self.total_steps)
        self.model.train()
        self.pad_id = self.tokenizer.pad_token_id
        self.is_moe = bool(moe_gates(accelerator.unwrap_model(self.model)))
        self.params = model_summary(accelerator.unwrap_model(self.model))  # before a LoRA merge zeroes "trainable"
        self.tokens = 0  # trained non-padding tokens, over every resumed run
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its batch order)
        self._window = (0.0, 0, time.perf_counter())  # loss sum, tokens, start of the logging window

    def train_step(self, step: int, log: bool) -> dict[str, float]:
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = epoch, batching.epoch_order(len(self.data.train), self.global_batch, self.ctx.seed,
                                                     epoch, self.data.lengths)
        with router_stats(self.acc.unwrap_model(self.model), self.is_moe and log) as stats:
            loss_sum, n_targets, tokens = forward_backward(self.model, self.data, self._order[1][position],
                                                           self.stage, self.acc, self.pad_id, stats)
        grad_norm = optimizer_step(self.acc, self.model, self.optimizer, self.scheduler, self.stage, self.guard, step)
        loss = loss_sum / max(n_targets, 1)
        window_loss, window_tokens, t_window = self._window
        window_loss, window_tokens = window_loss + loss, window_tokens + tokens * self.acc.num_processes
        if not log:
            self._window = window_loss, window_tokens, t_window
            return {"loss": loss}
        now = time.perf_counter()
        self.tokens += window_tokens
        self._window = 0.0, 0, now
        return {"loss": window_loss / (step % self.stage.logging_steps + 1), "lr": self.scheduler.get_last_lr()[0],
                "grad_norm": grad_norm, "tokens_per_s": window_tokens / max(now - t_window, 1e-9),
                "epoch": (step + 1) / self.steps_per_epoch, "skipped_steps": self.guard.skipped,
                **stats.metrics()}

    def evaluate(self, step: int) -> dict[str, float]:
        loss = evaluate(self.model, self.data, self.stage, self.acc, self.pad_id)
        return {} if loss is None else {"eval_loss": loss}

    def state_dict(self) -> dict:
        return {"tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        self.tokens = state["tokens"]

    def summary(self) -> dict:
        data = self.data
        return {"epochs": self.total_steps / self.steps_per_epoch, "tokens": self.tokens,
                "train_rows": len(data.train), "eval_rows": len(data.eval) if data.eval is not None else 0,
                "data": {k: {**v["tokenize"], "invalid_rows": v["read"]["bad"], "cached": v["cached"]}
                         for k, v in data.stats.items()},
                **self.params}


def run(ctx: StageContext) -> StageResult:
    """Train the SFT stage of `ctx.recipe`; resumable from `ctx.resume_from`."""
    return run_stage(ctx, SFTTrainer)
