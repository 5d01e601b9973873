"""PPO-ptx in a GRPO stage (InstructGPT, Ouyang et al. 2022; OpenRLHF `ptx_coef`): every optimizer
step adds γ × the SFT loss of `ptx.batch_size` conversations to the RL loss,

    L = L_GRPO + γ · (1/N) Σ_{target tokens} −log π_θ(y_t | y_<t),

where N counts the target (assistant) tokens of the step's whole ptx batch over every rank, as in
the SFT stage (`align.sft.forward_backward` computes it, so the two cannot drift apart).

Why: RL moves every weight to raise the reward on its own prompts, and a small model stores what SFT
taught (arithmetic facts, fluency) in the same weights, so it unlearns what the rewards never ask
about (docs/grpo.md, "Keeping what SFT taught"). The SFT term holds those outputs in place.

The batch of step s is row block s of `align.data.batching.epoch_order` (seed, epoch): a pure
function of the step, so a resumed run trains on exactly the rows the uninterrupted one would,
with no state in the checkpoint. Conversations are right-padded, not packed: `batch_size` counts
conversations. The forward passes run outside routing replay: the conversations were not rolled
out, so an MoE model routes them live.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from align.data import batching
from align.errors import AlignError
from align.recipe.schema import PtxConfig


@dataclass(frozen=True)
class _Plan:  # what align.sft.forward_backward reads from a stage
    per_device_batch_size: int
    gradient_accumulation_steps: int
    packing: bool = False
    moe_aux_loss_coef: float = 0.0


class PtxTerm:
    """The ptx data of one GRPO stage and its step's backward pass."""

    def __init__(self, cfg: PtxConfig, stage_name: str, seed: int, output_dir: str, tokenizer, accelerator,
                 micro: int):
        from align.sft import load_sources

        world = accelerator.num_processes
        per_rank = cfg.batch_size // world
        if cfg.batch_size % world:
            raise AlignError(f"stages.{stage_name}.ptx.batch_size: {cfg.batch_size} conversations do not split "
                             f"evenly over {world} processes; use a multiple of {world}")
        micro = min(micro, per_rank)
        if per_rank % micro:
            raise AlignError(f"stages.{stage_name}.ptx.batch_size: {per_rank} conversations per process do not "
                             f"split into micro-batches of per_device_batch_size {micro}; make batch_size / "
                             f"processes a multiple of {micro}")
        with accelerator.main_process_first():
            self.rows, _, self.stats = load_sources(cfg.data, tokenizer, cfg, Path(output_dir) / "cache" / "sft")
        if len(self.rows) < cfg.batch_size:
            raise AlignError(f"stages.{stage_name}.ptx.data: {len(self.rows)} usable conversations, fewer than "
                             f"ptx.batch_size {cfg.batch_size}; add data or lower batch_size")
        self.cfg, self.seed, self.acc, self.pad_id = cfg, seed, accelerator, tokenizer.pad_token_id
        self.plan = _Plan(per_device_batch_size=micro, gradient_accumulation_steps=per_rank // micro)
        self.targets = batching.target_counts(self.rows, packed=False)
        self.steps_per_epoch = len(self.rows) // cfg.batch_size
        self._order: tuple[int, np.ndarray] | None = None

    @classmethod
    def for_stage(cls, stage, seed: int, output_dir: str, tokenizer, accelerator, micro: int) -> "PtxTerm | None":
        if stage.ptx is None:
            return None
        return cls(stage.ptx, stage.name, seed, output_dir, tokenizer, accelerator, micro)

    def step_rows(self, step: int) -> np.ndarray:
        """Global batch of `step` ([batch_size] row indices, laid out [accumulation, rank, micro])."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = epoch, batching.epoch_order(len(self.rows), self.cfg.batch_size, self.seed, epoch)
        return self._order[1][position]

    def backward(self, model, step: int) -> tuple[dict[str, float], int]:
        """Add γ × this step's SFT-loss gradient (the step's last backward: it all-reduces).
        Returns the metrics and the non-padding tokens trained over all ranks."""
        from align.sft import SFTData, forward_backward

        data = SFTData(train=self.rows, eval=None, train_targets=self.targets, eval_targets=None, lengths=None)
        loss_sum, n_targets, tokens = forward_backward(model, data, self.step_rows(step), self.plan, self.acc,
                                                       self.pad_id, scale=self.cfg.coef)
        return ({"ptx/loss": loss_sum / max(n_targets, 1), "ptx/target_tokens": float(n_targets)},
                tokens * self.acc.num_processes)
