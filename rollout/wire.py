"""What travels between processes: weights as safetensors bytes, samples and sampling as JSON.

Weights are never JSON lists: a safetensors payload is the tensors' raw bytes plus a header, and
`safetensors.torch.load` rebuilds them without pickle (no code runs on load).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

import torch

from rollout.base import Sample, SamplingParams


def pack_weights(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> bytes:
    """(name, tensor) pairs -> safetensors bytes. Tied weights (e.g. lm_head = embed_tokens) share
    storage, which safetensors refuses, so a tensor whose storage was already packed is copied."""
    from safetensors.torch import save

    seen: set[int] = set()
    tensors = {}
    for name, tensor in named_tensors:
        tensor = tensor.detach().cpu().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        tensors[name] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return save(tensors)


def unpack_weights(payload: bytes) -> list[tuple[str, torch.Tensor]]:
    from safetensors.torch import load

    return list(load(payload).items())


def sampling_from_json(data: dict[str, Any]) -> SamplingParams:
    data = dict(data)
    data["stop"] = tuple(data.get("stop", ()))
    return SamplingParams(**data)


def sampling_to_json(sampling: SamplingParams) -> dict[str, Any]:
    return asdict(sampling)


def sample_to_json(sample: Sample) -> dict[str, Any]:
    """Routes (MoE replay) are not sent over HTTP yet; they stay None on the client side."""
    return {"completion_ids": sample.completion_ids, "logprobs": sample.logprobs,
            "finish_reason": sample.finish_reason, "weight_version": sample.weight_version}


def sample_from_json(data: dict[str, Any]) -> Sample:
    return Sample(**data)
