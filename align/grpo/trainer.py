"""The GRPO stage (DeepSeekMath's Group Relative Policy Optimization) on accelerate.

One step, each phase timed into the metrics (`time/<phase>`):
  1. rollout    — `prompts_per_step` prompts (split evenly over ranks, whole groups per rank),
                  G = `group_size` samples each from the rollout engine (per-sample seeds).
  2. reward     — every reward component through `rewards.RewardSuite` (isolated, combined).
  3. advantage  — A = (r − group mean) / group std over the *global* batch's groups (no critic).
  4. logprobs   — π_old only when it differs from the current policy (μ > 1, or truncated IS);
                  π_ref only when beta > 0. With μ = 1 the ratio is exactly 1 and no extra
                  forward pass is spent on π_old.
  5. update     — μ = `num_iterations` optimizer steps over the batch, micro-batched by
                  `per_device_batch_size`; loss = clipped ratio·A + beta·KL(k3), aggregated by
                  `loss_type`, normalised over the whole step so micro-batching never changes it.
  6. sync       — new weights into the engine (a no-op for the colocated HF engine, which shares
                  the policy's tensors; vLLM reloads in place).
  7. checkpoint — every `save_steps`, atomically, with everything needed to resume exactly.

Departures from the paper, on purpose: the KL term sits in the loss (as in DeepSeekMath) but
beta = 0 is allowed and then no reference model is loaded; DAPO's asymmetric clip
(`epsilon_high`) and Dr. GRPO/DAPO aggregations are options; outcome rewards only (no process
supervision).
"""

from __future__ import annotations

import functools
import math
import random
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from align.checkpoint import load_checkpoint, save_checkpoint, save_final
from align.config import GRPOStage
from align.errors import AlignError
from align.grpo.advantages import ADVANTAGES
from align.grpo.kl import kl_penalized_rewards
from align.grpo.logprobs import completion_logprobs
from align.grpo.loss import policy_loss
from align.grpo.metrics import completion_metrics
from align.moe import (RouteReplay, checkpoint_weights, ensure_replay_supported, moe_gates, router_stats,
                       routes_to_batch)
from align.stage import StageContext, StageResult
from align.tracking import MetricsLog
from align.train_utils import (NonFiniteGuard, TrainingInterrupted, backward, build_optimizer,
                               build_scheduler, global_token_count, load_trainable_model,
                               make_accelerator, maybe_no_sync, optimizer_step)
from rollout.base import Sample, SamplingParams


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


class PhaseTimer:
    """`with timer("rollout"):` adds the phase's wall time to `time/rollout` of this step."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[f"time/{phase}"] = self.times.get(f"time/{phase}", 0.0) + time.perf_counter() - start


def completion_texts(tokenizer, samples: list[Sample]) -> list[str]:
    return tokenizer.batch_decode([s.completion_ids for s in samples], skip_special_tokens=True)


def as_completions(prompts: list[Any], texts: list[str]) -> list[Any]:
    """TRL's convention: conversational prompts get `[{"role": "assistant", "content": text}]`."""
    return [[{"role": "assistant", "content": t}] if isinstance(p, list) else t
            for p, t in zip(prompts, texts, strict=True)]


def build_batch(prompt_ids: list[list[int]], samples: list[Sample], pad_id: int,
                mask_truncated: bool) -> dict[str, torch.Tensor]:
    """Left-padded prompts + right-padded completions: input_ids/attention_mask `[N, P+T]`,
    completion_mask `[N, T]` (tokens through EOS; all zero for truncated samples when
    `mask_truncated`), rollout_logp `[N, T]` (NaN where the engine gave none), truncated `[N]`."""
    n = len(samples)
    p_len = max(len(p) for p in prompt_ids)
    t_len = max(1, max(len(s.completion_ids) for s in samples))
    input_ids = torch.full((n, p_len + t_len), pad_id, dtype=torch.long)
    attention = torch.zeros((n, p_len + t_len), dtype=torch.long)
    rollout_logp = torch.full((n, t_len), float("nan"))
    for i, (prompt, s) in enumerate(zip(prompt_ids, samples, strict=True)):
        c = s.completion_ids
        input_ids[i, p_len - len(prompt):p_len] = torch.tensor(prompt)
        attention[i, p_len - len(prompt):p_len] = 1
        if c:
            input_ids[i, p_len:p_len + len(c)] = torch.tensor(c)
            attention[i, p_len:p_len + len(c)] = 1
        if s.logprobs is not None and c:
            rollout_logp[i, :len(c)] = torch.tensor(s.logprobs, dtype=torch.float32)
    truncated = torch.tensor([s.finish_reason == "length" for s in samples])
    completion_mask = attention[:, p_len:].clone()
    if mask_truncated:
        completion_mask[truncated] = 0
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion_mask,
            "rollout_logp": rollout_logp, "truncated": truncated}


def policy_weights(model) -> list[tuple[str, torch.Tensor]]:
    """Full weights for the rollout engine under checkpoint names and shapes (MoE experts
    unfused, as vLLM loads them); a LoRA model's adapter is merged in first."""
    if not hasattr(model, "merge_adapter"):
        return checkpoint_weights(model)
    from transformers.core_model_loading import revert_weight_conversion

    model.merge_adapter()
    try:
        merged = {k.replace("base_model.model.", "").replace(".base_layer", ""): v.detach().clone()
                  for k, v in model.state_dict().items() if "lora_" not in k}
    finally:
        model.unmerge_adapter()
    return list(revert_weight_conversion(model.get_base_model(), merged).items())


def replaying(model, routes: torch.Tensor | None):
    """Routing replay around a forward (and backward) pass, or nothing for dense/unreplayed runs."""
    return RouteReplay(model, routes) if routes is not None else nullcontext()


def merge_micro_metrics(into: dict[str, float], new: dict[str, torch.Tensor], parts: int) -> None:
    """Combine one micro-batch's metrics into the step's: min/max keys by min/max, the rest
    as the mean over `parts` micro-batches."""
    for key, value in new.items():
        v = float(value)
        if key.endswith("_min"):
            into[key] = min(into.get(key, math.inf), v)
        elif key.endswith("_max"):
            into[key] = max(into.get(key, -math.inf), v)
        else:
            into[key] = into.get(key, 0.0) + v / parts


class GRPOTrainer:
    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self.stage: GRPOStage = ctx.stage
        stage, recipe = self.stage, ctx.recipe
        if stage.gradient_accumulation_steps != 1:
            raise AlignError(f"stages.{stage.name}.gradient_accumulation_steps: GRPO accumulates over the "
                             "whole generated batch already; set per_device_batch_size (rows per forward "
                             "pass) instead and leave gradient_accumulation_steps at 1")
        self.acc = make_accelerator(stage, log_dir=ctx.stage_dir, report_to=recipe.logging.report_to)
        self.world = self.acc.num_processes
        if stage.prompts_per_step % self.world:
            raise AlignError(f"stages.{stage.name}.prompts_per_step={stage.prompts_per_step} must be a "
                             f"multiple of the number of processes ({self.world}), so whole groups stay "
                             "on one rank")
        local_samples = stage.prompts_per_step // self.world * stage.group_size
        # rows per forward pass: at most per_device_batch_size, so a recipe runs on 1 or N processes
        self.micro = min(stage.per_device_batch_size, local_samples)
        if local_samples % self.micro:
            raise AlignError(f"stages.{stage.name}.per_device_batch_size={stage.per_device_batch_size} must "
                             f"divide the {local_samples} samples each process trains on per step "
                             "(prompts_per_step / processes × group_size), so every micro-batch weighs the same")
        from align.models.load import load_causal_lm, load_tokenizer
        from rewards.suite import RewardSuite

        self.tokenizer = load_tokenizer(ctx.init_model, recipe.model.trust_remote_code)
        torch.manual_seed(ctx.seed)  # LoRA init depends on the stage's seed, not on earlier stages
        model = load_trainable_model(recipe, stage, ctx.init_model, ctx.resume_from)
        self.ref = None
        if stage.beta > 0 and stage.reference == "frozen_copy":
            self.ref = load_causal_lm(ctx.init_model, dtype=recipe.model.dtype,
                                      trust_remote_code=recipe.model.trust_remote_code,
                                      allow_pickle=recipe.model.allow_pickle_weights).eval()
            self.ref.requires_grad_(False)
            self.ref.to(self.acc.device)
        self.prompts = load_prompts(stage.prompts, self.tokenizer, stage.max_prompt_len)
        self.optimizer = build_optimizer(model, stage)
        self.total_steps = self._total_steps()
        self.scheduler = build_scheduler(self.optimizer, stage, self.total_steps)
        self.model, self.optimizer = self.acc.prepare(model, self.optimizer)
        self.eval_prompts = (load_prompts(stage.eval_prompts, self.tokenizer, stage.max_prompt_len)
                             if stage.eval_prompts else None)
        self.rewards = RewardSuite(self._reward_specs(), stage.reward_isolation)
        self.is_moe = bool(moe_gates(self.acc.unwrap_model(self.model)))
        self.engine = self._build_engine()
        self.offloader = self._build_offloader()
        self.guard = NonFiniteGuard()
        self.step = 0

    # -------------------------------------------------------------------------------- setup

    def _total_steps(self) -> int:
        if self.stage.max_steps is not None:
            return self.stage.max_steps
        per_epoch = max(1, len(self.prompts) // self.stage.prompts_per_step)
        return max(1, math.ceil(self.stage.epochs * per_epoch))

    def _reward_specs(self):
        """Reward-model components may name an earlier stage (`model: helpful_rm`): use its final/."""
        names = {s.name for s in self.ctx.recipe.stages}
        out = Path(self.ctx.recipe.output_dir)
        return [s.model_copy(update={"model": str(out / s.model / "final"), "alias": s.alias or s.model})
                if s.model in names else s for s in self.stage.rewards]

    def _build_engine(self):
        from rollout.factory import build_engine

        cfg = self.stage.rollout
        replay = self.stage.routing_replay
        if replay:
            ensure_replay_supported(cfg.engine, cfg.mode)
            if not self.is_moe:
                raise AlignError(f"stages.{self.stage.name}.routing_replay: the model has no MoE routers; "
                                 "set routing_replay: false")
        self.shares_policy = cfg.engine == "hf" and cfg.mode == "colocate"
        if self.shares_policy:
            return build_engine(cfg, self.acc.unwrap_model(self.model), self.tokenizer, record_routes=replay)
        engine = build_engine(cfg, self.ctx.init_model, self.tokenizer, seed=self.ctx.seed, record_routes=replay)
        if self.ctx.resume_from is not None:  # the engine starts from init weights: catch it up
            engine.update_weights(policy_weights(self.acc.unwrap_model(self.model)))
        return engine

    def _build_offloader(self):
        """Trainer state (and the frozen reference) leave the device while the engine generates.
        A colocated HF engine generates with the policy itself, so there it cannot apply."""
        if not self.stage.offload:
            return None
        if self.shares_policy:
            raise AlignError(f"stages.{self.stage.name}.offload: the colocated HF engine generates with the "
                             "training weights, so they cannot be offloaded; use rollout.engine: vllm or "
                             "mode: server, or set offload: false")
        from align.offload import Offloader

        movers = [Offloader(self.acc.unwrap_model(self.model), self.optimizer, device=self.acc.device)]
        if self.ref is not None:
            movers.append(Offloader(self.ref, None, device=self.acc.device))
        return movers

    @contextmanager
    def _trainer_off_device(self):
        with ExitStack() as stack:
            for mover in self.offloader or []:
                stack.enter_context(mover.offloaded())
            yield

    # ------------------------------------------------------------------------------ data

    def step_prompts(self, step: int, source: PromptSet) -> list[int]:
        """This rank's prompt indices for `step`: a seeded permutation per epoch, walked in order,
        so the data position is a pure function of (seed, step) — resume needs no iterator state."""
        per_step, n = self.stage.prompts_per_step, len(source)
        local = per_step // self.world
        start = step * per_step + self.acc.process_index * local
        return [self._epoch_order(epoch, n)[offset]
                for epoch, offset in (divmod(pos, n) for pos in range(start, start + local))]

    @functools.lru_cache(maxsize=2)  # the current epoch, and the next one at a boundary
    def _epoch_order(self, epoch: int, n: int) -> list[int]:
        order = list(range(n))
        random.Random(self.ctx.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def sampling(self, step: int, greedy: bool = False) -> SamplingParams:
        s = self.stage.sampling
        # Distinct per step; offset by this rank's first sample, so the seed of a sample depends
        # on its global position only (with one prompt per generate call the samples are then
        # the same whatever the number of ranks). Engines add the per-sample offset.
        first_sample = self.acc.process_index * (self.stage.prompts_per_step // self.world) * self.stage.group_size
        seed = (self.ctx.seed * 1_000_003 + step * 7919 + first_sample) % (2**31)
        return SamplingParams(temperature=0.0 if greedy else s.temperature, top_p=s.top_p,
                              top_k=s.top_k, max_new_tokens=s.max_new_tokens, stop=tuple(s.stop),
                              seed=seed, logprobs=True)

    # ------------------------------------------------------------------------------ step

    def generate_and_score(self, batch: PromptSet, sampling: SamplingParams, timer: PhaseTimer):
        g = 1 if sampling.temperature == 0 else self.stage.group_size
        with timer("rollout"), self._trainer_off_device():
            self.engine.wake()
            groups = self.engine.generate(batch.ids, g, sampling)
            self.engine.sleep()
        samples = [s for group in groups for s in group]
        prompt_ids = [ids for ids in batch.ids for _ in range(g)]
        prompts = [p for p in batch.prompts for _ in range(g)]
        columns = {k: [v for v in vals for _ in range(g)] for k, vals in batch.columns.items()}
        with timer("reward"):
            texts = completion_texts(self.tokenizer, samples)
            scored = self.rewards(prompts, as_completions(prompts, texts),
                                  completion_ids=[s.completion_ids for s in samples],
                                  trainer_state={"global_step": self.step}, **columns)
        return samples, prompt_ids, scored, columns

    def train_step(self) -> dict[str, float]:
        stage, acc, timer = self.stage, self.acc, PhaseTimer()
        batch = self.prompts.take(self.step_prompts(self.step, self.prompts))
        samples, prompt_ids, scored, _ = self.generate_and_score(batch, self.sampling(self.step), timer)
        data = build_batch(prompt_ids, samples, self.tokenizer.pad_token_id, stage.mask_truncated)
        t_len = data["completion_mask"].size(1)
        dev = acc.device
        tensors = {k: v.to(dev) for k, v in data.items()}
        micro = self.micro
        routes = None
        if stage.routing_replay:  # experts the rollout chose, at the positions whose logits we read
            routes = routes_to_batch([len(p) for p in prompt_ids], [s.routes for s in samples],
                                     data["input_ids"].size(1) - t_len, t_len).to(dev)
        policy = acc.unwrap_model(self.model)
        old_logp = ref_logp = None
        kl_in_reward = stage.kl_mode == "reward" and stage.beta > 0
        with timer("logprobs"), torch.no_grad():
            if stage.num_iterations > 1 or stage.importance_sampling is not None or kl_in_reward:
                with replaying(policy, routes):
                    old_logp, _ = completion_logprobs(self.model, tensors["input_ids"], tensors["attention_mask"],
                                                      completion_length=t_len, temperature=self._temp(),
                                                      micro_batch_size=micro, with_entropy=False,
                                                      fp32_lm_head=stage.fp32_lm_head)
            if stage.beta > 0:
                ref_logp = self._ref_logprobs(tensors, t_len, micro, routes)
        with timer("advantage"):
            local = torch.tensor([math.nan if r is None else float(r) for r in scored.total])
            rewards = acc.gather(local.to(acc.device)).cpu()  # whole groups per rank: order preserved
            shaped, kl_metrics = rewards, {}
            if kl_in_reward:  # r − β·Σ_t KL_t per completion, before the group baseline
                penalised, kl_metrics = kl_penalized_rewards(
                    local.to(dev), old_logp, ref_logp, tensors["completion_mask"], beta=stage.beta,
                    estimator=stage.kl_estimator)
                shaped = acc.gather(penalised).cpu()
            adv_all, adv_metrics = ADVANTAGES.get(stage.scale_rewards)(shaped, group_size=stage.group_size)
            adv_metrics = {**adv_metrics, **kl_metrics}
            lo = acc.process_index * len(local)
            advantages = adv_all[lo:lo + len(local)]
        metrics: dict[str, float] = {"loss": 0.0}
        with timer("update"):
            n_tokens = global_token_count(acc, int(tensors["completion_mask"].sum()))
            chunks = [slice(i, i + micro) for i in range(0, len(samples), micro)]
            for it in range(stage.num_iterations):
                self.model.train()
                with router_stats(policy, self.is_moe and it == 0) as stats:
                    self._train_chunks(tensors, advantages, old_logp, ref_logp, routes, chunks, n_tokens,
                                       t_len, metrics)
                metrics.update(stats.metrics())
                metrics["grad_norm"] = optimizer_step(acc, self.model, self.optimizer, self.scheduler, stage,
                                                      self.guard, self.step)
        with timer("sync"):  # a colocated HF engine generates with the policy itself: nothing to copy
            self.engine.update_weights([] if self.shares_policy else policy_weights(acc.unwrap_model(self.model)))
        metrics.update({k: float(v) for k, v in adv_metrics.items()})
        metrics.update({k: float(v) for k, v in scored.metrics.items()})
        metrics.update({k: float(v) for k, v in completion_metrics(data["completion_mask"], data["truncated"]).items()})
        metrics["reward"] = float(torch.nanmean(rewards))  # over all ranks
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        metrics["skipped_steps"] = self.guard.skipped
        metrics.update(timer.times)
        # rollout servers' running counts (requests, retries, dead_workers, samples, stale_samples)
        metrics.update({f"rollout/{k}": float(v) for k, v in getattr(self.engine, "stats", {}).items()})
        for mover in self.offloader or []:  # the policy's transfers (the reference's are added)
            for key, value in mover.step_metrics().items():
                metrics[key] = metrics.get(key, 0.0) + value
        return dict(metrics)

    def _train_chunks(self, tensors, advantages, old_logp, ref_logp, routes, chunks, n_tokens: int,
                      t_len: int, metrics: dict[str, float]) -> None:
        """Forward + backward over the micro-batches of one optimizer step (routes replayed per
        chunk, backward inside the replay so recomputed passes route the same way)."""
        stage, acc, dev = self.stage, self.acc, self.acc.device
        policy = acc.unwrap_model(self.model)
        for j, sl in enumerate(chunks):
            with maybe_no_sync(acc, self.model, sync=j == len(chunks) - 1), \
                    replaying(policy, None if routes is None else routes[sl]) as replay:
                logp, entropy = completion_logprobs(
                    self.model, tensors["input_ids"][sl], tensors["attention_mask"][sl],
                    completion_length=t_len, temperature=self._temp(), fp32_lm_head=stage.fp32_lm_head)
                is_cfg = stage.importance_sampling
                loss, m = policy_loss(
                    logp, None if old_logp is None else old_logp[sl], advantages[sl].to(dev),
                    tensors["completion_mask"][sl],
                    ref_logp=None if ref_logp is None else ref_logp[sl],
                    rollout_logp=tensors["rollout_logp"][sl],  # always: the mismatch is logged every step
                    entropy=entropy, aggregation=stage.loss_type, objective=stage.policy_objective,
                    ratio_level=stage.importance_sampling_level, epsilon_low=stage.epsilon_low,
                    epsilon_high=stage.epsilon_high, clip_ratio_c=stage.clip_ratio_c, cispo_cap=stage.cispo_cap,
                    beta=stage.beta if stage.kl_mode == "loss" else 0.0, kl_estimator=stage.kl_estimator,
                    kl_ratio_correction=stage.kl_ratio_correction,
                    is_cap=None if is_cfg is None else is_cfg.cap,
                    is_level="token" if is_cfg is None else is_cfg.level,
                    is_mode="truncate" if is_cfg is None else is_cfg.mode,
                    max_completion_length=stage.sampling.max_new_tokens, num_items_in_batch=n_tokens,
                    num_micro_batches=len(chunks), world_size=acc.num_processes)
                backward(acc, loss)
            metrics["loss"] += float(loss.detach()) / stage.num_iterations
            if replay is not None:
                m = {**m, "moe/replay_mismatch": torch.tensor(replay.mismatch())}
            merge_micro_metrics(metrics, m, len(chunks) * stage.num_iterations)

    def _temp(self) -> float:
        t = self.stage.sampling.temperature
        return t if t > 0 else 1.0

    @torch.no_grad()
    def _ref_logprobs(self, tensors, t_len: int, micro: int, routes: torch.Tensor | None) -> torch.Tensor:
        args = dict(completion_length=t_len, temperature=self._temp(), micro_batch_size=micro,
                    with_entropy=False, fp32_lm_head=self.stage.fp32_lm_head)
        if self.ref is not None:
            with replaying(self.ref, routes):
                return completion_logprobs(self.ref, tensors["input_ids"], tensors["attention_mask"], **args)[0]
        policy = self.acc.unwrap_model(self.model)
        with policy.disable_adapter(), replaying(policy, routes):  # reference = base weights
            return completion_logprobs(self.model, tensors["input_ids"], tensors["attention_mask"], **args)[0]

    # ------------------------------------------------------------------------------ eval

    @torch.no_grad()
    def evaluate(self, limit: int = 256) -> dict[str, float]:
        """Greedy completions on the held-out prompts, scored by the same reward functions as
        training (so reported accuracy and the training signal cannot drift apart); means per
        component, and per `category` column when the prompts have one."""
        if self.eval_prompts is None:
            return {}
        self.model.eval()
        n = min(limit, len(self.eval_prompts))
        idx = list(range(self.acc.process_index, n, self.world))
        batch = self.eval_prompts.take(idx)
        _, _, scored, columns = self.generate_and_score(batch, self.sampling(0, greedy=True), PhaseTimer())
        categories = sorted({c for c in self.eval_prompts.columns.get("category", [])[:n] if c is not None})
        out: dict[str, float] = {}
        for name, vals in scored.components.items():
            vals_t = torch.tensor([math.nan if v is None else float(v) for v in vals], dtype=torch.float64,
                                  device=self.acc.device)
            out[f"eval/{name}"] = self._mean_over_ranks(vals_t, torch.ones_like(vals_t, dtype=torch.bool))
            # every evaluated prompt's categories, not this rank's share: all ranks make the same reduces
            for cat in categories:
                sel = torch.tensor([c == cat for c in columns["category"]], device=self.acc.device)
                out[f"eval/{name}/{cat}"] = self._mean_over_ranks(vals_t, sel)
        return out

    def _mean_over_ranks(self, values: torch.Tensor, select: torch.Tensor) -> float:
        """Mean of the selected finite values over all ranks (shares may differ in length), NaN if none."""
        keep = select & values.isfinite()
        totals = torch.stack([torch.where(keep, values, 0.0).sum(), keep.sum().double()])
        totals = self.acc.reduce(totals, "sum") if self.world > 1 else totals
        return float(totals[0] / totals[1]) if totals[1] > 0 else math.nan

    # ------------------------------------------------------------------------------ loop

    def state(self) -> dict[str, Any]:
        return {"rewards": self.rewards.state_dict(), "weight_version": self.engine.weight_version,
                "skipped_steps": self.guard.skipped, "eval_before": self.eval_before}

    def save(self) -> Path:
        return save_checkpoint(self.ctx.stage_dir, self.step, model=self.model, tokenizer=self.tokenizer,
                               optimizer=self.optimizer, scheduler=self.scheduler, state=self.state(),
                               accelerator=self.acc, keep_last=self.stage.keep_last)

    def run(self) -> StageResult:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        ctx, stage = self.ctx, self.stage
        self.eval_before: dict[str, float] = {}
        if ctx.resume_from is not None:
            state = load_checkpoint(ctx.resume_from, optimizer=self.optimizer, scheduler=self.scheduler,
                                    rank=self.acc.process_index)
            self.step = state["step"]
            self.rewards.load_state_dict(state["rewards"])
            self.engine.weight_version = state["weight_version"]
            self.guard.skipped = state["skipped_steps"]
            self.eval_before = state["eval_before"]
        else:
            self.eval_before = self.evaluate()
        log = MetricsLog(ctx.stage_dir, self.acc, resume_step=self.step if ctx.resume_from else None)
        if self.acc.is_main_process and not ctx.resume_from and self.eval_before:
            log.log(0, self.eval_before)
        started, first, last = time.perf_counter(), None, None
        progress = Progress(TextColumn(f"[bold]{stage.name}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                            disable=not self.acc.is_main_process)
        with progress:
            task = progress.add_task("grpo", total=self.total_steps, completed=self.step, info="")
            while self.step < self.total_steps:
                metrics = self.train_step()
                self.step += 1
                first, last = first or metrics, metrics
                if self.step % stage.logging_steps == 0 or self.step == self.total_steps:
                    log.log(self.step, metrics)
                progress.update(task, advance=1, info=f"reward {metrics['reward']:.3f} loss {metrics['loss']:.4f}")
                saved = None
                if stage.save_steps and self.step % stage.save_steps == 0 and self.step < self.total_steps:
                    saved = self.save()
                if ctx.stop.requested:
                    raise TrainingInterrupted(stage.name, self.step, saved or self.save())
        eval_after = self.evaluate()
        if eval_after:
            log.log(self.step, eval_after)
        final = save_final(ctx.stage_dir, model=self.model, tokenizer=self.tokenizer, accelerator=self.acc,
                           merge_lora=stage.lora.merge_on_save if stage.lora else True)
        summary: dict[str, Any] = {"steps": self.step, "samples": self.step * stage.prompts_per_step * stage.group_size,
                                   "time_s": round(time.perf_counter() - started, 1)}
        if first and last:
            summary["reward_first_step"] = first["reward"]
            summary["reward_last_step"] = last["reward"]
        for key, value in eval_after.items():
            summary[f"{key} (before)"] = self.eval_before.get(key)
            summary[f"{key} (after)"] = value
        summary["skipped_steps"] = self.guard.skipped
        summary["prompts_truncated"] = self.prompts.truncated
        log.close()
        return StageResult(final=final, summary=summary)


def run(ctx: StageContext) -> StageResult:
    return GRPOTrainer(ctx).run()
