"""Find a transformers MoE model's router ("gate") modules and hook them at one seam.

Every router we support returns `(router_logits [tokens, E], topk_weights [tokens, k],
topk_indices [tokens, k])` from its `forward(hidden_states [B, S, H])` (transformers 5.x:
DeepseekV2TopkRouter, Qwen2MoeTopKRouter, Qwen3MoeTopKRouter, MixtralTopKRouter). A forward hook
sees that triple and may return a replacement, so recording, replay and statistics all live in
hooks and never copy a model's MoE forward.

`GateHooks` also puts a pre-hook on the model itself, so each hook knows which top-level call a
gate call belongs to: a gradient-checkpointing recompute re-runs gates without a new model call,
and `first_in_call` lets recorders ignore those repeats.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch.nn.utils.parametrize import type_before_parametrizations

from align.errors import AlignError
from align.train_utils import base_of


def _softmax_scaled(gate, logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V2: softmax scores of the chosen experts × routed_scaling_factor."""
    return logits.float().softmax(-1).gather(-1, indices) * gate.routed_scaling_factor


def _softmax_renorm(gate, logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Qwen-MoE / Mixtral: softmax scores of the chosen experts, renormalised when the model does."""
    top = logits.float().softmax(-1).gather(-1, indices)
    if getattr(gate, "norm_topk_prob", True):  # Mixtral has no flag and always renormalises
        top = top / top.sum(-1, keepdim=True)
    return top.to(logits.dtype)


# router class name -> combine weights of given experts from live logits (what the router would
# have returned had it chosen `indices`)
ROUTER_WEIGHTS: dict[str, Callable[..., torch.Tensor]] = {
    "DeepseekV2TopkRouter": _softmax_scaled,
    "Qwen2MoeTopKRouter": _softmax_renorm,
    "Qwen3MoeTopKRouter": _softmax_renorm,
    "MixtralTopKRouter": _softmax_renorm,
}


def router_kind(module: torch.nn.Module) -> str:
    """A module's class name as written, also while peft's LoRA on the router weight (`all-linear`
    on a transformers 5 MoE) has it parametrized, which renames the class for that forward."""
    return type_before_parametrizations(module).__name__


def live_weights_of(gate: torch.nn.Module, logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The combine weights `gate` would have returned had it chosen `indices`."""
    return ROUTER_WEIGHTS[router_kind(gate)](gate, logits, indices)


def moe_gates(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, router) for every supported router in `model`, in forward order."""
    return [(n, m) for n, m in model.named_modules() if router_kind(m) in ROUTER_WEIGHTS]


def require_gates(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    gates = moe_gates(model)
    if not gates:
        raise AlignError(f"{type(model).__name__} has no MoE router this toolkit knows "
                         f"({', '.join(ROUTER_WEIGHTS)}); routing replay and MoE metrics need an MoE "
                         "model such as DeepseekV2ForCausalLM (set routing_replay: false otherwise)")
    return gates


def layer_label(name: str, position: int) -> int:
    """Decoder-layer index from a module name ('model.layers.3.mlp.gate' -> 3), else `position`."""
    found = re.search(r"layers\.(\d+)\.", name)
    return int(found.group(1)) if found else position


class GateHooks:
    """Context manager: `on_gate(position, gate, hidden_states, output)` runs after every router
    call (return a replacement output or None); `on_call(args, kwargs)` before every model call."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.gates = require_gates(model)
        self.labels = [layer_label(n, i) for i, (n, _) in enumerate(self.gates)]
        self.call = 0  # top-level model calls seen so far
        self._seen: list[int] = [0] * len(self.gates)  # last call each gate ran in
        self._handles: list = []

    @property
    def num_layers(self) -> int:
        return len(self.gates)

    def on_call(self, args: tuple, kwargs: dict) -> None:
        """Override: a top-level model call is starting."""

    def on_gate(self, position: int, gate, hidden: torch.Tensor, output: tuple):
        """Override: router `position` ran on `hidden` [B, S, H]."""
        return None

    def first_in_call(self, position: int) -> bool:
        """True on a gate's first run in the current model call (False on a checkpoint recompute)."""
        first = self._seen[position] != self.call
        self._seen[position] = self.call
        return first

    def __enter__(self):
        def pre(_module, args, kwargs):
            self.call += 1
            self.on_call(args, kwargs)

        # on the base: peft's generate calls it directly, never the wrapper's forward
        self._handles.append(base_of(self.model).register_forward_pre_hook(pre, with_kwargs=True))
        for position, (_, gate) in enumerate(self.gates):
            def hook(module, inputs, output, position=position):
                return self.on_gate(position, module, inputs[0], output)
            self._handles.append(gate.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
