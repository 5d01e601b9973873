"""Offload the trainer's state to CPU while the rollout engine generates, then reload it to train.

Why: DeepSeek-V2 colocates training and inference on the same GPUs. During generation the trainer's
parameters, gradients and optimizer state (AdamW: 16 bytes per fp32 parameter, 4x the weights) sit
idle in device memory the engine could use for KV cache; this module moves them out and back.

Mechanism (one function pair, `offload` / `reload`, on a small state holder):
- Each tensor on the training device is copied into a CPU buffer (pinned when training on CUDA, so
  the copies run at PCIe speed and `non_blocking`), then its device storage is released:
  `param.data` becomes a 0-element placeholder on the training device, `param.grad` becomes None,
  and each optimizer-state tensor in `optimizer.state[p]` becomes a 0-element placeholder.
- The Parameter objects are never replaced, so the optimizer's param references, hooks and tied
  weights stay valid; reload allocates fresh device storage and copies the buffers back (bitwise).
- Tensors not on the training device (e.g. AdamW's CPU `step` counter when training on CUDA) are
  left where they are. Calling `offload` twice, or `reload` when nothing is offloaded, does nothing.
- The same code runs when the training device is the CPU: storage really moves into separate
  buffers and the originals are freed, so tests exercise it without a GPU.
- Sharded models (FSDP2, `align.sharding`): parameters, gradients and optimizer state are DTensors;
  what moves is each rank's local shard (`DTensor._local_tensor`), and the DTensor objects stay.
  FSDP2 keeps a second, padded reference to a parameter's shard (`FSDPParam._sharded_param_data`,
  its all-gather input): offload drops it too, and reload lets FSDP2 rebuild it from the restored
  shard (`FSDPParam.reset_sharded_param`, the hook torch itself runs after `module.to()`). Offload
  between steps only, when every layer is resharded.
- Module buffers (rotary tables, ...) stay on the device: they are small and generation never sees
  the trainer's model anyway. While offloaded the model must not be used (a forward pass fails
  loudly on the 0-element placeholders rather than silently running on stale data).

Each transfer appends a `Transfer` to `Offloader.timeline`; `step_metrics()` flattens the transfers
since its last call into the keys the trainer logs to metrics.jsonl.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass

import torch

from align.errors import AlignError

# Where a tensor lives: (param, "data"), (param, "grad"), (optimizer.state[p], state key), or
# (dtensor, "_local_tensor") for the local shard of a sharded parameter, gradient or state tensor.
_Slot = tuple[object, str]
LOCAL = "_local_tensor"


def _is_dtensor(t: object) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _fsdp_params(model: torch.nn.Module) -> dict[int, object]:
    """FSDP2's record of each sharded parameter (by id), to keep its all-gather input in step."""
    from torch.distributed.fsdp import FSDPModule

    out = {}
    for m in model.modules():
        group = m._get_fsdp_state()._fsdp_param_group if isinstance(m, FSDPModule) else None
        for fp in group.fsdp_params if group is not None else []:
            out[id(fp.sharded_param)] = fp
    return out


@dataclass(frozen=True)
class Transfer:
    """One offload or reload: how long it took, how much it moved, device memory around it."""

    phase: str  # "offload" | "reload"
    seconds: float
    bytes_moved: int
    device_mem_before: int  # bytes: torch.cuda.memory_allocated on CUDA, else process RSS
    device_mem_after: int

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def device_memory(device: torch.device) -> int:
    """Bytes in use on `device`: the CUDA caching allocator's count, or this process's RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # no /proc (macOS): peak RSS in bytes is the best the stdlib offers
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _resolve(device: torch.device) -> torch.device:
    """`cuda` -> `cuda:<current>`, so it compares equal to the parameters' devices."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Offloader:
    """Moves a model's parameters, gradients and optimizer state to CPU and back.

    `model` may be accelerate/DDP-wrapped (its parameters are the inner module's); `optimizer` may be
    an `AcceleratedOptimizer` or None (e.g. to offload a frozen reference model). `device` is the
    training device; by default the device of the model's first parameter.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 device: torch.device | str | None = None):
        self.model = model
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # unwrap AcceleratedOptimizer
        self.device = _resolve(torch.device(device) if device is not None else next(model.parameters()).device)
        self.pin = self.device.type == "cuda"  # pinned host memory: async copies at full PCIe speed
        self.timeline: list[Transfer] = []
        self._buffers: list[tuple[_Slot, torch.Tensor]] = []  # filled while offloaded
        self._fsdp = _fsdp_params(model)
        self._reported = 0  # timeline entries already returned by step_metrics()

    @property
    def is_offloaded(self) -> bool:
        return bool(self._buffers)

    def _params(self) -> list[torch.nn.Parameter]:
        seen: dict[int, torch.nn.Parameter] = {id(p): p for p in self.model.parameters()}
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                seen.update({id(p): p for p in group["params"]})
        return list(seen.values())

    def _device_slots(self) -> Iterator[tuple[_Slot, torch.Tensor]]:
        """Every tensor that lives on the training device, with the slot it is read from."""
        state = self.optimizer.state if self.optimizer is not None else {}
        for p in self._params():
            yield from self._slot(p, p, "data")
            if p.grad is not None:
                yield from self._slot(p.grad, p, "grad")
            for k, v in state.get(p, {}).items():
                if torch.is_tensor(v):
                    yield from self._slot(v, state[p], k)

    def _slot(self, t: torch.Tensor, owner: object, key: str) -> Iterator[tuple[_Slot, torch.Tensor]]:
        """`t`'s device storage with its slot: the tensor itself, or a DTensor's local shard."""
        if _is_dtensor(t):
            owner, key, t = t, LOCAL, t._local_tensor
            fp = self._fsdp.get(id(owner))
            if fp is not None and fp.sharded_state.name != "SHARDED":
                raise RuntimeError(f"offload of {fp}: its layer is still gathered; offload between "
                                   "optimizer steps, not inside forward/backward")
        elif key == "data":
            t = t.data
        if t.device == self.device:
            yield (owner, key), t

    def offload(self) -> Transfer | None:
        """Copy everything on the training device to CPU and free the device copies."""
        if self.is_offloaded:
            return None
        before, start = device_memory(self.device), time.perf_counter()
        self._buffers = [(slot, _to_cpu(t, self.pin)) for slot, t in self._device_slots()]
        moved = sum(buf.nbytes for _, buf in self._buffers)
        _sync(self.device)  # buffers complete before the device copies go
        for (owner, key), buf in self._buffers:
            _release(owner, key, buf)
            if id(owner) in self._fsdp:  # FSDP2's padded copy of the shard holds the storage too
                self._fsdp[id(owner)]._sharded_param_data = torch.empty(0, dtype=buf.dtype, device=self.device)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the freed blocks back so the engine can claim them
        return self._record("offload", start, moved, before)

    def reload(self) -> Transfer | None:
        """Copy the CPU buffers back into fresh device storage and drop the buffers."""
        if not self.is_offloaded:
            return None
        before, start = device_memory(self.device), time.perf_counter()
        # params before grads: assigning `p.grad` checks it against the (restored) parameter
        for (owner, key), buf in sorted(self._buffers, key=lambda sb: sb[0][1] == "grad"):
            _restore(owner, key, _empty_as(buf, self.device, pin=False).copy_(buf, non_blocking=self.pin))
            if id(owner) in self._fsdp:
                self._fsdp[id(owner)].reset_sharded_param()
        moved = sum(buf.nbytes for _, buf in self._buffers)
        _sync(self.device)  # pinned buffers may only be dropped once their copies are done
        self._buffers.clear()
        return self._record("reload", start, moved, before)

    @contextmanager
    def offloaded(self) -> Iterator[None]:
        """`with offloader.offloaded(): engine.generate(...)`: reloads even if generation raises."""
        self.offload()
        try:
            yield
        finally:
            self.reload()

    def _record(self, phase: str, start: float, moved: int, before: int) -> Transfer:
        entry = Transfer(phase, time.perf_counter() - start, moved, before, device_memory(self.device))
        self.timeline.append(entry)
        return entry

    def step_metrics(self) -> dict[str, float]:
        """Flat metrics for the transfers since the last call (one step's), summed per phase."""
        new, self._reported = self.timeline[self._reported:], len(self.timeline)
        out: dict[str, float] = {}
        for e in new:
            out[f"{e.phase}/seconds"] = out.get(f"{e.phase}/seconds", 0.0) + e.seconds
            out[f"{e.phase}/bytes"] = out.get(f"{e.phase}/bytes", 0.0) + e.bytes_moved
            if e.phase == "offload":
                freed = e.device_mem_before - e.device_mem_after
                out["offload/device_mem_freed"] = out.get("offload/device_mem_freed", 0.0) + freed
        return out


def _empty_as(t: torch.Tensor, device: torch.device | str, pin: bool) -> torch.Tensor:
    """Uninitialised storage with `t`'s shape, strides and dtype, so layouts survive the round trip."""
    return torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device, pin_memory=pin)


def _to_cpu(t: torch.Tensor, pin: bool) -> torch.Tensor:
    return _empty_as(t, "cpu", pin).copy_(t, non_blocking=pin)


def _release(owner: object, key: str, buf: torch.Tensor) -> None:
    """Drop the device tensor in a slot, leaving a 0-element placeholder (or no grad)."""
    if key == LOCAL:
        setattr(owner, LOCAL, torch.empty(0, dtype=buf.dtype, device=getattr(owner, LOCAL).device))
    elif isinstance(owner, torch.nn.Parameter):
        if key == "grad":
            owner.grad = None
        else:
            owner.data = torch.empty(0, dtype=buf.dtype, device=owner.device)
    else:
        owner[key] = torch.empty(0, dtype=buf.dtype, device=owner[key].device)


def _restore(owner: object, key: str, t: torch.Tensor) -> None:
    if key == LOCAL:
        setattr(owner, LOCAL, t)
    elif isinstance(owner, torch.nn.Parameter):
        setattr(owner, key, t)
    else:
        owner[key] = t


class OffloadGroup:
    """The offloaders that move together while the rollout engine generates: the policy with its
    gradients and optimizer state, and the frozen reference model when there is one."""

    def __init__(self, movers: list[Offloader]):
        self.movers = movers

    @classmethod
    def for_rollout(cls, stage, policy: torch.nn.Module, optimizer, reference: torch.nn.Module | None,
                    device, shares_policy: bool) -> "OffloadGroup":
        """From a GRPO stage's `offload` key; empty (a no-op) when it is off. A colocated HF engine
        generates with the policy's own tensors, so they cannot leave the device."""
        if not stage.offload:
            return cls([])
        if shares_policy:
            raise AlignError(f"stages.{stage.name}.offload: the colocated HF engine generates with the "
                             "training weights, so they cannot be offloaded; use rollout.engine: vllm or "
                             "mode: server, or set offload: false")
        movers = [Offloader(policy, optimizer, device=device)]
        if reference is not None:
            movers.append(Offloader(reference, None, device=device))
        return cls(movers)

    @contextmanager
    def offloaded(self) -> Iterator[None]:
        with ExitStack() as stack:
            for mover in self.movers:
                stack.enter_context(mover.offloaded())
            yield

    def step_metrics(self) -> dict[str, float]:
        """This step's transfers of every member, summed per key."""
        out: dict[str, float] = {}
        for mover in self.movers:
            for key, value in mover.step_metrics().items():
                out[key] = out.get(key, 0.0) + value
        return out
