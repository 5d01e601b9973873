"""The policy's weights as a rollout engine or a checkpoint reader expects them.

transformers 5 fuses MoE experts at load time (`mlp.experts.gate_up_proj` [E, 2I, H]), so a live
model's `state_dict()` lacks the checkpoint names (`mlp.experts.{e}.gate_proj.weight`) that vLLM's
`load_weights` maps. `checkpoint_weights` applies transformers' own reverse conversion (what
`save_pretrained` writes); for dense models it is the identity. A LoRA policy is merged first.
`live_weights` goes the other way, for an engine that holds a transformers model (the HF engine,
the sync check's weightless copy).
"""

from __future__ import annotations

from collections.abc import Iterable

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


def live_weights(model: torch.nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The inverse of `checkpoint_weights`: checkpoint-format weights (MoE experts unfused, what
    `save_pretrained` writes, vLLM loads and the trainer pushes) -> the live model's names and shapes (transformers 5 fuses experts into
    `mlp.experts.gate_up_proj` at load), by transformers' own load-time conversion. Names already
    in the model's format pass through unchanged (same tensors)."""
    from copy import deepcopy

    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (PrefixChange, WeightConverter, WeightRenaming,
                                                 dot_natural_key, rename_source_key)

    transforms = getattr(model, "_weight_conversions", None)
    if transforms is None:  # built from a config, not from_pretrained: as revert_weight_conversion does
        transforms = [t for t in get_model_conversion_mapping(model, add_legacy=False)
                      if not isinstance(t, PrefixChange)]
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    out: dict[str, torch.Tensor] = {}
    merges: dict[str, WeightConverter] = {}  # fused target name -> converter collecting its sources
    for name, tensor in sorted(named_tensors, key=lambda kv: dot_natural_key(kv[0])):
        target, pattern = rename_source_key(name, renamings, converters)
        if pattern is None:
            out[target] = tensor
        else:
            merges.setdefault(target, deepcopy(by_pattern[pattern])).add_tensor(target, name, pattern, tensor)
    for target, converter in merges.items():
        for name, value in converter.convert(target, model=model, config=model.config).items():
            out[name] = value[0] if isinstance(value, list) else value
    return out
