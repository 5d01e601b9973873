"""The recipe schema: one pydantic model per concept, each field documented once.

A recipe is YAML (read with `yaml.safe_load`) validated strictly before any model is loaded:
unknown keys are rejected with a "did you mean" and the YAML path and line; wrong types name the
value and the expected type; missing files name the path. `align recipe check RECIPE` prints the
resolved recipe, `--explain` adds each key's `description=`, and `align recipe keys` prints them
without a recipe (tests/test_config_docs.py fails on a key without one). Reward and rollout
sections are owned by their packages (`rewards.config`, `rollout.config`) and only composed here.
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

    size: Literal["nano", "tiny", "small", "medium"] = Field(
        "tiny", description="nano (~0.2M parameters, unit tests), tiny (~1.1M, quickstart), small (~5M) or "
                            "medium (~32M, benchmarks): random weights and a BPE tokenizer trained offline.")
    arch: Literal["qwen2", "llama", "deepseek_v2"] = Field(
        "qwen2", description="qwen2 (dense), llama (dense, shaped like SmolLM2-Instruct: tied embeddings, "
                             "pad = eos, a chat template with a default system prompt and no generation "
                             "markers) or deepseek_v2 (MoE: routed + shared experts and MLA attention, "
                             "transformers' DeepseekV2ForCausalLM).")
    seed: int = Field(0, description="Seed of the tokenizer corpus and the weights: same seed, same bytes.")


class ModelConfig(Strict):
    path: str = Field(description="Hugging Face model directory (local; no hub access at run time). "
                                  "Stages with `init: model` start from it.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="dtype every stage loads its weights in (policy, reference, reward model); "
                               "`auto` keeps the checkpoint's own. Mixed precision is each stage's `bf16`.")
    trust_remote_code: bool = Field(False, description="Run the model's own Python code. Off by default.")
    allow_pickle_weights: bool = Field(
        False, description="Accept .bin/.pt weights (loaded with weights_only). safetensors otherwise.")
    tiny: TinyModelSpec | None = Field(None, description="Build a tiny model at `path` if missing.")
    config: str | None = Field(
        None, description="A config.json that `--dry-run` reads when `path` is not downloaded yet.")


class SynthSpec(Strict):
    """A synthetic data file the pipeline generates before the stages run (`align data synth`)."""

    kind: Literal["math", "chat", "preference"] = Field(
        description="math: a ± b word problems (with an `answer` column); chat: helpfulness and safety "
                    "requests; preference: chosen/rejected answer pairs.")
    n: int = Field(gt=0, description="Rows to generate.")
    seed: int = Field(0, description="Generator seed: the same spec always gives the same rows.")
    out: str = Field(description="JSONL file written; rewritten when missing or when this spec changes (manifest.json).")
    form: Literal["conversations", "prompts", "preferences"] | None = Field(
        None, description="conversations (`messages` rows, for SFT), prompts (`prompt` rows ending in a user "
                          "turn, for GRPO) or preferences (kind preference only); null = the kind's first form.")
    safety_share: float = Field(0.2, ge=0, le=1, description="chat and preference: expected share of rows in "
                                                              "category `safety` (harmful requests).")
    max_operand: int = Field(49, ge=1, description="Math: largest operand of the easy a ± b problems.")
    worked_share: float = Field(1.0, ge=0, le=1, description=(
        "Math conversations: expected share of answers that show the worked line; the rest are the final "
        "sentence alone ('The answer is N.'), as answer-only rows in real SFT sets."))


class DataSource(Strict):
    """One data file in a mixture. `weight` sets its share; `count` takes exactly that many rows."""

    path: str = Field(description="Data file: JSONL, Parquet or a `datasets` directory.")
    name: str | None = Field(None, description="SFT: label of the source in the data statistics of the stage "
                                               "summary and in errors; default: the path.")
    weight: float | None = Field(None, gt=0, description="SFT `data` only: the weighted sources share the rows "
                                                         "they hold together in proportion to their weights "
                                                         "(seeded up- or down-sampling).")
    count: int | None = Field(None, gt=0, description="SFT `data` only: take exactly this many rows (a seeded "
                                                      "sample, or whole copies plus a sample when larger than "
                                                      "the file). DeepSeek-V2: 1.2M helpfulness + 0.3M safety.")

    @model_validator(mode="after")
    def _one_of(self) -> "DataSource":
        if self.weight is not None and self.count is not None:
            raise ValueError("set either `weight` or `count` for a data source, not both")
        return self


class ConversationSource(DataSource):
    """An SFT conversation file: also which format its rows are in and what to do with messy rows
    (`align.data.formats`, `align.data.policy`; `align data check` takes the same settings)."""

    format: Literal["auto", "messages", "sharegpt", "alpaca"] = Field(
        "auto", description="Row format: `messages` ({messages: [{role, content}]}), `sharegpt` "
        "({conversations: [{from, value}]}), `alpaca` ({instruction, input, output}); `auto` detects it "
        "per file from the first row that shows one.")
    roles: dict[str, Literal["system", "user", "assistant"]] = Field(
        {}, description="Extra role names, e.g. {function_response: user}: extends (or overrides) the "
        "built-in map (human/prompter -> user; gpt/chatgpt/bot/model/ai/bard/bing -> assistant; sys -> "
        "system). Matched case-insensitively; a role in neither is an `unknown_role` defect.")
    on_defect: Literal["repair", "skip", "fail"] | dict[str, Literal["repair", "skip", "fail"]] = Field(
        "repair", description="What a row with defects does: `repair` (the unambiguous fixes: drop empty "
        "turns, drop assistant turns before the first user turn, merge same-role neighbours; rows with "
        "other defects are skipped), `skip`, or `fail` (stop with the defects' locations). A mapping sets it "
        "per defect kind, e.g. {default: repair, unknown_role: fail}. Every defect is counted either way.")

    @field_validator("on_defect")
    @classmethod
    def _known_kinds(cls, value: Any) -> Any:
        from align.data.policy import parse_policy

        parse_policy(value)  # ValueError names the bad kind or action
        return value

    def conversation_format(self):
        """How `align.data.io.read_conversations` reads this source."""
        from align.data.formats import conversation_format

        return conversation_format(self.format, self.roles, self.on_defect)


def _sources(value: Any) -> Any:
    """Accept a bare path or a list of paths as shorthand for a list of DataSource."""
    if isinstance(value, str):
        return [{"path": value}]
    if isinstance(value, list):
        return [{"path": v} if isinstance(v, str) else v for v in value]
    return value


class LoraConfig(Strict):
    r: int = Field(16, gt=0, description="Rank of the LoRA update (peft `r`, default 8).")
    alpha: int = Field(32, description="The update is scaled by alpha / r (peft `lora_alpha`, default 8).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch's input (peft `lora_dropout`).")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or `all-linear`: every linear layer but the output "
                                  "head (peft).")
    merge_on_save: bool = Field(True, description="final/ holds merged weights (loads anywhere); false: final/ "
                                                  "holds the adapter only.")


class StageBase(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description=(
        "Stage name (letters, digits, `_.-`): its directory under output_dir, the name `--only`, `--from`, "
        "`--set stages.NAME.key=...`, later stages' `init` and a reward's `model` refer to."))
    init: str = Field("model", description="Weights the stage starts from: `model`, the name of an earlier "
                                           "stage (its final/), or a model directory.")
    seed: int | None = Field(None, description="Seed of the stage's data order, initialisation (LoRA, score "
                                               "head) and sampling; defaults to the recipe's seed.")
    lr: float = Field(5e-6, gt=0, description="Peak AdamW learning rate, reached after warmup (DeepSeek-V2 SFT: "
                                              "5e-6; DeepSeekMath GRPO: 1e-6).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay of the matrices; biases and norm "
                                                       "weights get none (as transformers' Trainer; default 0).")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of the stage's steps (rounded up) over which "
                                                             "the learning rate rises linearly from 0 to `lr`.")
    scheduler: Literal["constant", "linear", "cosine"] = Field(
        "linear", description="Learning rate after warmup: constant, linear decay to 0 (transformers' default) "
                              "or cosine decay to 0, over the stage's steps.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient L2 norm to this before "
                                                               "each optimizer step (TRL default 1.0); null: "
                                                               "measure only. Steps with a non-finite norm are "
                                                               "skipped; 5 in a row stop the stage.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data, may be fractional (DeepSeek-V2 "
                                                 "SFT: 2). An epoch is rows // global batch steps; for GRPO "
                                                 "len(prompts) // prompts_per_step steps.")
    max_steps: int | None = Field(None, gt=0, description="Steps to run; overrides epochs when set. For GRPO a "
                                                          "step is one generated batch (num_iterations "
                                                          "optimizer steps).")
    per_device_batch_size: int = Field(8, gt=0, description=(
        "Rows per device per forward pass: SFT conversations (packed rows with packing), reward_model "
        "preference pairs, GRPO completions (at most this many; it must divide the completions each process "
        "trains on per step)."))
    gradient_accumulation_steps: int = Field(1, gt=0, description=(
        "Micro-batches per optimizer step (global batch = per_device_batch_size × processes × this); the loss "
        "is normalised over the whole global batch. GRPO requires 1: it accumulates over the generated batch."))
    bf16: bool | Literal["auto"] = Field(
        "auto", description="bf16 autocast (accelerate mixed precision); `auto`: on with a CUDA GPU that "
                            "supports bf16, off on CPU (slower there). Weights stay in model.dtype.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations during backward instead of "
                                                            "storing them: less memory, one more forward pass.")
    lora: LoraConfig | None = Field(None, description="Train a LoRA adapter instead of every weight; null: full "
                                                      "fine-tuning.")
    save_steps: int | None = Field(None, gt=0, description="Checkpoint every N steps (not at the last step, where "
                                                           "final/ follows); null: only final/, and a checkpoint "
                                                           "on a stop.")
    eval_steps: int | None = Field(None, gt=0, description=(
        "Held-out evaluation every N optimizer steps, besides the ones before and after training "
        "(which always run); null: before and after only."))
    keep_last: int = Field(2, gt=0, description="Checkpoints kept besides final/.")
    logging_steps: int = Field(1, gt=0, description="Log metrics every N steps and at the last; SFT's loss is "
                                                    "the mean over those steps, other stages log the last one.")


class SFTStage(StageBase):
    kind: Literal["sft"] = Field(description="`sft`: supervised fine-tuning, next-token loss on conversations.")
    data: Annotated[list[ConversationSource], Field(min_length=1)] = Field(description=(
        "Training conversations (`messages` rows): a path, a list of paths, or sources with weight/count "
        "for a mixture."))
    eval_data: list[ConversationSource] = Field([], description="Held-out conversations for eval_loss (before "
                                                        "and after training, and every eval_steps); read whole.")
    eval_split: float = Field(0.0, ge=0, lt=1, description="Held-out share of `data` when eval_data is empty "
                                                           "(at least one row when > 0).")
    max_seq_len: int = Field(1024, gt=8, description="Tokens per conversation, and per packed row (TRL "
                                                     "max_length, default 1024).")
    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="A conversation over max_seq_len keeps its first max_seq_len tokens, or is "
                                "dropped; both are counted in the stage summary.")
    packing: bool = Field(True, description=(
        "Pack conversations into rows of max_seq_len tokens (TRL's best-fit decreasing) with positions "
        "restarting per conversation, so none attends to another; false: right-pad, length-bucketed batches. "
        "TRL default false."))
    assistant_only_loss: bool = Field(True, description="Loss on assistant tokens only (TRL "
                                                        "`assistant_only_loss`, default false); false: on every "
                                                        "token of the conversation.")
    moe_aux_loss_coef: float = Field(0.0, ge=0, description=(
        "Weight of the MoE router's load-balancing loss added to the SFT loss (the model's own, else "
        "Switch/Mixtral E·Σ f_i·P_i over layers); 0 = off. DeepSeek-V2's expert-level balance factor: 0.003."))

    _coerce_data = field_validator("data", "eval_data", mode="before")(_sources)


class RewardModelStage(StageBase):
    kind: Literal["reward_model"] = Field(description="`reward_model`: a scalar score head trained on preference "
                                                      "pairs with the Bradley–Terry loss.")
    data: Annotated[list[DataSource], Field(min_length=1)] = Field(description=(
        "Preference pairs (`prompt`, `chosen`, `rejected` rows): a path or a list of paths, every row used."))
    eval_split: float = Field(0.1, ge=0, lt=1, description=(
        "Held-out share of the pairs: eval_accuracy and eval_margin before and after training, and the score "
        "centre and spread written to final/reward_calibration.json (not written when 0)."))
    max_seq_len: int = Field(512, gt=8, description="Tokens per side (prompt + answer, chat template); longer "
                                                    "sides lose prompt tokens from the left.")
    center_rewards_coefficient: float | None = Field(None, description=(
        "Adds coef · mean((r_chosen + r_rejected)²) to the loss, keeping scores centred at 0 (TRL's key, "
        "default None; TRL recommends 0.01, after Eisenstein et al. 2023); null or 0 = off."))

    _coerce_data = field_validator("data", mode="before")(_sources)


class DPOStage(StageBase):
    """Offline preference optimisation (DPO, Rafailov et al. 2023; IPO, Azar et al. 2023) on
    preference pairs, the same files a reward_model stage reads. Defaults are TRL 1.16's DPOConfig."""

    kind: Literal["dpo"] = Field(description="`dpo`: offline preference optimisation on chosen/rejected pairs "
                                             "against a reference policy (no sampling, no reward model).")
    data: Annotated[list[DataSource], Field(min_length=1)] = Field(description=(
        "Preference files (prompt, chosen, rejected), as for a reward_model stage; "
        "`align data pairs` writes them from the policy's own samples."))
    eval_split: float = Field(0.1, ge=0, lt=1, description="Share of the pairs held out for the eval_ metrics.")
    max_seq_len: int = Field(1024, gt=8, description=(
        "Tokens of prompt + answer per side (TRL max_length 1024); longer sequences keep their start, "
        "pairs whose prompt alone fills it are dropped."))
    lr: float = Field(1e-6, gt=0, description="Peak learning rate (TRL DPOConfig: 1e-6).")
    beta: float = Field(0.1, gt=0, description=(
        "β: the strength of the implicit KL to the reference (sigmoid), or IPO's τ (TRL default 0.1)."))
    loss_type: Literal["sigmoid", "ipo"] = Field("sigmoid", description=(
        "sigmoid: DPO's −log σ(β·Δ); ipo: (Δ/len − 1/(2β))² with length-normalised log-ratios (TRL's IPO)."))
    reference: Literal["precomputed", "frozen_copy", "lora_disabled"] = Field("precomputed", description=(
        "π_ref = the starting model: its log-probs computed once before training and stored in the stage "
        "directory (precomputed, no extra memory; TRL precompute_ref_log_probs), a frozen second copy "
        "scoring every batch, or the LoRA policy with its adapter off."))

    _coerce_data = field_validator("data", mode="before")(_sources)

    @model_validator(mode="after")
    def _checks(self) -> "DPOStage":
        if self.reference == "lora_disabled" and self.lora is None:
            raise ValueError("reference: lora_disabled needs a `lora` section; "
                             "set reference: precomputed or add lora: {r: 16}")
        return self


class SamplingConfig(Strict):
    temperature: float = Field(1.0, ge=0, description="Sampling temperature of the rollouts; the trainer's "
                                                      "log-probs use the same one (TRL default 1.0).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the most likely tokens up to "
                                                      "this probability mass; 1 = off (TRL default).")
    top_k: int = Field(0, ge=0, description="Keep only the k most likely tokens; 0 = off (TRL default).")
    max_new_tokens: int = Field(256, gt=0, description=(
        "Completion length limit in tokens (TRL max_completion_length, default 512; DeepSeekMath: 1024); also "
        "dr_grpo's normaliser. A completion cut here is truncated (see mask_truncated)."))
    stop: list[str] = Field([], description="Strings that end a completion, besides EOS.")


class ImportanceSamplingConfig(Strict):
    """Correction for the rollout engine sampling from π_rollout ≠ the trainer's π_old (kernels,
    precision): each token's (or sequence's) policy loss is weighted by w = π_old/π_rollout,
    truncated at or masked above `cap`."""

    level: Literal["token", "sequence"] = Field(
        "token", description="token: w_t per token; sequence: w_i = Π_t w_t, one per sequence "
        "(verl's rollout_is example: token; TRL's default mode: sequence_mask).")
    mode: Literal["truncate", "mask"] = Field(
        "truncate", description="truncate: w ← min(w, cap) (TIS); mask: w ← 0 where w > cap (MIS).")
    cap: float = Field(2.0, gt=0, description="C, the upper bound on w (verl rollout_is_threshold "
                       "example: 2.0; TRL vllm_importance_sampling_clip_max: 3.0).")


class DynamicSamplingConfig(Strict):
    """DAPO's dynamic sampling (align/grpo/dynamic_sampling.py)."""

    max_rounds: int = Field(3, ge=1, description=(
        "Generation rounds per step at most, the first included (DAPO's max_num_gen_batches); a batch "
        "still short of groups with reward spread after them is topped up with zero-spread groups."))
    min_std: float = Field(0.0, ge=0, description=(
        "A group is kept when the std of its G rewards is above this (0: any difference at all)."))


class PtxConfig(Strict):
    """PPO-ptx (InstructGPT, Ouyang et al. 2022): an SFT loss on conversations added to every
    optimizer step of an RL stage, so RL's updates on its prompts do not unlearn what SFT taught
    elsewhere (the alignment tax). align/grpo/ptx.py; docs/grpo.md "Keeping what SFT taught"."""

    data: Annotated[list[ConversationSource], Field(min_length=1)] = Field(description=(
        "Conversations (`messages` rows, as SFT's `data`, with weight/count mixtures): usually the SFT "
        "stage's own data, or the part of it the RL stage must not unlearn."))
    coef: float = Field(description=(
        "γ: weight of the SFT loss (mean cross-entropy per target token) added to the RL loss "
        "(OpenRLHF `ptx_coef`, default 0.05; InstructGPT: 27.8 on pretraining data)."), gt=0)
    batch_size: int = Field(16, gt=0, description=(
        "Conversations per optimizer step over all processes (a multiple of their number), micro-batched "
        "by the stage's per_device_batch_size; the order is a pure function of (seed, step)."))
    max_seq_len: int = Field(1024, gt=8, description="Tokens per conversation (longer ones: `overlong`).")
    overlong: Literal["truncate", "drop"] = Field("truncate", description="As SFT's `overlong`.")
    assistant_only_loss: bool = Field(True, description="As SFT's: loss on assistant tokens only.")

    _coerce_data = field_validator("data", mode="before")(_sources)


class GRPOStage(StageBase):
    """GRPO (DeepSeekMath): G samples per prompt, group-relative advantages, no critic.

    DeepSeekMath's settings: group_size 64, lr 1e-6, beta 0.04, max length 1024, 1024 samples
    per step (`prompts_per_step` × `group_size`), one policy update per batch (num_iterations 1).
    """

    kind: Literal["grpo"] = Field(description="`grpo`: online RL with group-relative advantages and no critic "
                                              "(DeepSeekMath's GRPO).")
    prompts: Annotated[list[DataSource], Field(min_length=1)] = Field(description=(
        "Training prompts (`prompt` rows: a string or messages ending in a user turn; other columns such as "
        "`answer` reach the rewards): a path or a list of paths, read whole, in a seeded order per epoch."))
    eval_prompts: list[DataSource] = Field([], description=(
        "Held-out prompts answered greedily and scored by the same rewards before and after training "
        "(`eval/<reward>`, also per `category` column); the first `eval_max_prompts` are used."))
    eval_max_prompts: int = Field(256, gt=0, description=(
        "Held-out prompts scored (greedy, by the training rewards) before and after the stage: the "
        "first N of eval_prompts."))
    rewards: Annotated[list[RewardSpec], Field(min_length=1)] = Field(description=(
        "Reward components, combined into one scalar per completion: weighted sum, then safety gates "
        "(DeepSeek-V2's preference stage: r = c1·R_helpful + c2·R_safety + c3·R_rule)."))
    group_size: int = Field(8, ge=2, description="G: completions sampled per prompt; each one's advantage is "
                                                 "relative to its group (TRL num_generations, default 8; "
                                                 "DeepSeekMath: 64).")
    prompts_per_step: int = Field(8, gt=0, description=(
        "Prompts per step over all processes (a multiple of their number); a step trains on prompts_per_step × "
        "group_size completions (DeepSeekMath: 1024 samples per step, e.g. 16 × 64)."))
    num_iterations: int = Field(1, gt=0, description=(
        "μ: optimizer steps over each generated batch (TRL num_iterations, default 1; DeepSeekMath: 1). With "
        "μ > 1, π_old is computed once per batch and the ratio π_θ/π_old is clipped."))
    beta: float = Field(0.04, ge=0, description=(
        "β: weight of the per-token KL(π_θ ‖ π_ref) penalty in the loss, k3 estimator (DeepSeekMath: 0.04; "
        "TRL default 0); 0 loads no reference model."))
    epsilon_low: float = Field(0.2, gt=0, description=(
        "ε_low: the ratio π_θ/π_old is clipped below at 1 − ε_low (PPO/DeepSeekMath 0.2; TRL `epsilon`, default "
        "0.2). Bites only when π_θ can move away from π_old (num_iterations > 1): with μ = 1 the ratio is 1."))
    epsilon_high: float = Field(0.2, gt=0, description=(
        "ε_high: the ratio is clipped above at 1 + ε_high (TRL default: = epsilon; DAPO's clip-higher: 0.28)."))
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field("grpo", description=(
        "How per-token losses become the step loss. `grpo`: mean over completions of each completion's token "
        "mean (DeepSeekMath); length-biased: a long wrong answer is penalised less per token. `bnpo`: token "
        "mean over each micro-batch, so it varies with per_device_batch_size. `dr_grpo`: token sum / "
        "(completions × sampling.max_new_tokens), Dr. GRPO's constant normaliser. `dapo`: token sum / "
        "completion tokens of the whole step (all micro-batches and processes), DAPO's token-level mean, "
        "TRL's default. Each equals TRL 1.16's loss of that name (tests/test_grpo_vs_trl.py)."))
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description=(
        "Advantage A = (r − group mean) / scale: `group` = the group's std (DeepSeekMath, TRL default); "
        "`batch` = the std over the whole step's rewards (Lite PPO); `none` = no division (Dr. GRPO: std "
        "scaling over-weights too easy and too hard questions). A group whose rewards are all equal gets A = 0."))
    negative_advantage_weight: float = Field(1.0, ge=0, le=1, description=(
        "λ: negative advantages are multiplied by λ after scaling (W-REINFORCE, Zhu et al. 2025: λ = 0.1; "
        "1 = plain GRPO, 0 = reinforce only better-than-average samples). Below 1 when pushing wrong "
        "samples down unlearns what the model had right (docs/grpo.md)."))
    # loss variants (docs/grpo.md has each formula, when to use it and its source's defaults)
    policy_objective: Literal["clip", "cispo"] = Field(
        "clip", description="Per-token policy term: `clip` = PPO/GRPO clipped ratio·A (DeepSeekMath); "
        "`cispo` = −sg(min(ρ, cispo_cap))·A·log π (MiniMax-M1; TRL loss_type=cispo, which pairs it "
        "with loss_type dapo's aggregation).")
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token", description="Policy ratio per token (PPO/GRPO, TRL default) or per sequence as the "
        "length-normalised likelihood ratio (GSPO, which pairs it with epsilon_low 3e-4, "
        "epsilon_high 4e-4, beta 0; meant for MoE stability).")
    clip_ratio_c: float | None = Field(
        None, gt=1, description="Dual-clip bound c: for A < 0 the loss is capped at −A·c, so a ratio "
        "far above 1 cannot push a token down without limit (Ye et al. 2020; verl default 3.0, always "
        "on there). Equals TRL's `delta` when c > 1 + epsilon_high. null = off.")
    cispo_cap: float = Field(
        5.0, gt=0, description="CISPO's cap C on the detached importance weight (absolute, not 1 + ε; "
        "TRL's epsilon_high for cispo, ScaleRL/TRL recommend 5.0). Used only by policy_objective cispo.")
    kl_estimator: Literal["k1", "k2", "k3"] = Field(
        "k3", description="Per-token KL estimator (Schulman 2020): k3 = DeepSeekMath/TRL (in the loss); "
        "k1 = verl's and OpenRLHF's default when the KL goes in the reward.")
    kl_mode: Literal["loss", "reward"] = Field(
        "loss", description="Where beta·KL goes: `loss` adds it to every token's loss (DeepSeekMath); "
        "`reward` subtracts beta·Σ_t KL_t from each completion's reward before advantages (PPO-RLHF "
        "shaping; verl use_kl_in_reward, default off there).")
    kl_ratio_correction: bool = Field(
        False, description="Multiply the in-loss KL by the policy ratio so its gradient is the unbiased "
        "reverse-KL gradient (DeepSeek-V3.2; TRL use_bias_correction_kl, default true there).")
    importance_sampling: ImportanceSamplingConfig | None = Field(
        None, description="Train–rollout mismatch correction (Yao et al. 2025 TIS/MIS; TRL "
        "vllm_importance_sampling_*): {level, mode, cap}. null = no correction (the gap is still "
        "logged under mismatch/ every step). With max_staleness > 0 it also corrects the stale samples: "
        "on by default there, and null is refused.")
    fp32_lm_head: bool = Field(
        False, description="Run the output head's matmul in float32 for the trainer's log-probs "
        "(policy, π_old, reference) so bf16 rounding of the logits does not widen the trainer–engine "
        "gap (ScaleRL; TRL cast_lm_head_to_fp32, default false).")
    mask_truncated: bool = Field(False, description=(
        "Leave completions cut at sampling.max_new_tokens out of the loss; their rewards still enter their "
        "group's advantages (TRL mask_truncated_completions, default false; recommended by DAPO)."))
    reference: Literal["frozen_copy", "lora_disabled"] = Field("frozen_copy", description=(
        "π_ref of the KL term: `frozen_copy` = a frozen copy of the stage's init weights on every device; "
        "`lora_disabled` = the policy with its adapter switched off (needs `lora`, no extra memory). Unused "
        "when beta = 0."))
    max_prompt_len: int = Field(512, gt=0, description="Prompt tokens kept (the last ones, after the chat "
                                                       "template); cut prompts are counted in the summary.")
    sampling: SamplingConfig = Field(SamplingConfig(), description="How rollouts are sampled.")
    rollout: RolloutConfig = Field(RolloutConfig(), description="Which engine generates the rollouts, and where.")
    offload: bool = Field(False, description=(
        "Move the trainer's weights, gradients and optimizer state (and a frozen reference) to CPU while the "
        "engine generates; needs an engine that does not share the policy (vllm, or mode: server)."))
    routing_replay: bool | Literal["auto"] = Field(False, description=(
        "MoE only: the trainer's routers use the experts each completion token was routed to during rollout "
        "(Rollout Routing Replay, docs/moe.md), combine weights from the live router. `auto`: off until a "
        "step's logged moe/route_mismatch exceeds routing_replay_threshold, then on for the rest of the "
        "stage (moe/replay_on says which). Needs the HF engine, colocated or behind `align rollout serve "
        "--engine hf`."))
    routing_replay_threshold: float = Field(0.05, ge=0, le=1, description=(
        "routing_replay: auto only: the share of (token, layer) expert choices the trainer makes differently "
        "from the rollout above which replay switches on."))
    moe_aux_loss_coef: float = Field(0.0, ge=0, description=(
        "MoE only: weight of the router's balance loss (DeepSeek-V2's expert-level loss) added to the GRPO "
        "loss. 0 = off, as verl and NeMo-RL run RL: it fights the reward and makes log-probs diverge "
        "(docs/moe.md)."))
    moe_freeze_router: bool = Field(False, description=(
        "MoE only: keep the routers' weights fixed (not trained, not in the optimizer), so routing never "
        "drifts between rollout and update."))
    max_staleness: int = Field(0, ge=0, description=(
        "Bounded off-policy rollouts: k > 0 generates the batch for step s ahead, on a background thread, "
        "with the weights after step max(0, s − k), so rollout overlaps training and no sample is more "
        "than k policy versions old (rollout/staleness_max). Needs rollout.mode: server, offload: false and "
        "one training process; importance_sampling then defaults to {level: token, mode: truncate, cap: "
        "2.0} (null refused). 0 = generate, then train (DeepSeekMath). docs/grpo.md."))
    dynamic_sampling: DynamicSamplingConfig | None = Field(None, description=(
        "Drop groups whose rewards do not differ (advantage 0) and sample more prompts to refill the "
        "batch (DAPO); null: off, every group is trained (DeepSeekMath, TRL's default)."))
    reward_isolation: RewardsConfig = Field(RewardsConfig(), description="How many reward-function failures a "
                                                                          "run tolerates before it stops.")
    ptx: PtxConfig | None = Field(None, description=(
        "An SFT loss on conversations added to every optimizer step (PPO-ptx, InstructGPT; OpenRLHF "
        "`--pretrain_data`/`ptx_coef`): {data, coef, batch_size}. null = RL loss only (DeepSeekMath)."))

    _coerce_prompts = field_validator("prompts", "eval_prompts", mode="before")(_sources)

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "importance_sampling_cap" in data:
            cap = data["importance_sampling_cap"]
            fix = ("delete it (no correction)" if cap is None else
                   f"write `importance_sampling: {{level: token, mode: truncate, cap: {cap}}}` (what it did)")
            raise ValueError(f"importance_sampling_cap was replaced by importance_sampling: {{level, mode, cap}}; {fix}")
        return data

    @model_validator(mode="before")
    @classmethod
    def _stale_samples_are_corrected(cls, data: Any) -> Any:
        """With max_staleness > 0 the samples come from older weights: the IS correction is on by default."""
        if not isinstance(data, dict) or not isinstance(data.get("max_staleness"), int) or data["max_staleness"] < 1:
            return data
        if "importance_sampling" not in data:
            return {**data, "importance_sampling": {}}  # {level: token, mode: truncate, cap: 2.0}
        if data["importance_sampling"] is None:
            raise ValueError(f"stages.{data.get('name')}.importance_sampling: null turns off the correction that "
                             f"max_staleness: {data['max_staleness']} needs (a sample may come from weights up to "
                             f"{data['max_staleness']} optimizer step(s) old); remove the null (default {{level: token, mode: "
                             "truncate, cap: 2.0}) or set max_staleness: 0")
        return data

    @model_validator(mode="after")
    def _checks(self) -> "GRPOStage":
        if self.reference == "lora_disabled" and self.lora is None and self.beta > 0:
            raise ValueError("reference: lora_disabled needs a `lora` section; "
                             "set reference: frozen_copy or add lora: {r: 16}")
        if self.clip_ratio_c is not None and self.policy_objective != "clip":
            raise ValueError(f"clip_ratio_c (dual-clip) bounds the clipped objective; it needs policy_objective: "
                             f"clip (got {self.policy_objective}, which caps at cispo_cap); remove clip_ratio_c")
        if "routing_replay_threshold" in self.model_fields_set and self.routing_replay != "auto":
            raise ValueError(f"routing_replay_threshold only applies with routing_replay: auto (got "
                             f"{self.routing_replay}); set routing_replay: auto or remove routing_replay_threshold")
        if self.kl_ratio_correction and self.kl_mode != "loss":
            raise ValueError("kl_ratio_correction reweights the KL term of the loss; it needs kl_mode: loss "
                             "(the reward's KL has no gradient to correct); remove kl_ratio_correction")
        if self.max_staleness and (self.rollout.mode == "colocate" or self.offload):
            why = ("rollout.mode: colocate runs the engine in this process, on the training weights, so rollout "
                   "cannot overlap training; start workers with `align rollout serve` and set rollout: {mode: "
                   "server, servers: [...]}" if self.rollout.mode == "colocate" else
                   "offload moves the trainer's state away while the engine generates, which is all the time "
                   "with overlap; set offload: false")
            raise ValueError(f"stages.{self.name}.max_staleness: {why}, or set max_staleness: 0")
        if self.sampling.temperature == 0:
            raise ValueError("sampling.temperature: 0 makes every sample of a group the same greedy answer, "
                             "so no group has an advantage; sample at a temperature > 0 (DeepSeekMath: 1.0)")
        return self


Stage = Annotated[Union[SFTStage, RewardModelStage, GRPOStage, DPOStage], Field(discriminator="kind")]


class LoggingConfig(Strict):
    report_to: list[Literal["tensorboard", "wandb", "none"]] = Field(["tensorboard"], description=(
        "Trackers that receive every logged step besides `<stage>/metrics.jsonl` (always written): "
        "tensorboard (events under the stage directory), wandb (needs wandb installed), none."))


class EvaluateConfig(Strict):
    """The side-by-side evaluation `align train` runs once every stage is done (`align eval
    RUN_DIR` with these settings): each policy stage's final checkpoint on the same suites, so SFT
    and both RL stages, and the alignment tax between them, sit in one table (`<output_dir>/eval/`)."""

    suites: Annotated[list[str], Field(min_length=1)] = Field(["math", "safety"], description=(
        "Suites to run: math, code, safety, reward, loss, or a user suite YAML file (docs/evaluation.md)."))
    stages: list[str] = Field([], description="Policy stages to compare, in order; empty = all of them.")
    base_model: bool = Field(False, description="Also evaluate the recipe's `model` (before any stage), as the "
                                                "first column `base`, so the table shows what SFT changed; the "
                                                "reward suite's win rate stays against the first policy stage.")
    judge: str | None = Field(None, description="reward_model stage (or model dir) for the `reward` suite.")
    prompts: dict[str, str] = Field({}, description="suite -> prompts file; default: held-out synthetic.")
    limit: int | None = Field(None, gt=0, description="Prompts per suite; null: the suite's default (100 "
                                                      "held-out synthetic rows) or the whole prompts file.")
    engine: Literal["auto", "hf", "vllm"] = Field("hf", description="Generation engine: hf (transformers), vllm, "
                                                                    "or auto (vllm when installed, else hf).")
    k: list[Annotated[int, Field(ge=1)]] = Field([], description="pass@k for math/code, from max(k) samples per "
                                                                 "prompt at `temperature`; [] = greedy only.")
    temperature: float = Field(0.8, ge=0, description="Temperature of the pass@k samples (used only when k is "
                                                      "set); greedy metrics use 0.")
    max_new_tokens: int = Field(256, gt=0, description="Completion length limit in tokens, every suite.")
    max_prompt_len: int = Field(512, gt=0, description="Prompt tokens kept (the last ones), as GRPO's "
                                                       "max_prompt_len cuts them.")
    math_strict: bool = Field(True, description="math suite: only an anchored value counts (\"The answer is "
                                                "7.\", \\boxed{7}), as math_accuracy's default `strict`; false = "
                                                "math-verify's default, the last expression evaluated (docs/rewards.md).")


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
    name: str = Field("run", description="Run name, recorded in manifest.json and shown by `--dry-run`.")
    output_dir: str = Field("runs/run", description=(
        "Run directory: manifest.json, a directory per stage (checkpoints, final/, metrics), caches and "
        "eval/. Rerunning the recipe resumes from it."))
    seed: int = Field(0, description="Seed of every stage that sets none.")
    model: ModelConfig = Field(description="The base model.")
    synth: list[SynthSpec] = Field([], description="Synthetic data files written before the stages run.")
    stages: Annotated[list[Stage], Field(min_length=1)] = Field(description=(
        "Stages, run in order; `kind` (sft, reward_model, grpo) selects each one's keys. DeepSeek-V2: sft, "
        "reward models, grpo for reasoning, grpo for preferences."))
    logging: LoggingConfig = Field(LoggingConfig(), description="Where metrics go.")
    evaluate: EvaluateConfig | None = Field(None, description="Side-by-side evaluation of the policy stages once "
                                                              "the run is done; null: none.")
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
