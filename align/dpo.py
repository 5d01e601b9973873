"""The DPO stage: offline preference optimisation of the policy on (prompt, chosen, rejected) pairs.

Direct Preference Optimization (Rafailov et al. 2023) and IPO (Azar et al. 2023), as TRL 1.16's
DPOTrainer computes them (tests/test_dpo_vs_trl.py holds the two equal, loss and gradients):
  - each side's sequence log-prob log π(y | x) is the sum of the token log-probs of the assistant
    answer only, the sequence being rendered through the chat template: the prompt with the
    generation prompt, then prompt + answer; the answer starts where the two token lists diverge
    (TRL's `common_prefix_length`). Overlong sequences keep their start (TRL's `keep_start`),
    and a pair whose prompt alone fills `max_seq_len` is dropped (counted in the summary);
  - with Δ = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r)):
    sigmoid: −log σ(β·Δ);  ipo: (Δ' − 1/(2β))², Δ' the same difference with each log-ratio divided
    by its answer's token count (TRL's length normalisation, confirmed by the IPO authors);
  - the implicit rewards β·(log π − log π_ref) give TRL's metrics rewards/chosen, rewards/rejected,
    rewards/margins and rewards/accuracies (chosen reward above rejected), logged per step and on
    the held-out pairs (`eval_` prefix).

The reference is the stage's starting model, in one of three ways (`reference`):
  - precomputed: its log-probs of every pair, computed once before the first step with the policy
    itself (nothing extra in memory during training) and stored in the stage directory
    (`reference_logps.safetensors`), so a resumed run reads the very same numbers;
  - frozen_copy: a second, frozen copy of the model scores each batch;
  - lora_disabled: the LoRA policy with its adapter switched off scores each batch.

The loss of an optimizer step is the mean over its global batch of pairs, whatever the split into
ranks × accumulation × per-device batch (each micro-batch's sum × world / global batch; DDP
averages over ranks). Checkpoints, evaluation, stop and exact resume are the shared stage loop's
(`align.loop`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from align.data.batching import epoch_order
from align.data.mixture import held_out_split
from align.errors import AlignError
from align.sharding import is_sharded, reference_for_stage
from align.grpo.logprobs import token_logprobs
from align.loop import StageTrainer, run_stage
from align.recipe.schema import DPOStage
from align.reward_model import _messages
from align.stage import StageContext, StageResult
from align.train_utils import (NonFiniteGuard, backward, even_batches, global_counts, maybe_no_sync,
                               optimizer_step, prepare_training, reduce_sum, step_plan)

REFERENCE_FILE = "reference_logps.safetensors"
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected")


# ------------------------------------------------------------------------------------ data


@dataclass
class Pairs:
    """Tokenised pairs: the shared prompt and each side's answer (TRL's prompt_ids, chosen_ids,
    rejected_ids)."""

    prompt: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompt)

    def take(self, idx) -> "Pairs":
        return Pairs(*([side[i] for i in idx] for side in (self.prompt, self.chosen, self.rejected)))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_pair(tokenizer, prompt, chosen, rejected) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen answer ids, rejected answer ids) through the chat template, split where
    the rendered prompt and prompt + answer diverge (as TRL's DPOTrainer tokenises)."""
    def render(answer, **kw) -> list[int]:
        return list(tokenizer.apply_chat_template(_messages(prompt, answer), tokenize=True, return_dict=True,
                                                  **kw)["input_ids"])

    p, pc, pr = render([], add_generation_prompt=True), render(chosen), render(rejected)
    n = min(_common_prefix(p, pc), _common_prefix(p, pr))
    return p[:n], pc[n:], pr[n:]


def load_pairs(sources, tokenizer, max_len: int) -> tuple[Pairs, int]:
    """Every valid preference row of `sources` (`align.data.io.read_preferences`), tokenised; and
    the number dropped because the prompt alone fills `max_len`."""
    from align.data.io import read_preferences

    prompts, chosen, rejected, dropped = [], [], [], 0
    for src in sources:
        for row in read_preferences(src.path):
            p, c, r = encode_pair(tokenizer, row["prompt"], row["chosen"], row["rejected"])
            if len(p) >= max_len:
                dropped += 1
                continue
            prompts.append(p)
            chosen.append(c)
            rejected.append(r)
    if not prompts:
        raise AlignError(f"no usable preference pairs in {[s.path for s in sources]} ({dropped} prompts fill "
                         f"max_seq_len={max_len}); raise max_seq_len or check the file with "
                         "`align data check PATH --kind preferences`")
    return Pairs(prompts, chosen, rejected), dropped


def collate(pairs: Pairs, pad_id: int, max_len: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, each prompt + answer cut to `max_len` from the end
    (keep_start) and right-padded: input_ids, attention_mask, completion_mask `[2B, L]`."""
    seqs, masks = [], []
    for side in (pairs.chosen, pairs.rejected):
        for p, a in zip(pairs.prompt, side):
            seqs.append((p + a)[:max_len])
            masks.append(([0] * len(p) + [1] * len(a))[:max_len])
    length = max(len(s) for s in seqs)
    out = {k: torch.zeros((len(seqs), length), dtype=torch.long)
           for k in ("input_ids", "attention_mask", "completion_mask")}
    out["input_ids"].fill_(pad_id)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        out["input_ids"][i, :len(s)] = torch.tensor(s)
        out["attention_mask"][i, :len(s)] = 1
        out["completion_mask"][i, :len(m)] = torch.tensor(m)
    return out


# ------------------------------------------------------------------------------------ maths


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ answer-token log-probs `[2B]`, answer token counts `[2B]`) of a `collate`d batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logp, _ = token_logprobs(logits[:, :-1], batch["input_ids"][:, 1:], with_entropy=False)
    mask = batch["completion_mask"][:, 1:]
    return (logp * mask).sum(-1), mask.sum(-1)


def dpo_loss(logps: torch.Tensor, ref_logps: torch.Tensor, lengths: torch.Tensor, beta: float,
             loss_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss `[B]` and the implicit rewards β·(log π − log π_ref) of chosen and rejected
    `[B]` each (detached). `logps`, `ref_logps`, `lengths` are `[2B]`: chosen rows then rejected."""
    ratios = logps - ref_logps
    chosen, rejected = ratios.chunk(2)
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * (chosen - rejected))
    elif loss_type == "ipo":
        n_chosen, n_rejected = lengths.to(ratios.dtype).clamp(min=1.0).chunk(2)
        loss = (chosen / n_chosen - rejected / n_rejected - 1 / (2 * beta)) ** 2
    else:
        raise AlignError(f"loss_type {loss_type!r}: use sigmoid or ipo")
    return loss, beta * chosen.detach(), beta * rejected.detach()


def _sums(loss, r_chosen, r_rejected, logps) -> torch.Tensor:
    """Per-batch sums of METRICS' quantities and the pair count, to reduce over ranks."""
    lc, lr = logps.detach().chunk(2)
    return torch.stack([loss.detach().sum(), r_chosen.sum(), r_rejected.sum(), (r_chosen - r_rejected).sum(),
                        (r_chosen > r_rejected).sum(), lc.sum(), lr.sum(), loss.new_tensor(float(len(loss)))]).double()


def _means(totals: torch.Tensor, prefix: str = "") -> dict[str, float]:
    n = float(totals[-1]) or math.nan
    return {prefix + k: float(v) / n for k, v in zip(METRICS, totals[:-1])}


# ------------------------------------------------------------------------------------ loop


class DPOTrainer(StageTrainer):
    """DPO / IPO on preference pairs, on the shared stage loop."""

    def __init__(self, ctx: StageContext, accelerator, guard: NonFiniteGuard):
        super().__init__(ctx, accelerator, guard)
        stage: DPOStage = ctx.stage
        recipe = ctx.recipe
        self.pad_id = self.tokenizer.pad_token_id
        pairs, self.dropped = load_pairs(stage.data, self.tokenizer, stage.max_seq_len)
        self.eval_idx, self.train_idx = held_out_split(len(pairs), stage.eval_split, [ctx.seed, 0xD90])
        self.pairs = pairs
        self.global_batch, self.steps_per_epoch, self.total_steps = step_plan(
            stage, len(self.train_idx), accelerator.num_processes, "training pairs")
        self.model, self.optimizer, self.scheduler = prepare_training(accelerator, recipe, stage, ctx.init_model,
                                                                      ctx.resume_from, self.total_steps)
        self.policy = accelerator.unwrap_model(self.model)
        self.ref, self.ref_logps = None, None
        if stage.reference == "frozen_copy":
            self.ref = self._starting_model()
        elif stage.reference == "precomputed":
            self.ref_logps = self._precomputed()
        self.model.train()
        self.tokens = 0  # trained non-padding tokens (chosen + rejected), over every resumed run

    # ---------------------------------------------------------------- reference

    def _starting_model(self):
        """A frozen copy of the stage's starting model, placed like the policy (sharded under fsdp2)."""
        return reference_for_stage(self.ctx.recipe, self.stage, self.ctx.init_model, self.acc)

    def _precomputed(self) -> torch.Tensor:
        """Reference log-probs `[pairs, 2]` (chosen, rejected) of every pair, train and eval. A
        fresh run scores them with the policy before its first step and stores them; a resumed
        run reads that file (or, if it is gone, scores with a fresh copy of the starting model)."""
        from safetensors.torch import load_file, save_file

        path = self.ctx.stage_dir / REFERENCE_FILE
        if self.ctx.resume_from is not None and path.exists():
            stored = load_file(path)["logps"]
            if stored.shape == (len(self.pairs), 2):
                return stored
        logps = self._score_all(self.policy if self.ctx.resume_from is None else self._starting_model())
        if self.acc.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({"logps": logps}, str(tmp))
            tmp.replace(path)
        self.acc.wait_for_everyone()
        return logps

    def _shares(self, rows) -> list:
        """This rank's batches of `rows` (positions into it), padded with None so that every rank
        runs as many forwards (`even_batches`; under FSDP2 each forward is a collective); unsharded,
        the padding is dropped. Each entry: (positions, whether they are real rows)."""
        bs, rank, world = self.stage.per_device_batch_size, self.acc.process_index, self.acc.num_processes
        return [(list(r or range(1)), r is not None) for r in even_batches(len(rows), bs, rank, world)
                if r is not None or is_sharded(self.policy)]

    @torch.no_grad()
    def _score_all(self, model) -> torch.Tensor:
        """Sequence log-probs of every pair under `model`; each rank scores its share, one reduce."""
        acc = self.acc
        was_training = model.training
        model.eval()
        out = torch.zeros(len(self.pairs), 2, dtype=torch.float64, device=acc.device)
        for idx, real in self._shares(range(len(self.pairs))):
            logps, _ = sequence_logps(model, self._batch(self.pairs.take(idx)))
            if real:
                out[idx] = torch.stack(logps.chunk(2), dim=1).double()
        model.train(was_training)
        return reduce_sum(acc, out).float().cpu()

    @torch.no_grad()
    def _reference(self, idx, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """π_ref's sequence log-probs `[2B]` of the pairs `idx` (rows of `self.pairs`)."""
        if self.ref_logps is not None:
            return self.ref_logps[list(idx)].T.reshape(-1).to(self.acc.device)
        if self.ref is not None:
            return sequence_logps(self.ref, batch)[0]
        with self.policy.disable_adapter():
            was_training = self.policy.training
            self.policy.eval()
            logps = sequence_logps(self.policy, batch)[0]
            self.policy.train(was_training)
            return logps

    def _batch(self, pairs: Pairs) -> dict[str, torch.Tensor]:
        return {k: v.to(self.acc.device) for k, v in collate(pairs, self.pad_id, self.stage.max_seq_len).items()}

    # ---------------------------------------------------------------- the step

    def train_step(self, step: int, log: bool) -> dict[str, float]:
        acc, stage = self.acc, self.stage
        epoch, pos = divmod(step, max(1, self.steps_per_epoch))
        rows = self.train_idx[epoch_order(len(self.train_idx), self.global_batch, self.ctx.seed, epoch)[pos]]
        micro = np.array_split(rows[acc.process_index::acc.num_processes], stage.gradient_accumulation_steps)
        totals = torch.zeros(len(METRICS) + 1, dtype=torch.float64, device=acc.device)
        tokens = 0
        for j, chunk in enumerate(micro):
            batch = self._batch(self.pairs.take(chunk))
            ref = self._reference(chunk, batch)
            with maybe_no_sync(acc, self.model, sync=j == len(micro) - 1), acc.autocast():
                logps, lengths = sequence_logps(self.model, batch)
                loss, rc, rr = dpo_loss(logps, ref, lengths, stage.beta, stage.loss_type)
                backward(acc, loss.sum() * acc.num_processes / self.global_batch)
            totals += _sums(loss, rc, rr, logps)
            tokens += int(batch["attention_mask"].sum())
        norm = optimizer_step(acc, self.model, self.optimizer, self.scheduler, stage, self.guard, step)
        totals = reduce_sum(acc, totals)
        self.tokens += global_counts(acc, tokens)[0]
        if not log:
            return {"loss": float(totals[0] / totals[-1])}
        return {**_means(totals), "grad_norm": norm, "lr": self.scheduler.get_last_lr()[0],
                "epoch": (step + 1) / max(1, self.steps_per_epoch), "skipped_steps": self.guard.skipped}

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """The step's metrics on the held-out pairs (`eval_` prefix); each rank scores its share
        through the unwrapped model, then one reduce."""
        if not len(self.eval_idx):
            return {}
        acc = self.acc
        self.policy.eval()
        totals = torch.zeros(len(METRICS) + 1, dtype=torch.float64, device=acc.device)
        for pos, real in self._shares(self.eval_idx):
            idx = self.eval_idx[pos]
            batch = self._batch(self.pairs.take(idx))
            ref = self._reference(idx, batch)
            with acc.autocast():
                logps, lengths = sequence_logps(self.policy, batch)
            if real:
                totals += _sums(*dpo_loss(logps, ref, lengths, self.stage.beta, self.stage.loss_type), logps)
        self.model.train()
        return _means(reduce_sum(acc, totals), "eval_")

    def state_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tokens = state["tokens"]

    def summary(self) -> dict[str, Any]:
        return {"train_pairs": len(self.train_idx), "eval_pairs": len(self.eval_idx),
                "pairs_dropped_overlong_prompt": self.dropped, "tokens": self.tokens,
                "samples": 0, "reference": self.stage.reference}


def run(ctx: StageContext) -> StageResult:
    return run_stage(ctx, DPOTrainer)
