"""Weight sync of a colocated `vllm.LLM` through vLLM's own weight-transfer API.

vLLM 0.32's offline `LLM` has the RL calls its server mounts as routes
(`init_weight_transfer_engine`, `start_weight_update`, `update_weights`, `finish_weight_update`;
`vllm/entrypoints/rl/offline.py`), and its trainer-side engines
(`WeightTransferTrainerFactory.trainer_init`) drive any object with those four methods. The
offline methods take request envelopes (`{"init_info": ...}`, `{"update_info": ...}`) where the
trainer engines pass the bare info, so `OfflineClient` adds them (and pickles CUDA IPC handles as
vLLM's HTTP client does); everything else is vLLM's.

Backends: `ipc` (vLLM's CUDA IPC engine: the trainer's GPU tensors are shared by handle, the
colocated case on GPU) and `gloo` (align's plug-in, `rollout.transfer_gloo`, the one that works on
CPU, where the other backends of vLLM do not). The `LLM` must have been built with
`weight_transfer_config={"backend": ...}` (`engine_kwargs`).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from align.errors import AlignError

BACKENDS = ("ipc", "gloo")


def engine_kwargs(backend: str) -> dict[str, Any]:
    """What `vllm.LLM(...)` needs for `backend`; registers align's gloo engine first.

    ipc: CUDA does not open an IPC handle in the process that exported it, and torch 2.13's
    `rebuild_cuda_tensor` looks its cache up under another key than `reduce_tensor` stores (read
    from the code, not run), so vLLM's engine runs in its own process, the case vLLM's ipc engine
    is built for (its colocate example puts the workers in other processes). The handles then
    cross vLLM's engine socket pickled, as vLLM's own HTTP client sends them, which needs
    VLLM_ALLOW_INSECURE_SERIALIZATION=1 (between this process and the engine process it starts)."""
    if backend not in BACKENDS:
        raise AlignError(f"weight_transfer: unknown backend {backend!r}; use one of {', '.join(BACKENDS)} "
                         "(or None for the in-place reload)")
    if backend == "ipc" and not torch.cuda.is_available():
        raise AlignError("weight_transfer 'ipc' shares CUDA memory and needs a GPU; on CPU use 'gloo' "
                         "or the in-place reload (weight_transfer=None)")
    if backend == "ipc":
        os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_ALLOW_INSECURE_SERIALIZATION="1")
    if backend == "gloo":
        from rollout.transfer_gloo import register

        register()  # with vLLM's factories (idempotent)
    return {"weight_transfer_config": {"backend": backend}}


class OfflineClient:
    """vLLM's `VLLMWeightSyncClient` protocol over an offline `vllm.LLM`."""

    def __init__(self, llm) -> None:
        self.llm = llm

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, update_info) -> None:
        from vllm.distributed.weight_transfer.clients import _json_safe_update_payload

        self.llm.update_weights({"update_info": _json_safe_update_payload(update_info)})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.llm.finish_weight_update(weight_version)


class OfflineTransfer:
    """The trainer side of one colocated engine's transfer: built once, `send` every sync."""

    def __init__(self, llm, backend: str) -> None:
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        from rollout.transfer_gloo import GlooTrainerInitInfo, RoundSource

        if backend == "ipc":
            from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

            info = IPCTrainerInitInfo(rank=0)  # unpacked: one handle per tensor, no staging copy
        else:
            info = GlooTrainerInitInfo(master_address="127.0.0.1", rank=0)
        self.backend = backend
        self.source = RoundSource()
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "ipc" else None
        self.engine = WeightTransferTrainerFactory.trainer_init(info, client=OfflineClient(llm), source=self.source)

    def send(self, pairs: list[tuple[str, torch.Tensor]]) -> None:
        """start → update → finish with `pairs` (checkpoint names). ipc shares device memory, so
        tensors elsewhere (an offloaded or CPU trainer) are copied to this GPU first."""
        if self.device is not None:
            pairs = [(n, t.to(self.device)) for n, t in pairs]
        self.source.set(pairs)
        try:
            self.engine.send_weights()
        finally:
            self.source.set([])  # hold no reference to the trainer's tensors between syncs
