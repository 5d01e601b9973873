"""Recipe schema for rollout: which engine generates, where it runs, how much memory it may take.

Self-contained on purpose (imports nothing from align.recipe.schema): the recipe schema embeds it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, model_validator


class RolloutConfig(BaseModel):
    """Engine and placement of GRPO rollouts. `mode: server` drives `align rollout serve` workers
    (`engine: hf`) or stock `vllm serve` processes (`engine: vllm`)."""

    model_config = ConfigDict(extra="forbid")

    engine: Literal["hf", "vllm"] = Field("hf", description="`hf` (transformers generate, always available) or `vllm` (needs the vllm extra). With mode: server, `hf` drives `align rollout serve --engine hf` workers and `vllm` drives stock `vllm serve` processes (`align rollout serve --engine vllm`).")
    mode: Literal["colocate", "server"] = Field("colocate", description="`colocate`: the engine runs in the trainer's process (`hf` generates with the policy's own weights); `server`: workers listed in `servers`, configured by their own start-up flags (`align rollout serve`), so the colocated engine keys here do not apply.")
    servers: list[HttpUrl] = Field(default_factory=list, description="Worker URLs (`http://host:port`) for mode: server.")
    transfer_address: str = Field("127.0.0.1", description="mode: server: this trainer's address as the rollout servers (vLLM or align's HF workers) reach it; weights move over a gloo group per server whose TCP store listens there on a free port. Loopback by default; a private-network address when the servers run on other hosts.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Colocated vllm: weights dtype. vLLM's `auto` runs float32 checkpoints in bfloat16; float32 makes rollout logprobs match a float32 trainer to ~1e-6. (The colocated hf engine uses the policy's own weights.)")
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="Colocated vllm: its share of GPU memory (shared with training, so keep it low; TRL default 0.3).")
    kv_cache_gb: float = Field(1.0, gt=0, description="Colocated vllm on CPU: KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE, when set, wins).")
    sleep: bool = Field(False, description="Colocated vllm: release its memory while training (sleep mode; a no-op where the platform lacks it, e.g. CPU).")
    max_num_seqs: int = Field(256, ge=1, description="Colocated vllm: sequences decoded at once (vLLM `max_num_seqs`).")
    tensor_parallel_size: int = Field(1, ge=1, description="Colocated vllm: GPUs one engine shards its weights over (vLLM `tensor_parallel_size`). For `vllm serve` rollout servers, pass `--tensor-parallel-size` to `align rollout serve --engine vllm` instead.")
    enable_expert_parallel: bool = Field(False, description="Colocated vllm, MoE models: place experts across the tensor-parallel ranks instead of sharding each expert (vLLM `enable_expert_parallel`). Servers: `--enable-expert-parallel`.")
    max_model_len: int | None = Field(None, ge=1, description="Colocated vllm: longest prompt + completion in tokens; bounds the KV cache per sequence (null = the model's `max_position_embeddings`). Servers: `--max-model-len`.")
    enforce_eager: bool = Field(False, description="Colocated vllm: no CUDA graphs / torch.compile; slower decoding, faster start and less memory (vLLM `enforce_eager`). Servers: `--enforce-eager`.")
    batch_size: int | None = Field(None, ge=1, description="Colocated hf: prompts per generate call (each with its whole group); null = the whole batch.")
    timeout_s: float = Field(600.0, gt=0, description="mode: server: seconds to wait for one worker request and for one weight transfer.")
    retries: int = Field(2, ge=0, description="mode: server: extra attempts of a failed request, each on another live worker.")

    @model_validator(mode="after")
    def _servers_match_mode(self) -> RolloutConfig:
        if self.mode == "server" and not self.servers:
            raise ValueError("rollout.mode is 'server' but rollout.servers is empty: list the worker URLs "
                             "(e.g. servers: [http://127.0.0.1:8100]) started with `align rollout serve`, "
                             "or set mode: colocate")
        if self.mode == "colocate" and self.servers:
            raise ValueError("rollout.servers is set but rollout.mode is 'colocate': set mode: server to use them")
        scale = {k: v for k, v in self.vllm_scale().items() if v != type(self).model_fields[k].default}
        if scale and (self.engine != "vllm" or self.mode != "colocate"):
            where = ("the hf engine has no such setting" if self.engine == "hf" else
                     "vllm serve processes take them at start: `align rollout serve --engine vllm "
                     + " ".join("--" + k.replace("_", "-") for k in scale) + "`")
            raise ValueError(f"rollout.{', rollout.'.join(scale)}: colocated vllm settings; {where}")
        return self

    def vllm_scale(self) -> dict[str, Any]:
        """The parallelism and length settings, as `vllm.LLM` keyword arguments."""
        return {k: getattr(self, k) for k in ("tensor_parallel_size", "enable_expert_parallel", "max_model_len",
                                                "enforce_eager")}

    @property
    def server_urls(self) -> list[str]:
        return [str(u).rstrip("/") for u in self.servers]
