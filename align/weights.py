"""The policy's weights as a rollout engine or a checkpoint reader expects them.

transformers 5 fuses MoE experts at load time (`mlp.experts.gate_up_proj` [E, 2I, H]), so a live
model's `state_dict()` lacks the checkpoint names (`mlp.experts.{e}.gate_proj.weight`) that vLLM's
`load_weights` maps. `checkpoint_weights` applies transformers' own reverse conversion (what
`save_pretrained` writes); for dense models it is the identity. A LoRA policy is merged first.
"""

from __future__ import annotations

import torch


def checkpoint_weights(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The model's weights under checkpoint names and shapes (experts unfused), detached."""
    from transformers.core_model_loading import revert_weight_conversion

    state = revert_weight_conversion(model, model.state_dict())
    return [(name, tensor.detach()) for name, tensor in state.items()]


def policy_weights(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Full weights for the rollout engine under checkpoint names and shapes; a LoRA model's
    adapter is merged in first (and unmerged after, so training continues on the adapter)."""
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
