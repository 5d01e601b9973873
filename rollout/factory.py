"""Build the rollout engine a `RolloutConfig` names. Engines are imported here, lazily, so vLLM
stays an optional extra and the trainer never branches on the engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rollout.base import RolloutEngine
from rollout.config import RolloutConfig


def build_engine(cfg: RolloutConfig, model: str | Path | Any, tokenizer=None, *,
                 seed: int = 0, record_routes: bool = False) -> RolloutEngine:
    """`model` is a model directory, or (engine hf, colocated) the trainer's in-memory policy, which
    the engine then shares so weight sync is free. vLLM always loads a directory.
    `record_routes`: MoE expert choices travel with each sample (HF engine, colocated or behind
    `align rollout serve --engine hf` workers; routing replay). mode: server drives align's HF
    workers (rollout.client) or, with engine: vllm, stock `vllm serve` processes
    (rollout.vllm_server); both need the model directory (the sync check's probe)."""
    if cfg.mode == "server" and cfg.engine == "vllm":
        from rollout.vllm_server import VLLMServers

        if not isinstance(model, (str, Path)):
            raise ValueError("build_engine: vLLM servers need the model directory (for the sync check's probe)")
        return VLLMServers(cfg.server_urls, model, timeout_s=cfg.timeout_s, retries=cfg.retries,
                           transfer_address=cfg.transfer_address, record_routes=record_routes)
    if cfg.mode == "server":
        from rollout.client import RemoteEngines

        if not isinstance(model, (str, Path)):
            raise ValueError("build_engine: rollout workers need the model directory (for the sync check's probe)")
        return RemoteEngines(cfg.server_urls, model, timeout_s=cfg.timeout_s, retries=cfg.retries,
                             transfer_address=cfg.transfer_address, record_routes=record_routes)
    if cfg.engine == "hf":
        from rollout.hf import HFEngine

        if isinstance(model, (str, Path)):
            return HFEngine.from_pretrained(model, dtype="float32" if cfg.dtype == "auto" else cfg.dtype,
                                            batch_size=cfg.batch_size, record_routes=record_routes)
        if tokenizer is None:
            raise ValueError("build_engine: an in-memory model needs its tokenizer")
        return HFEngine(model, tokenizer, batch_size=cfg.batch_size, record_routes=record_routes)
    if not isinstance(model, (str, Path)):
        raise ValueError("build_engine: the vllm engine loads a model directory; save the policy first")
    from rollout.vllm_engine import VLLMEngine

    return VLLMEngine(model, dtype=cfg.dtype, seed=seed, gpu_memory_utilization=cfg.gpu_memory_utilization,
                      kv_cache_gb=cfg.kv_cache_gb, max_num_seqs=cfg.max_num_seqs, sleep=cfg.sleep,
                      **cfg.vllm_scale())


def build_policy_engine(cfg: RolloutConfig, policy, init_model: str | Path, tokenizer, *, seed: int,
                        record_routes: bool) -> tuple[RolloutEngine, bool]:
    """The engine a GRPO stage generates with, and whether it shares the policy's own tensors
    (HF engine, colocated: generation reads the training weights, so a sync is free). Any other
    engine loads `init_model`; a resumed stage brings it to the checkpoint's weights once they are
    loaded (the trainer's `load_state_dict`: a sharded policy gets them only then)."""
    if cfg.engine == "hf" and cfg.mode == "colocate":
        return build_engine(cfg, policy, tokenizer, record_routes=record_routes), True
    return build_engine(cfg, init_model, tokenizer, seed=seed, record_routes=record_routes), False
