"""The reward-model stage: a sequence-classification head trained on preference pairs.

Bradley–Terry loss, as in InstructGPT and TRL's RewardTrainer: −log σ(r_chosen − r_rejected),
plus TRL's optional `center_rewards_coefficient`·(r_chosen + r_rejected)² that keeps scores
centred at 0 (useful for a safety gate at 0). Our own loop rather than TRL's RewardTrainer so the
stage shares align's checkpoints, exact resume, metrics and run directory with SFT and GRPO; the
maths is the same one-liner.

Each pair is rendered through the chat template as the full conversation (prompt turns + the
assistant answer). Overlong pairs lose prompt tokens from the left, since the score is read at
the last token.

For an MoE backbone (e.g. DeepseekV2ForSequenceClassification) each logged step also carries the
router metrics of its training forward passes (`align.moe.metrics`): a reward model's routing can
collapse just like a policy's.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from align.checkpoint import write_text_atomic
from align.recipe.schema import RewardModelStage
from align.data.batching import epoch_order
from align.data.mixture import held_out_split
from align.errors import AlignError
from align.sharding import is_sharded
from align.loop import StageTrainer, run_stage
from align.moe import moe_gates, router_stats
from align.stage import StageContext, StageResult
from align.train_utils import (NonFiniteGuard, backward, even_batches, maybe_no_sync, optimizer_step, prepare_training,
                               reduce_sum, step_plan)
from rewards.model import CALIBRATION_FILE


@dataclass
class Pairs:
    chosen: list[list[int]]
    rejected: list[list[int]]

    def __len__(self) -> int:
        return len(self.chosen)

    def take(self, idx) -> "Pairs":
        return Pairs([self.chosen[i] for i in idx], [self.rejected[i] for i in idx])


def _messages(prompt, answer) -> list[dict]:
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if isinstance(answer, str):
        return turns + [{"role": "assistant", "content": answer}]
    return turns + list(answer)


def encode_pair_side(tokenizer, prompt, answer, max_len: int) -> list[int]:
    ids = tokenizer.apply_chat_template(_messages(prompt, answer), tokenize=True, return_dict=True)["input_ids"]
    return list(ids[-max_len:])


def load_pairs(sources, tokenizer, max_len: int) -> Pairs:
    from align.data.io import read_preferences

    chosen, rejected = [], []
    for src in sources:
        for row in read_preferences(src.path):
            chosen.append(encode_pair_side(tokenizer, row["prompt"], row["chosen"], max_len))
            rejected.append(encode_pair_side(tokenizer, row["prompt"], row["rejected"], max_len))
    if not chosen:
        raise AlignError(f"no usable preference pairs in {[s.path for s in sources]}; check them with "
                         "`align data check PATH --kind preferences`")
    return Pairs(chosen, rejected)


def collate(pairs: Pairs, pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, right-padded: `[2B, L]`."""
    seqs = pairs.chosen + pairs.rejected
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def pair_scores(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of a `collate`d batch. Returns (r_chosen `[B]`, r_rejected `[B]`)."""
    scores = model(**batch).logits.squeeze(-1).float()  # [2B]: read at the last non-pad token
    half = scores.size(0) // 2
    return scores[:half], scores[half:]


def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, center: float | None) -> torch.Tensor:
    """Bradley–Terry: mean −log σ(r_c − r_r) (+ center·mean (r_c + r_r)²)."""
    loss = -F.logsigmoid(r_chosen - r_rejected).mean()
    if center:
        loss = loss + center * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def load_score_model(recipe, path: Path, pad_id: int):
    """A sequence-classification model with one output (the score) from a model directory; a
    causal LM's directory gets a new, seeded score head."""
    from transformers import AutoModelForSequenceClassification

    from align.models.load import load_pretrained

    model = load_pretrained(AutoModelForSequenceClassification, path, recipe.model.dtype,
                            recipe.model.trust_remote_code, recipe.model.allow_pickle_weights, num_labels=1)
    model.config.pad_token_id = pad_id  # the head reads the last token before the first pad
    return model


@torch.no_grad()
def evaluate(model, pairs: Pairs, accelerator, batch_size: int, pad_id: int) -> dict[str, float]:
    """Held-out pairwise accuracy (chosen scored above rejected) and mean margin. Each rank scores
    its share through the unwrapped model (ranks may hold different numbers of batches, and a DDP
    forward is a collective), then one reduce of (wins, Σ margin, pairs)."""
    model.eval()
    local = accelerator.unwrap_model(model)
    rank, world = accelerator.process_index, accelerator.num_processes
    totals = torch.zeros(5, dtype=torch.float64, device=accelerator.device)
    for rows in even_batches(len(pairs), batch_size, rank, world):  # FSDP2: the same forwards on every rank
        if rows is None and not is_sharded(local):
            break
        batch = {k: v.to(accelerator.device) for k, v in collate(pairs.take(list(rows or range(1))), pad_id).items()}
        rc, rr = pair_scores(local, batch)
        both = torch.cat([rc, rr]).double()
        if rows is not None:
            totals += torch.stack([(rc > rr).sum(), (rc - rr).sum(), torch.tensor(len(rc)), both.sum(),
                                   both.square().sum()]).double()
    totals = reduce_sum(accelerator, totals)
    model.train()
    n = float(totals[2]) or math.nan
    center = float(totals[3]) / (2 * n)
    spread = math.sqrt(max(float(totals[4]) / (2 * n) - center ** 2, 0.0))
    return {"eval_accuracy": float(totals[0]) / n, "eval_margin": float(totals[1]) / n,
            "score_center": center, "score_scale": spread}


def write_calibration(final: Path, metrics: dict[str, float]) -> None:
    """`reward_calibration.json` next to the weights: the held-out scores' centre (midpoint of the
    chosen and rejected responses) and spread. Bradley-Terry training fixes score differences only,
    so the raw offset is arbitrary (it moves with the score head's init); the scorer standardises
    with these numbers, so a gate of 0 means "between a typical chosen and rejected response" and
    two reward models' scores share one scale."""
    if not math.isfinite(metrics.get("score_center", math.nan)) or not metrics.get("score_scale"):
        return
    write_text_atomic(final / CALIBRATION_FILE, json.dumps(
        {"center": metrics["score_center"], "scale": metrics["score_scale"], "from": "held-out preference pairs"},
        indent=2) + "\n")


class RewardModelTrainer(StageTrainer):
    """Bradley–Terry training of a score head on preference pairs, on the shared stage loop."""

    def __init__(self, ctx: StageContext, accelerator, guard: NonFiniteGuard):
        super().__init__(ctx, accelerator, guard)
        stage: RewardModelStage = ctx.stage
        recipe = ctx.recipe
        self.pad_id = self.tokenizer.pad_token_id
        pairs = load_pairs(stage.data, self.tokenizer, stage.max_seq_len)
        eval_idx, train_idx = held_out_split(len(pairs), stage.eval_split, [ctx.seed, 0xE7A1])
        self.eval_pairs, self.train_pairs = pairs.take(eval_idx), pairs.take(train_idx)
        self.global_batch, self.steps_per_epoch, self.total_steps = step_plan(
            stage, len(self.train_pairs), accelerator.num_processes, "training pairs")
        self.model, self.optimizer, self.scheduler = prepare_training(
            accelerator, recipe, stage, ctx.init_model, ctx.resume_from, self.total_steps, task_type="SEQ_CLS",
            loader=lambda path: load_score_model(recipe, path, self.pad_id))
        self.model.train()
        self.is_moe = bool(moe_gates(accelerator.unwrap_model(self.model)))

    def train_step(self, step: int, log: bool) -> dict[str, float]:
        acc, stage = self.acc, self.stage
        epoch, pos = divmod(step, max(1, self.steps_per_epoch))
        rows = epoch_order(len(self.train_pairs), self.global_batch, self.ctx.seed, epoch)[pos]
        micro = np.array_split(rows[acc.process_index::acc.num_processes], stage.gradient_accumulation_steps)
        loss_value, correct = 0.0, 0.0
        # the logged step's routing of real tokens (pair_scores passes the attention mask)
        with router_stats(acc.unwrap_model(self.model), self.is_moe and log) as stats:
            for j, chunk in enumerate(micro):
                batch = {k: v.to(acc.device) for k, v in collate(self.train_pairs.take(chunk), self.pad_id).items()}
                with maybe_no_sync(acc, self.model, sync=j == len(micro) - 1):
                    rc, rr = pair_scores(self.model, batch)
                    loss = bt_loss(rc, rr, stage.center_rewards_coefficient) / len(micro)
                    backward(acc, loss)
                loss_value += float(loss.detach())
                correct += float((rc > rr).float().mean()) / len(micro)
        norm = optimizer_step(acc, self.model, self.optimizer, self.scheduler, stage, self.guard, step)
        if not log:
            return {"loss": loss_value}
        return {"loss": loss_value, "accuracy": correct, "grad_norm": norm, "lr": self.scheduler.get_last_lr()[0],
                "epoch": (step + 1) / max(1, self.steps_per_epoch), **stats.metrics()}

    def evaluate(self, step: int) -> dict[str, float]:
        if not len(self.eval_pairs):
            return {}
        return evaluate(self.model, self.eval_pairs, self.acc, self.stage.per_device_batch_size, self.pad_id)

    def summary(self) -> dict:
        return {"train_pairs": len(self.train_pairs), "eval_pairs": len(self.eval_pairs)}

    def finalize(self, final: Path, eval_after: dict[str, float]) -> None:
        if self.acc.is_main_process:
            write_calibration(final, eval_after)


def run(ctx: StageContext) -> StageResult:
    return run_stage(ctx, RewardModelTrainer)
