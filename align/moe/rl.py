"""The MoE policy of a GRPO stage: the router's balance loss, frozen routers, and when to replay routes.

Why each default (docs/moe.md, "MoE in RL"):
- `moe_aux_loss_coef: 0`: the balance loss keeps pre-training's experts evenly loaded; in RL it pulls
  the router away from what the reward wants and moves routing between rollout and update, so
  log-probs diverge (verl and NeMo-RL switch it off for RL). transformers' DeepseekV2ForCausalLM
  computes no such loss, and Qwen-MoE / Mixtral add theirs only with `labels`, which GRPO never
  passes: the only balance loss in a GRPO step is this module's, when the coefficient is > 0.
- `moe_freeze_router: false`: freezing keeps routing identical across updates (no drift at all),
  at the cost of never adapting it.
- `routing_replay: auto`: replay starts off and switches on for the rest of the stage the first
  step the measured rollout–trainer expert mismatch passes `routing_replay_threshold`.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from align.errors import AlignError
from align.moe.gates import GateHooks, moe_gates
from align.moe.replay import RouteReplay, ensure_replay_supported

log = logging.getLogger(__name__)


def balance_loss(logits: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek-V2's expert-level balance loss Σ_i f_i·P_i, with f_i = E/(k·T)·(tokens choosing
    expert i) and P_i = mean_t softmax(logits_t)_i over the T counted tokens: 1 when routing is
    uniform, up to E when one expert takes everything. logits [N, E], indices [N, k], mask [N].
    Gradient flows through P (the choices are discrete)."""
    num_experts, k = logits.shape[-1], indices.shape[-1]
    weight = torch.ones(logits.shape[0], device=logits.device) if mask is None else mask.float()
    tokens = weight.sum().clamp(min=1)
    counts = torch.zeros(num_experts, device=logits.device)
    counts.index_add_(0, indices.reshape(-1).long(), weight.repeat_interleave(k))
    share = counts * num_experts / (k * tokens)
    probs = (logits.float().softmax(-1) * weight[:, None]).sum(0) / tokens
    return (share.detach() * probs).sum()


class RouterLoss(GateHooks):
    """`with RouterLoss(model) as aux: model(...)`, then `aux.loss()`: the mean over MoE layers of
    `balance_loss` on the real tokens (the call's attention mask) of every call in the block, with
    gradient into the routers. Checkpoint recomputes are ignored."""

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self._mask: torch.Tensor | None = None
        self._losses: list[torch.Tensor] = []

    def on_call(self, args: tuple, kwargs: dict) -> None:
        self._mask = kwargs.get("attention_mask")

    def on_gate(self, position: int, gate, hidden: torch.Tensor, output: tuple):
        if self.first_in_call(position):
            mask = None if self._mask is None else self._mask[:, -hidden.shape[1]:].reshape(-1).to(hidden.device)
            self._losses.append(balance_loss(output[0], output[2], mask))
        return None

    def loss(self) -> torch.Tensor:
        if not self._losses:
            raise AlignError("RouterLoss: no router ran inside the `with` block")
        return torch.stack(self._losses).mean()


def freeze_routers(model: torch.nn.Module) -> int:
    """Stop every MoE router's weights from training (build the optimizer after this: it skips
    parameters without requires_grad). Returns how many tensors were frozen. Under peft the
    router is `<name>.base_layer` and its LoRA factors sit on the wrapper `<name>`: both freeze."""
    owners = [model.get_submodule(name.removesuffix(".base_layer")) for name, _ in moe_gates(model)]
    params = [p for owner in owners for p in owner.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    return len(params)


@dataclass
class MoEPass:
    """What one micro-batch's forward + backward adds for an MoE policy: the scaled balance loss
    and the metrics (`moe/route_mismatch` when routes were recorded, `moe/aux_loss` when on)."""

    coef: float
    replay: RouteReplay | None
    aux: RouterLoss | None

    def loss(self, num_micro_batches: int) -> torch.Tensor | float:
        """coef × balance loss, this micro-batch's share of the step (as `policy_loss` normalises)."""
        return 0.0 if self.aux is None else self.coef * self.aux.loss() / num_micro_batches

    def metrics(self) -> dict[str, torch.Tensor]:
        out = {} if self.replay is None else {"moe/route_mismatch": torch.tensor(self.replay.mismatch())}
        return out if self.aux is None else {**out, "moe/aux_loss": self.aux.loss().detach()}


@dataclass
class MoEStage:
    """One GRPO stage's MoE settings and the replay switch's state (saved with the trainer's, so a
    resumed `auto` run replays exactly when the uninterrupted one would)."""

    aux_coef: float
    replay_mode: bool | str  # False | True | "auto"
    threshold: float
    is_moe: bool
    replay_on: bool = field(init=False)

    def __post_init__(self) -> None:
        self.replay_on = self.replay_mode is True

    @classmethod
    def for_stage(cls, stage, model: torch.nn.Module) -> "MoEStage":
        """Validate the stage's MoE keys against `model` and its engine, and freeze the routers
        when asked (before the optimizer is built)."""
        is_moe = bool(moe_gates(model))
        where = f"stages.{stage.name}"
        if not is_moe:
            for key, on in (("routing_replay", stage.routing_replay is not False),
                            ("moe_aux_loss_coef", stage.moe_aux_loss_coef > 0),
                            ("moe_freeze_router", stage.moe_freeze_router)):
                if on:
                    raise AlignError(f"{where}.{key}: the model has no MoE routers; remove {key} (its default "
                                     "is off) or train an MoE model")
        if stage.routing_replay is not False:
            ensure_replay_supported(stage.rollout.engine, stage.rollout.mode)
        if stage.moe_freeze_router:
            freeze_routers(model)
        return cls(stage.moe_aux_loss_coef, stage.routing_replay, stage.routing_replay_threshold, is_moe)

    def record_routes(self, rollout) -> bool:
        """Whether the engine records each sample's experts: always for replay (true or auto), and
        for any MoE on the colocated HF engine, where it is free, so the mismatch is logged anyway."""
        return self.replay_mode is not False or (self.is_moe and rollout.engine == "hf" and rollout.mode == "colocate")

    def replayed(self, routes: torch.Tensor | None) -> torch.Tensor | None:
        """The routes the π_old / π_ref passes replay: the recorded ones while replay is on."""
        return routes if self.replay_on else None

    @contextmanager
    def micro_pass(self, model: torch.nn.Module, routes: torch.Tensor | None):
        """Around one training micro-batch's forward + backward: replay (or only measure) the
        recorded routes, and capture the routers' balance loss when it counts."""
        with ExitStack() as stack:
            replay = None if routes is None else stack.enter_context(RouteReplay(model, routes, self.replay_on))
            aux = stack.enter_context(RouterLoss(model)) if self.aux_coef > 0 else None
            yield MoEPass(self.aux_coef, replay, aux)

    def end_step(self, metrics: dict[str, float], accelerator) -> dict[str, float]:
        """`moe/replay_on` for the step just trained; with `auto`, switch replay on for the steps
        after the first whose mismatch (mean over ranks, so all agree) passes the threshold."""
        if not self.is_moe:
            return {}
        out = {"moe/replay_on": float(self.replay_on)}
        if self.replay_mode == "auto" and not self.replay_on and "moe/route_mismatch" in metrics:
            local = torch.tensor(metrics["moe/route_mismatch"], device=accelerator.device)
            mismatch = float(accelerator.reduce(local, "mean"))
            if mismatch > self.threshold:
                self.replay_on = True
                log.warning("routing_replay: auto: expert mismatch %.4f > routing_replay_threshold %.4f; "
                            "replaying rollout routes from the next step on", mismatch, self.threshold)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"replay_on": self.replay_on}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.replay_on = state["replay_on"]
