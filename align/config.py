"""The recipe schema: one pydantic model per concept, each field documented once.

A recipe is YAML (read with `yaml.safe_load`) validated strictly before any model is loaded:
unknown keys are rejected with a "did you mean" and the YAML path and line; wrong types name the
value and the expected type; missing files name the path. `align recipe check RECIPE` prints the
resolved recipe. Reward and rollout sections are owned by their packages (`rewards.config`,
`rollout.config`) and only composed here.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rewards.config import RewardsConfig, RewardSpec
from rollout.config import RolloutConfig


class Strict(BaseModel):
    """Base for every recipe section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelSpec(Strict):
    """Build the tiny offline model into `model.path` when it does not exist yet."""

    size: Literal["nano", "tiny", "small", "medium"] = "tiny"
    arch: Literal["qwen2", "deepseek_v2"] = "qwen2"
    seed: int = 0


class ModelConfig(Strict):
    path: str = Field(description="Hugging Face model directory (local; no hub access at run time).")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    trust_remote_code: bool = Field(False, description="Run the model's own Python code. Off by default.")
    allow_pickle_weights: bool = Field(
        False, description="Accept .bin/.pt weights (loaded with weights_only). safetensors otherwise.")
    tiny: TinyModelSpec | None = Field(None, description="Build a tiny model at `path` if missing.")
    config: str | None = Field(
        None, description="A config.json that `--dry-run` reads when `path` is not downloaded yet.")


class SynthSpec(Strict):
    """A synthetic data file the pipeline generates before the stages run (`align data synth`)."""

    kind: Literal["math", "chat", "preference"]
    n: int = Field(gt=0)
    seed: int = 0
    out: str
    form: Literal["conversations", "prompts", "preferences"] | None = None
    safety_share: float = Field(0.2, ge=0, le=1)
    max_operand: int = Field(49, ge=1, description="Math: largest operand of the easy a ± b problems.")


class DataSource(Strict):
    """One data file in a mixture. `weight` sets its share; `count` takes exactly that many rows."""

    path: str
    name: str | None = None
    weight: float | None = Field(None, gt=0)
    count: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_of(self) -> "DataSource":
        if self.weight is not None and self.count is not None:
            raise ValueError("set either `weight` or `count` for a data source, not both")
        return self


def _sources(value: Any) -> Any:
    """Accept a bare path or a list of paths as shorthand for a list of DataSource."""
    if isinstance(value, str):
        return [{"path": value}]
    if isinstance(value, list):
        return [{"path": v} if isinstance(v, str) else v for v in value]
    return value


class LoraConfig(Strict):
    r: int = Field(16, gt=0)
    alpha: int = 32
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    merge_on_save: bool = Field(True, description="final/ holds merged weights (loads anywhere).")


class StageBase(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    init: str = Field("model", description="`model`, the name of an earlier stage, or a model directory.")
    seed: int | None = Field(None, description="Defaults to the recipe's seed.")
    lr: float = Field(5e-6, gt=0, description="Peak learning rate (DeepSeek-V2 SFT: 5e-6).")
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    scheduler: Literal["constant", "linear", "cosine"] = "linear"
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; null disables.")
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="Overrides epochs when set.")
    per_device_batch_size: int = Field(8, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    bf16: bool | Literal["auto"] = "auto"
    gradient_checkpointing: bool = False
    lora: LoraConfig | None = None
    save_steps: int | None = Field(None, gt=0, description="Checkpoint every N optimizer steps.")
    keep_last: int = Field(2, gt=0, description="Checkpoints kept besides final/.")
    logging_steps: int = Field(1, gt=0)


class SFTStage(StageBase):
    kind: Literal["sft"]
    data: Annotated[list[DataSource], Field(min_length=1)]
    eval_data: list[DataSource] = []
    eval_split: float = Field(0.0, ge=0, lt=1, description="Held-out share when eval_data is empty.")
    max_seq_len: int = Field(1024, gt=8)
    overlong: Literal["truncate", "drop"] = "truncate"
    packing: bool = True
    assistant_only_loss: bool = True
    moe_aux_loss_coef: float = Field(0.0, ge=0, description="Expert balance loss (DeepSeek-V2: 0.003).")

    _coerce_data = field_validator("data", "eval_data", mode="before")(_sources)


class RewardModelStage(StageBase):
    kind: Literal["reward_model"]
    data: Annotated[list[DataSource], Field(min_length=1)]
    eval_split: float = Field(0.1, ge=0, lt=1)
    max_seq_len: int = Field(512, gt=8)
    center_rewards_coefficient: float | None = None

    _coerce_data = field_validator("data", mode="before")(_sources)


class SamplingConfig(Strict):
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    max_new_tokens: int = Field(256, gt=0)
    stop: list[str] = []


class GRPOStage(StageBase):
    """GRPO (DeepSeekMath): G samples per prompt, group-relative advantages, no critic.

    DeepSeekMath's settings: group_size 64, lr 1e-6, beta 0.04, max length 1024, 1024 samples
    per step (`prompts_per_step` × `group_size`), one policy update per batch (num_iterations 1).
    """

    kind: Literal["grpo"]
    prompts: Annotated[list[DataSource], Field(min_length=1)]
    eval_prompts: list[DataSource] = []
    rewards: Annotated[list[RewardSpec], Field(min_length=1)]
    group_size: int = Field(8, ge=2)
    prompts_per_step: int = Field(8, gt=0)
    num_iterations: int = Field(1, gt=0, description="μ: policy updates per generated batch.")
    beta: float = Field(0.04, ge=0, description="KL coefficient; 0 loads no reference model.")
    epsilon_low: float = Field(0.2, gt=0)
    epsilon_high: float = Field(0.2, gt=0)
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "grpo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    importance_sampling_cap: float | None = Field(
        None, gt=0, description="Truncated IS correction for engine-vs-trainer logprob mismatch.")
    mask_truncated: bool = False
    reference: Literal["frozen_copy", "lora_disabled"] = "frozen_copy"
    max_prompt_len: int = Field(512, gt=0)
    sampling: SamplingConfig = SamplingConfig()
    rollout: RolloutConfig = RolloutConfig()
    offload: bool = Field(False, description="Offload trainer state to CPU while the engine generates.")
    routing_replay: bool = False
    reward_isolation: RewardsConfig = RewardsConfig()

    _coerce_prompts = field_validator("prompts", "eval_prompts", mode="before")(_sources)

    @model_validator(mode="after")
    def _checks(self) -> "GRPOStage":
        if self.reference == "lora_disabled" and self.lora is None and self.beta > 0:
            raise ValueError("reference: lora_disabled needs a `lora` section; "
                             "set reference: frozen_copy or add lora: {r: 16}")
        return self


Stage = Annotated[Union[SFTStage, RewardModelStage, GRPOStage], Field(discriminator="kind")]


class LoggingConfig(Strict):
    report_to: list[Literal["tensorboard", "wandb", "none"]] = ["tensorboard"]
    plots: bool = True


class EvaluateConfig(Strict):
    """The side-by-side evaluation `align train` runs once every stage is done (`align eval
    RUN_DIR` with these settings): each policy stage's final checkpoint on the same suites, so SFT
    and both RL stages, and the alignment tax between them, sit in one table (`<output_dir>/eval/`)."""

    suites: Annotated[list[str], Field(min_length=1)] = ["math", "safety"]
    stages: list[str] = Field([], description="Policy stages to compare, in order; empty = all of them.")
    judge: str | None = Field(None, description="reward_model stage (or model dir) for the `reward` suite.")
    prompts: dict[str, str] = Field({}, description="suite -> prompts file; default: held-out synthetic.")
    limit: int | None = Field(None, gt=0, description="Prompts per suite.")
    engine: Literal["auto", "hf", "vllm"] = "hf"
    k: list[Annotated[int, Field(ge=1)]] = Field([], description="pass@k for math/code; [] = greedy only.")
    temperature: float = Field(0.8, ge=0)
    max_new_tokens: int = Field(256, gt=0)
    max_prompt_len: int = Field(512, gt=0)


class DistributedConfig(Strict):
    """How the training state is placed across processes (`torchrun` / `accelerate launch` ranks).
    See docs/scaling.md for which path has run where."""

    strategy: Literal["ddp", "fsdp2"] = Field(
        "ddp", description="ddp: every rank holds the whole model, gradients and optimizer state "
        "(accelerate DDP). fsdp2: parameters, gradients, optimizer state and the frozen reference "
        "are sharded across ranks with torch FSDP2 (`fully_shard` per decoder layer, then the root), "
        "on CPU over gloo as on GPUs; checkpoints are per-rank shards, final/ is a full HF directory.")
    reshard_after_forward: bool = Field(
        True, description="fsdp2: free each layer's gathered weights after its forward and gather "
        "them again for backward (ZeRO-3 memory; torch's default). false keeps them until backward "
        "(ZeRO-2-like: more memory, one all-gather less per layer).")
    sync_group_mb: int = Field(
        1024, gt=0, description="fsdp2: MiB of full tensors gathered onto rank 0 per group when "
        "weights go to the rollout engine or into final/ (bounds rank 0's extra memory; a tensor "
        "larger than this is a group of its own).")


class Recipe(Strict):
    name: str = "run"
    output_dir: str = "runs/run"
    seed: int = 0
    model: ModelConfig
    synth: list[SynthSpec] = []
    stages: Annotated[list[Stage], Field(min_length=1)]
    logging: LoggingConfig = LoggingConfig()
    evaluate: EvaluateConfig | None = None
    distributed: DistributedConfig = Field(
        DistributedConfig(), description="Placement of the training state across ranks: ddp (default) or fsdp2.")

    @model_validator(mode="after")
    def _stage_graph(self) -> "Recipe":
        seen: set[str] = set()
        for i, stage in enumerate(self.stages):
            if stage.name in seen:
                raise ValueError(f"stages[{i}].name: {stage.name!r} is used twice; names must be unique")
            if stage.init != "model" and stage.init not in seen and not _looks_like_path(stage.init):
                hint = f"one of {sorted(seen)}, " if seen else ""
                raise ValueError(f"stages[{i}].init: {stage.init!r} is not an earlier stage; "
                                 f"use {hint}`model`, or a model directory")
            seen.add(stage.name)
        if self.evaluate is not None:
            kinds = {s.name: s.kind for s in self.stages}
            for i, name in enumerate(self.evaluate.stages):
                if kinds.get(name) in (None, "reward_model"):
                    policies = [n for n, k in kinds.items() if k != "reward_model"]
                    raise ValueError(f"evaluate.stages[{i}]: {name!r} is not a policy stage; use one of {policies}")
            judge = self.evaluate.judge
            if judge is not None and not _looks_like_path(judge) and kinds.get(judge) != "reward_model":
                rms = [n for n, k in kinds.items() if k == "reward_model"]
                raise ValueError(f"evaluate.judge: {judge!r} is not a reward_model stage; use one of {rms} "
                                 "or a model directory")
        return self

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def stage_seed(self, stage: StageBase) -> int:
        return self.seed if stage.seed is None else stage.seed

    def stage_hash(self, name: str) -> str:
        """Hash of what determines a stage's result: its own config, the model and the stages it
        starts from. A changed hash for a finished stage is reported, never silently reused."""
        chain, stage = [], self.stage(name)
        while True:
            chain.append(stage.model_dump(mode="json"))
            if stage.init == "model" or _looks_like_path(stage.init):
                break
            stage = self.stage(stage.init)
        payload = {"model": self.model.model_dump(mode="json"), "seed": self.seed, "stages": chain}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _looks_like_path(value: str) -> bool:
    return "/" in value or value.startswith(".")
