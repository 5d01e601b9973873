"""What travels between processes: weights as safetensors bytes, samples and sampling as JSON.

Weights are never JSON lists: a safetensors payload is the tensors' raw bytes plus a header, and
`safetensors.torch.load` rebuilds them without pickle (no code runs on load).

MoE routes (`Sample.routes`, [completion_len, MoE layers, top_k] expert ids, for routing replay)
travel inside the sample's JSON as `{"shape": [T, L, k], "int16": base64}`: the ids as
little-endian int16 bytes, row-major. A sample holds T × L × k ids (512 × 26 × 6 = 80k at
DeepSeek-V2-Lite's shape); as a JSON list of lists they were 1.75× larger and 30× slower to
decode (measured here, 160 experts). int16 holds any expert count in use and the -1 sentinel. Decoding gives back the int64 tensor the colocated
HF engine produces, so `align.moe.routes_to_batch` consumes either unchanged.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from align.errors import AlignError
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


def routes_to_json(routes: torch.Tensor) -> dict[str, Any]:
    """Expert ids [T, L, k] -> {"shape", "int16"}; refuses ids int16 cannot hold rather than wrap them."""
    small = routes.to(torch.int16)
    if not torch.equal(small.long(), routes.long()):
        raise AlignError("routes: expert ids outside int16; the wire format (rollout/wire.py) needs widening")
    data = small.cpu().numpy().astype("<i2").tobytes()
    return {"shape": list(routes.shape), "int16": base64.b64encode(data).decode("ascii")}


def routes_from_json(data: dict[str, Any]) -> torch.Tensor:
    ids = np.frombuffer(base64.b64decode(data["int16"]), dtype="<i2").reshape(data["shape"])
    return torch.from_numpy(ids.astype(np.int64))


def sample_to_json(sample: Sample) -> dict[str, Any]:
    """`routes` is present only when the sample has them (the request asked for them)."""
    out = {"completion_ids": sample.completion_ids, "logprobs": sample.logprobs,
           "finish_reason": sample.finish_reason, "weight_version": sample.weight_version}
    if sample.routes is not None:
        out["routes"] = routes_to_json(sample.routes)
    return out


def sample_from_json(data: dict[str, Any]) -> Sample:
    routes = data.get("routes")
    fields = {k: v for k, v in data.items() if k != "routes"}
    return Sample(**fields, routes=None if routes is None else routes_from_json(routes))
