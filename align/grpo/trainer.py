"""The GRPO stage (DeepSeekMath's Group Relative Policy Optimization): the step, on the shared
stage loop (`align.loop`, which owns resume, logging, checkpoints, stop and `final/`).

One step, each phase timed into the metrics (`time/<phase>`):
  1. rollout    — `prompts_per_step` prompts (split evenly over ranks, whole groups per rank),
                  G = `group_size` samples each from the rollout engine (per-sample seeds;
                  trainer state offloaded meanwhile; `dynamic_sampling` keeps groups with spread).
  2. reward     — every reward component through `rewards.RewardSet` (isolated, combined).
  3. logprobs   — π_old only when it differs from the current policy or is needed (μ > 1,
                  importance_sampling, kl_mode: reward); π_ref only when beta > 0. With μ = 1 the
                  ratio is exactly 1 and no extra forward pass is spent on π_old.
  4. advantage  — A = (r − group mean) / group std over the *global* batch's groups (no critic);
                  with kl_mode: reward, r − β·Σ KL first.
  5. update     — μ = `num_iterations` optimizer steps over the batch, micro-batched by
                  `per_device_batch_size`; loss = clipped ratio·A + beta·KL (`loss_options`: the
                  recipe's loss keys), normalised over the whole step so micro-batching never changes it;
                  with `ptx`, + γ·SFT loss on conversations (align/grpo/ptx.py).
  6. sync       — new weights into the engine (a no-op for the colocated HF engine, which shares
                  the policy's tensors; vLLM reloads in place). Before the first rollout of a
                  run a rollout server gets the trainer's weights the same way (`_start_engine_at`).
Departures from the paper (beta = 0 loads no reference, DAPO / Dr. GRPO options): docs/grpo.md.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from align.data.prompts import PromptSet, as_completions, completion_texts, load_prompts, step_prompt_indices, step_seed
from align.grpo.advantages import ADVANTAGES, value_metrics, weight_negatives
from align.grpo.async_rollout import RolloutQueue
from align.grpo.batch import build_batch, micro_batch_size
from align.grpo.dynamic_sampling import Rollout, fill_batch
from align.grpo.logprobs import completion_logprobs
from align.grpo.kl import kl_penalized_rewards
from align.grpo.loss import loss_options, policy_loss
from align.grpo.ptx import PtxTerm
from align.grpo.metrics import PhaseTimer, completion_metrics, heldout_means, merge_micro_metrics
from align.loop import StageTrainer, run_stage
from align.moe import replaying, router_stats, routes_to_batch
from align.moe.rl import MoEStage
from align.offload import OffloadGroup
from align.grpo.sharded import every_rank_done, sync_engine
from align.sharding import reference_for_stage
from align.stage import StageContext, StageResult
from align.train_utils import (NonFiniteGuard, accelerate_unsharded, backward, global_counts, load_for_training,
                               maybe_no_sync, optimizer_step)
from rollout.base import SamplingParams


class GRPOTrainer(StageTrainer):
    headline = "reward"

    def __init__(self, ctx: StageContext, accelerator, guard: NonFiniteGuard):
        from rewards.reward_set import RewardSet
        from rollout.factory import build_policy_engine

        stage, recipe, self.world = ctx.stage, ctx.recipe, accelerator.num_processes
        self.micro, self.loss_options = micro_batch_size(stage, self.world), loss_options(stage)
        super().__init__(ctx, accelerator, guard)
        model = load_for_training(accelerator, recipe, stage, ctx.init_model, ctx.resume_from)
        self.moe = MoEStage.for_stage(stage, model)  # validates the MoE keys; freezes routers before the optimizer
        self.prompts = load_prompts(stage.prompts, self.tokenizer, stage.max_prompt_len)
        self.total_steps = stage.max_steps or max(1, math.ceil(
            stage.epochs * max(1, len(self.prompts) // stage.prompts_per_step)))
        self.model, self.optimizer, self.scheduler = accelerate_unsharded(  # μ optimizer steps per step
            accelerator, model, stage, self.total_steps * stage.num_iterations)
        self.policy = accelerator.unwrap_model(self.model)
        self.tokens = 0  # non-padding tokens trained, over every resumed run
        self.ref = (reference_for_stage(recipe, stage, ctx.init_model, accelerator)
                    if stage.beta > 0 and stage.reference == "frozen_copy" else None)
        self.eval_prompts = (load_prompts(stage.eval_prompts, self.tokenizer, stage.max_prompt_len)
                             if stage.eval_prompts else None)
        self.rewards = RewardSet(ctx.reward_specs(), stage.reward_isolation)
        self.ptx = PtxTerm.for_stage(stage, ctx.seed, recipe.output_dir, self.tokenizer, accelerator, self.micro)
        self.engine, self.shares_policy = build_policy_engine(
            stage.rollout, self.policy, ctx.init_model, self.tokenizer, seed=ctx.seed,
            record_routes=self.moe.record_routes(stage.rollout))
        if ctx.resume_from is None and stage.rollout.mode == "server" and not stage.max_staleness:
            # a server may hold another run's weights; a colocated engine was just built from init_model
            # (version 0 already). A resumed run pushes once the checkpoint's weights are in.
            self._start_engine_at(0)
        self.offload = OffloadGroup.for_rollout(stage, self.policy, self.optimizer, self.ref, accelerator.device,
                                                self.shares_policy)
        self.ahead = RolloutQueue.for_trainer(self) if stage.max_staleness else None  # docs/grpo.md

    def sampling(self, step: int, greedy: bool = False, round_: int = 0) -> SamplingParams:
        first_sample = self.acc.process_index * (self.stage.prompts_per_step // self.world) * self.stage.group_size
        s, seed = self.stage.sampling, step_seed(self.ctx.seed, step, round_, first_sample)  # seeds: step_seed
        return SamplingParams(temperature=0.0 if greedy else s.temperature, top_p=s.top_p, top_k=s.top_k,
                              max_new_tokens=s.max_new_tokens, stop=tuple(s.stop), seed=seed, logprobs=True)

    def generate_and_score(self, batch: PromptSet, sampling: SamplingParams, step: int, timer: PhaseTimer):
        """Rollout (trainer state offloaded meanwhile), then every reward on each sample."""
        g = 1 if sampling.temperature == 0 else self.stage.group_size
        with timer("rollout"), self.offload.offloaded():
            self.engine.wake()
            groups = self.engine.generate(batch.ids, g, sampling)
            self.engine.sleep()
        samples, rows = [s for group in groups for s in group], batch.repeat(g)
        with timer("reward"):
            scored = self.rewards(rows.prompts, as_completions(rows.prompts, completion_texts(self.tokenizer, samples)),
                                  completion_ids=[s.completion_ids for s in samples],
                                  trainer_state={"global_step": step}, **rows.columns)
        return samples, rows, scored

    def rollout(self, step: int, timer: PhaseTimer) -> Rollout:
        """This rank's samples for `step`; with dynamic sampling, only groups whose rewards differ."""
        stage = self.stage

        def generate(round_: int):
            idx = step_prompt_indices(self.ctx.seed, step, stage.prompts_per_step, len(self.prompts),
                                      self.acc.process_index, self.world, stream=round_)
            return self.generate_and_score(self.prompts.take(idx), self.sampling(step, round_=round_), step, timer)

        if (ds := stage.dynamic_sampling) is None:
            samples, rows, scored = generate(0)
            return Rollout(samples, rows, scored.total, scored.metrics, {})
        return fill_batch(generate, stage.prompts_per_step // self.world, stage.group_size, ds.max_rounds, ds.min_std,
                          agree=every_rank_done(self.policy, self.acc.device))

    def train_step(self, step: int, log: bool) -> dict[str, float]:
        stage, acc, timer, micro = self.stage, self.acc, PhaseTimer(), self.micro
        batch = self.rollout(step, timer) if self.ahead is None else self.ahead.take(step, timer)
        samples, rows = batch.samples, batch.rows
        data = build_batch(rows.ids, samples, self.tokenizer.pad_token_id, stage.mask_truncated)
        t_len = data["completion_mask"].size(1)
        tensors = {k: v.to(acc.device) for k, v in data.items()}
        routes = None
        if self.moe.record_routes(stage.rollout):  # experts the rollout chose, where their logits are read
            routes = routes_to_batch([len(p) for p in rows.ids], [s.routes for s in samples],
                                     data["input_ids"].size(1) - t_len, t_len).to(acc.device)
        old_logp = ref_logp = None
        kl_in_reward = stage.kl_mode == "reward" and stage.beta > 0
        with timer("logprobs"), torch.no_grad():
            if stage.num_iterations > 1 or stage.importance_sampling is not None or kl_in_reward:
                old_logp = self._logprobs(self.model, self.policy, tensors, t_len, self.moe.replayed(routes))
            if stage.beta > 0:
                ref_logp = self._ref_logprobs(tensors, t_len, self.moe.replayed(routes))
        with timer("advantage"):
            local = torch.tensor([math.nan if r is None else float(r) for r in batch.totals])
            rewards = shaped = acc.gather(local.to(acc.device)).cpu()  # whole groups per rank: order kept
            kl_metrics = {}
            if kl_in_reward:  # r − β·Σ_t KL_t per completion, before the group baseline
                penalised, kl_metrics = kl_penalized_rewards(local.to(acc.device), old_logp, ref_logp,
                                                             tensors["completion_mask"], beta=stage.beta,
                                                             estimator=stage.kl_estimator)
                shaped = acc.gather(penalised).cpu()
            adv_all, adv_metrics = ADVANTAGES.get(stage.scale_rewards)(shaped, group_size=stage.group_size)
            adv_all = weight_negatives(adv_all, stage.negative_advantage_weight)
            adv_metrics.update(value_metrics(adv_all))  # of the advantages trained on, after λ
            advantages = adv_all[acc.process_index * len(local):(acc.process_index + 1) * len(local)]
        metrics: dict[str, float] = {"loss": 0.0}
        with timer("update"):
            n_tokens, n_all = global_counts(acc, int(tensors["completion_mask"].sum()),
                                            int(tensors["attention_mask"].sum()))
            self.tokens += stage.num_iterations * n_all
            chunks = [slice(i, i + micro) for i in range(0, len(samples), micro)]
            for it in range(stage.num_iterations):
                self.model.train()
                with router_stats(self.policy, self.moe.is_moe and it == 0) as stats:
                    for j, sl in enumerate(chunks):
                        self._train_chunk(tensors, sl, advantages, old_logp, ref_logp, routes, n_tokens, t_len,
                                          len(chunks), metrics, timer, last=j == len(chunks) - 1 and self.ptx is None)
                metrics.update(stats.metrics())
                if self.ptx is not None:  # + γ·SFT loss, routed live (align/grpo/ptx.py)
                    with timer("update/ptx"):
                        ptx_metrics, ptx_tokens = self.ptx.backward(self.model, step)
                    metrics.update(ptx_metrics)
                    self.tokens += ptx_tokens
                with timer("update/optimizer"):
                    metrics["grad_norm"] = optimizer_step(acc, self.model, self.optimizer, self.scheduler, stage,
                                                          self.guard, step)
        metrics.update(self.moe.end_step(metrics, acc))
        with timer("sync"):  # a colocated HF engine generates with the policy itself: nothing to copy
            self._sync_engine(self.ahead or self.engine)
        metrics.update({k: float(v) for k, v in {**adv_metrics, **kl_metrics, **batch.reward_metrics,
                                                 **batch.metrics}.items()})
        metrics.update({k: float(v) for k, v in completion_metrics(data["completion_mask"], data["truncated"]).items()})
        metrics.update({"reward": float(torch.nanmean(rewards)), "lr": self.scheduler.get_last_lr()[0],
                        "skipped_steps": self.guard.skipped, **timer.times})
        # rollout servers' running counts (requests, retries, dead_workers, samples, stale_samples)
        metrics.update({f"rollout/{k}": float(v) for k, v in getattr(self.ahead or self.engine, "stats", {}).items()})
        metrics.update(self.offload.step_metrics())
        return metrics

    def _train_chunk(self, tensors, sl: slice, advantages, old_logp, ref_logp, routes, n_tokens: int, t_len: int,
                     n_chunks: int, metrics: dict[str, float], timer: PhaseTimer, last: bool) -> None:
        """Forward + backward of one micro-batch (routes replayed or measured, backward inside the
        replay so recomputed passes route the same way); gradients all-reduce on the last one only.
        Timed into `time/update/forward` and `time/update/backward` (parts of `time/update`)."""
        stage = self.stage
        with maybe_no_sync(self.acc, self.model, sync=last), \
                self.moe.micro_pass(self.policy, None if routes is None else routes[sl]) as moe:
            with timer("update/forward"):
                logp, entropy = completion_logprobs(self.model, tensors["input_ids"][sl], tensors["attention_mask"][sl],
                                                    completion_length=t_len, temperature=self._temp(),
                                                    fp32_lm_head=stage.fp32_lm_head)
                loss, m = policy_loss(  # rollout logprobs always: the train-rollout mismatch is logged every step
                    logp, None if old_logp is None else old_logp[sl], advantages[sl].to(self.acc.device),
                    tensors["completion_mask"][sl], ref_logp=None if ref_logp is None else ref_logp[sl],
                    rollout_logp=tensors["rollout_logp"][sl], entropy=entropy, num_items_in_batch=n_tokens,
                    num_micro_batches=n_chunks, world_size=self.acc.num_processes, **self.loss_options)
                loss = loss + moe.loss(n_chunks)
            with timer("update/backward"):
                backward(self.acc, loss)
        metrics["loss"] += float(loss.detach()) / stage.num_iterations
        merge_micro_metrics(metrics, {**m, **moe.metrics()}, n_chunks * stage.num_iterations)

    def _temp(self) -> float:  # logprobs at the sampling temperature; greedy rollouts score at 1
        return self.stage.sampling.temperature or 1.0

    @torch.no_grad()
    def _logprobs(self, model, gated, tensors, t_len: int, routes: torch.Tensor | None) -> torch.Tensor:
        """Completion logprobs of `model` in eval batches, routes replayed on `gated`'s routers."""
        with replaying(gated, routes):
            return completion_logprobs(model, tensors["input_ids"], tensors["attention_mask"], completion_length=t_len,
                                       temperature=self._temp(), micro_batch_size=self.micro, with_entropy=False,
                                       fp32_lm_head=self.stage.fp32_lm_head)[0]

    def _ref_logprobs(self, tensors, t_len: int, routes: torch.Tensor | None) -> torch.Tensor:
        if self.ref is not None:  # never `prepare`d, so mixed precision is applied here, as for the policy
            with self.acc.autocast():
                return self._logprobs(self.ref, self.ref, tensors, t_len, routes)
        with self.policy.disable_adapter():  # reference = the LoRA policy's base weights
            return self._logprobs(self.model, self.policy, tensors, t_len, routes)

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Greedy answers to the held-out prompts, scored by the training rewards (so reported accuracy
        and the training signal cannot drift apart): means per component and per `category`."""
        if self.eval_prompts is None:
            return {}
        self.model.eval()
        if self.ahead is not None:  # the engine serves no batch ahead meanwhile
            self.ahead.drain()
        n = min(self.stage.eval_max_prompts, len(self.eval_prompts))
        batch = self.eval_prompts.take(list(range(self.acc.process_index, n, self.world)))
        _, rows, scored = self.generate_and_score(batch, self.sampling(0, greedy=True), step, PhaseTimer())
        # every evaluated prompt's categories, not this rank's share: all ranks make the same reduces
        categories = sorted({c for c in self.eval_prompts.columns.get("category", [])[:n] if c is not None})
        return heldout_means(self.acc, scored.components, rows.columns.get("category"), categories)

    def state_dict(self) -> dict[str, Any]:
        ahead = {} if self.ahead is None else {"ahead": self.ahead.state_dict()}  # first: rewards scored ahead
        return {"rewards": self.rewards.state_dict(), "weight_version": self.engine.weight_version,
                "tokens": self.tokens, "moe": self.moe.state_dict(), **ahead}

    def _sync_engine(self, target) -> None:  # gathered from the shards under fsdp2 (align/grpo/sharded.py)
        sync_engine(target, self.policy, self.shares_policy, self.ctx.recipe.distributed.sync_group_mb, self.acc.device)

    def _start_engine_at(self, version: int) -> None:
        """Push the trainer's weights, labelled `version`, before the engine serves this run: a
        rollout server may still hold an earlier run's weights (or another checkpoint's), which
        would otherwise make step 1's samples. With the label the engines report the trainer's
        count (sync check) and the next rollout's samples are not counted stale. The overlapped
        queue does the same at its first step (align/grpo/async_rollout.py)."""
        self.engine.weight_version = version - 1
        self._sync_engine(self.engine)

    def load_state_dict(self, state: dict[str, Any]) -> None:  # after the checkpoint's weights are in
        if not (self.shares_policy or self.stage.max_staleness):  # a queue ahead resyncs itself
            self._start_engine_at(state["weight_version"])
        self.rewards.load_state_dict(state["rewards"])
        self.engine.weight_version, self.tokens = state["weight_version"], state["tokens"]
        self.moe.load_state_dict(state["moe"])
        if self.ahead is not None:
            self.ahead.load_state_dict(state.get("ahead"))

    def summary(self) -> dict[str, Any]:
        return {"samples": self.total_steps * self.stage.prompts_per_step * self.stage.group_size,
                "tokens": self.tokens, "prompts_truncated": self.prompts.truncated}


def run(ctx: StageContext) -> StageResult:
    return run_stage(ctx, GRPOTrainer)
