"""Sharded training with FSDP2 (`torch.distributed.fsdp.fully_shard`): one code path on CPU (gloo)
and GPU (NCCL), chosen by the recipe's `distributed.strategy`.

Why our own `fully_shard` call rather than accelerate's FSDP plugin: `Accelerator(cpu=True)` drops
the plugin and trains plain DDP (measured, docs/scaling.md), so the CPU tests could not exercise the
code a GPU user runs. Here every rank calls `shard_model` itself; the accelerator only supplies the
process group and device, and the sharded model is never passed to `accelerator.prepare`.

What lives here:
- `shard_model` / `shard_reference` / `reference_for_stage`: `fully_shard` on every decoder layer
  (found from the model's own `_no_split_modules`, so dense, MoE and LoRA-wrapped models are treated
  alike), then the root; the frozen reference of GRPO and DPO is sharded like the policy;
- `gathered_weights`: the full weights under Hugging Face checkpoint names (LoRA merged, MoE experts
  unfused), gathered shard by shard onto rank 0 only (or, for an engine on every rank, onto every
  rank) and yielded in groups of bounded size: what the rollout engine and `final/` receive;
- `clip_grad_norm` and `gradient_sync`: the two step pieces whose DDP versions do not apply.
Checkpoints of sharded models are in `align/checkpoint.py`, offload of local shards in `align/offload.py`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from align.errors import AlignError
from align.train_utils import base_of

DEFAULT_GROUP_BYTES = 1 << 30  # 1 GiB of full tensors per yielded group


# ------------------------------------------------------------------------------ sharding


def is_sharded(model: nn.Module) -> bool:
    """True when `model` (or a submodule) was passed to `fully_shard`."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def resolve_strategy(distributed, accelerator=None) -> str:
    """The recipe's `distributed.strategy`, or "fsdp2" when the run was launched with accelerate's
    FSDP2 config (recipes/accelerate/fsdp2.yaml): align then shards the model itself."""
    from accelerate.utils import DistributedType

    if accelerator is not None and accelerator.distributed_type == DistributedType.FSDP:
        if accelerator.state.fsdp_plugin.fsdp_version != 2:
            raise AlignError("accelerate config: fsdp_version 1 is not supported; use fsdp_version: 2 "
                             "(recipes/accelerate/fsdp2.yaml) or distributed.strategy: fsdp2")
        return "fsdp2"
    return distributed.strategy


def shard_for_stage(model: nn.Module, distributed, stage, accelerator) -> nn.Module:
    """What a stage calls instead of `accelerator.prepare(model)` under fsdp2: shard on the
    accelerator's device, gathering layers in bfloat16 when the stage trains in bf16."""
    from align.train_utils import resolve_mixed_precision

    dtype = torch.bfloat16 if resolve_mixed_precision(stage.bf16) == "bf16" else None
    return shard_model(model, accelerator.device, reshard_after_forward=distributed.reshard_after_forward,
                       param_dtype=dtype)


def reference_for_stage(recipe, stage, init_model, accelerator) -> nn.Module:
    """The frozen reference (the stage's starting model, `reference: frozen_copy`) placed like the
    policy: sharded the same way under fsdp2 (1/world per rank, every forward a collective), else
    a whole copy on this rank's device. Never passed to `accelerator.prepare`."""
    from align.train_utils import load_frozen_copy, resolve_mixed_precision

    if resolve_strategy(recipe.distributed, accelerator) != "fsdp2":
        return load_frozen_copy(recipe, init_model, accelerator.device)
    dtype = torch.bfloat16 if resolve_mixed_precision(stage.bf16) == "bf16" else None
    return shard_reference(load_frozen_copy(recipe, init_model, "cpu"), accelerator.device, param_dtype=dtype)


def device_mesh(device: torch.device | str):
    """The 1-D mesh over all ranks of the default process group, on `device`'s type (cpu: gloo)."""
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise AlignError("distributed.strategy: fsdp2 needs a process group; launch with `torchrun "
                         "--nproc_per_node N -m align train RECIPE` or `accelerate launch --multi_gpu "
                         "--num_processes N -m align train RECIPE`")
    return init_device_mesh(torch.device(device).type, (dist.get_world_size(),))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: modules whose class is in the model's
    `_no_split_modules` (transformers' own list, e.g. Qwen2DecoderLayer, DeepseekV2DecoderLayer,
    the same one accelerate's TRANSFORMER_BASED_WRAP reads). A peft model is searched through."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise AlignError(f"distributed.strategy: fsdp2: {type(model).__name__} declares no "
                         "`_no_split_modules`, so align cannot tell its decoder layers; use strategy: ddp")
    return layers


def shard_model(model: nn.Module, device: torch.device | str, *, reshard_after_forward: bool = True,
                param_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard `model` in place across all ranks: each decoder layer is its own FSDP unit, the rest
    (embeddings, final norm, head; tied embeddings stay one parameter) the root's. Parameters stay
    in their dtype; `param_dtype` (e.g. bfloat16) is the dtype layers are gathered and computed in,
    gradients are reduced in float32. Call before building the optimizer. A model still on the
    CPU is moved to `device` unit by unit as it is sharded (fully_shard does it), so a GPU never
    holds more than one whole layer."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = device_mesh(device)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    return model


def shard_reference(ref: nn.Module, device: torch.device | str, *, param_dtype: torch.dtype | None = None) -> nn.Module:
    """The frozen reference sharded like the policy: each rank holds 1/world of it, and every unit
    (root included) frees its gathered weights right after its forward."""
    ref.requires_grad_(False)
    return shard_model(ref.eval(), device, reshard_after_forward=True, param_dtype=param_dtype)


@contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """FSDP2's `no_sync`: skip the gradient reduce-scatter on all but the last micro-batch."""
    model.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm(model: nn.Module, max_grad_norm: float | None) -> float:
    """Clip to `max_grad_norm` (None: only measure) and return the pre-clip global norm over all
    shards (every rank gets the same number; a collective)."""
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm is not None else math.inf)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


# --------------------------------------------------------------------------- gathering


def gather_full(value: torch.Tensor, every_rank: bool = False) -> torch.Tensor | None:
    """The full tensor of a DTensor on rank 0 (None elsewhere), gathered from the dim-0 shards with
    `dist.gather`: no rank other than 0 ever holds more than its own shard. Plain tensors
    (replicated) are returned as they are on rank 0. `every_rank`: on every rank instead
    (`all_gather`), for engines that each rank holds (colocated vLLM on several ranks)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(value, DTensor):
        return value.detach() if every_rank or not dist.is_initialized() or dist.get_rank() == 0 else None
    placements, mesh = value.placements, value.device_mesh
    if placements == (Replicate(),):
        return value.to_local().detach() if every_rank or mesh.get_local_rank() == 0 else None
    if mesh.ndim != 1 or placements != (Shard(0),):
        raise AlignError(f"gathering a DTensor with placements {placements} on a {mesh.ndim}-D mesh is not "
                         "supported; align shards with FSDP2 on a 1-D mesh (Shard(0))")
    group, world = mesh.get_group(), mesh.size()
    rows = value.shape[0]
    chunk = -(-rows // world)  # FSDP2 shards like torch.chunk: ceil-sized pieces, the last ones short
    local = value.to_local().detach()
    padded = local.new_zeros((chunk, *value.shape[1:]))
    padded[:local.shape[0]].copy_(local)
    is_dst = every_rank or mesh.get_local_rank() == 0
    pieces = [torch.empty_like(padded) for _ in range(world)] if is_dst else None
    if every_rank:
        dist.all_gather(pieces, padded, group=group)
    else:
        dist.gather(padded, pieces, group=group, group_dst=0)
    return torch.cat(pieces)[:rows] if is_dst else None


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """peft LoRA layers (Linear layers and `ParamWrapper`s of MoE expert tensors) by module name."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            if getattr(m, "lora_variant", None) or any(getattr(m, "lora_bias", {}).values()):
                raise AlignError(f"{name}: DoRA / LoRA bias adapters cannot be merged for weight sync; "
                                 "use a plain LoRA (lora: {r: ..., alpha: ...})")
            out[name] = m
    return out


def _owner(key: str, lora: dict[str, nn.Module]) -> str | None:
    """The outermost LoRA layer whose tensors include `key` (its base weight or adapters), or None."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        if prefix in lora:
            return prefix
    return None


def _units(keys: list[str], lora: dict[str, nn.Module]) -> Iterator[list[str]]:
    """State-dict keys in order, bundled so that everything under one LoRA layer (base tensors and
    adapter matrices, nested wrappers included) arrives together; other keys are units of one."""
    bundle: list[str] = []
    owner = None
    for key in keys:
        current = _owner(key, lora)
        if bundle and (current is None or current != owner):
            yield bundle
            bundle = []
        bundle.append(key)
        owner = current
    if bundle:
        yield bundle


@contextmanager
def _full_adapter(layer: nn.Module, prefix: str, adapter: str, full: dict[str, torch.Tensor]) -> Iterator[None]:
    """Give `layer`'s adapter matrices their full (gathered) tensors for the length of a
    `get_delta_weight` call, so peft's own maths computes the delta."""
    mods = [(layer.lora_A[adapter], f"{prefix}.lora_A.{adapter}.weight"),
            (layer.lora_B[adapter], f"{prefix}.lora_B.{adapter}.weight")]
    saved = [m._parameters["weight"] for m, _ in mods]
    try:
        for m, key in mods:
            m._parameters["weight"] = full[key]
        yield
    finally:
        for (m, _), param in zip(mods, saved):
            m._parameters["weight"] = param


def _unit_weights(keys: list[str], full: dict[str, torch.Tensor], lora: dict[str, nn.Module],
                  key_of: dict[int, str]) -> dict[str, torch.Tensor]:
    """One unit's full tensors under the base model's names, LoRA adapters merged in as peft's
    `merge_adapter` does (`weight + get_delta_weight(adapter)`: bitwise the same result)."""
    merged = dict(full)
    owner = _owner(keys[0], lora)
    for prefix, layer in lora.items():
        if owner is None or not (prefix == owner or prefix.startswith(owner + ".")):
            continue
        target = layer.get_param() if hasattr(layer, "parameter_name") else layer.get_base_layer().weight
        name = key_of[id(target)]
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                with _full_adapter(layer, prefix, adapter, full):
                    merged[name] = merged[name] + layer.get_delta_weight(adapter)
    return {hf_name(k): v for k, v in merged.items()
            # adapters are merged; `original_module` is superseded by the trained modules_to_save copy
            if ".lora_A." not in k and ".lora_B." not in k and ".original_module." not in k}


def hf_name(key: str) -> str:
    """A peft state-dict key as the merged model names it (`base_model.model.` and `.base_layer`
    dropped, a `modules_to_save` copy under the module's own name); other keys are unchanged."""
    key = key.replace("base_model.model.", "", 1).replace(".base_layer", "")
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)


def gathered_weights(model: nn.Module, group_bytes: int = DEFAULT_GROUP_BYTES, every_rank: bool = False,
                     ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The model's full weights as Hugging Face checkpoints name and shape them (what
    `save_pretrained` writes and vLLM's `load_weights` reads: LoRA merged, MoE experts unfused),
    in groups of about `group_bytes` each (a group closes once it reaches `group_bytes`).

    A collective: every rank must iterate it to the end. Rank 0 receives the tensors (on the
    training device); the other ranks send their shards and get the same number of groups, empty.
    With `every_rank`, every rank receives them (one group at a time), for an engine on each rank.
    Works on unsharded models too (then it is `model.state_dict()` renamed, for a single process).
    Parameters shared under two names (tied embeddings) are gathered once and yielded under both."""
    from transformers.core_model_loading import revert_weight_conversion

    base = base_of(model)
    state = model.state_dict(keep_vars=True)  # keep_vars: tied names map to one Parameter object
    lora = _lora_layers(model)
    is_dst = every_rank or not dist.is_initialized() or dist.get_rank() == 0
    key_of = {id(v): k for k, v in reversed(state.items())}  # first name of each tensor
    uses = Counter(id(v) for v in state.values())
    gathered: dict[int, torch.Tensor | None] = {}  # id of a tensor -> its full tensor, while still needed
    group: list[tuple[str, torch.Tensor]] = []
    size = 0
    for keys in _units(list(state), lora):
        full = {}
        for key in keys:
            ident = id(state[key])
            if ident not in gathered:
                gathered[ident] = gather_full(state[key], every_rank)
            full[key] = gathered[ident]
            uses[ident] -= 1
            if not uses[ident]:
                del gathered[ident]
        size += sum(state[k].numel() * state[k].element_size() for k in keys)  # global sizes: same on every rank
        if is_dst:
            group.extend(revert_weight_conversion(base, _unit_weights(keys, full, lora, key_of)).items())
        if size >= group_bytes:
            yield group
            group, size = [], 0
    if size:
        yield group  # the last, shorter group
