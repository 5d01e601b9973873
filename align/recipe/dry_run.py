"""`align train RECIPE --dry-run`: what a run will cost, without loading a single weight.

Parameters are counted exactly by instantiating the architecture on the meta device (no memory,
no weights). Memory per GPU follows where the code puts things (`memory_per_rank`): the model is
loaded in `model.dtype` and AdamW keeps its two moments in that dtype, so a full fine-tune holds
weights + gradients + 2 moments = 4 × dtype bytes per parameter (float32: 16); a LoRA run holds
the frozen base (1 × dtype bytes; the adapter is negligible); GRPO with beta > 0 and
`reference: frozen_copy` adds the frozen reference (1 × dtype bytes). Under
`distributed.strategy: ddp` every rank holds all of it; under `fsdp2` every part, the reference
included, is sharded and divided by the world size. Activations, and under fsdp2 the one layer
gathered at a time, are excluded (they depend on batch, length and checkpointing); the vLLM share
(`rollout.gpu_memory_utilization`) is reported separately.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from align.recipe.schema import GRPOStage, Recipe, RewardModelStage, SFTStage
from align.errors import AlignError

GIB = 1024**3


def model_config(recipe: Recipe):
    from transformers import AutoConfig

    path = Path(recipe.model.path)
    if (path / "config.json").exists():
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    if recipe.model.config:
        raw = json.loads(Path(recipe.model.config).read_text())
        return AutoConfig.for_model(raw.pop("model_type"), **raw)
    if recipe.model.tiny is not None:
        return None
    raise AlignError(f"--dry-run needs the model's config.json: {path} does not exist. Download "
                     "the model, or set `model.config` to a config.json (recipes/deepseek_v2/ ships some).")


def count_parameters(config) -> tuple[int, int]:
    """(total, active per token). For MoE, routed experts beyond top-k are inactive."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    routed = getattr(config, "n_routed_experts", None) or getattr(config, "num_local_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if not routed or not top_k:
        return total, total
    expert_params = sum(p.numel() for n, p in model.named_parameters()
                        if ".experts." in n or n.endswith(".experts.gate_up_proj")
                        or n.endswith(".experts.down_proj"))
    return total, total - int(expert_params * (1 - top_k / routed))


def _rows(stage, field: str, produced: dict[str, int]) -> int | None:
    """Rows a stage will read: declared counts, synthesised sizes, lines in existing files."""
    total = 0
    for src in getattr(stage, field):
        if src.count is not None:
            total += src.count
        elif str(Path(src.path)) in produced:
            total += produced[str(Path(src.path))]
        elif Path(src.path).is_file():
            with open(src.path, "rb") as fh:
                total += sum(1 for _ in fh)
        else:
            return None
    return total


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}  # auto: checkpoints are mostly bf16


def memory_per_rank(stage, params: int, dtype: str, strategy: str, world_size: int) -> float:
    """GiB one rank holds for `stage` (no activations): see the module docstring."""
    b = DTYPE_BYTES[dtype]
    per_param = b if stage.lora is not None else 4 * b
    if isinstance(stage, GRPOStage) and stage.beta > 0 and stage.reference == "frozen_copy":
        per_param += b
    shards = world_size if strategy == "fsdp2" else 1
    return params * per_param / shards / GIB


def stage_plan(stage, world_size: int, params: int | None, produced: dict[str, int],
               dtype: str = "float32", strategy: str = "ddp") -> dict:
    global_batch = stage.per_device_batch_size * stage.gradient_accumulation_steps * world_size
    plan: dict = {"stage": stage.name, "kind": stage.kind, "global batch": global_batch}
    if isinstance(stage, (SFTStage, RewardModelStage)):
        rows = _rows(stage, "data", produced)
        plan["examples"] = rows
        steps = stage.max_steps or (math.ceil(rows * stage.epochs / global_batch) if rows else None)
        plan["steps"] = steps
        plan["tokens (≤)"] = steps * global_batch * stage.max_seq_len if steps else None
    elif isinstance(stage, GRPOStage):
        rows = _rows(stage, "prompts", produced)
        per_step = stage.prompts_per_step * stage.group_size
        steps = stage.max_steps or (math.ceil(rows * stage.epochs / stage.prompts_per_step) if rows else None)
        plan.update({"prompts": rows, "samples/step": per_step, "steps": steps,
                     "generated tokens (≤)": steps * per_step * stage.sampling.max_new_tokens if steps else None})
    if params:
        key = f"memory/GPU (GiB, {strategy}, {dtype}, no activations)"
        plan[key] = round(memory_per_rank(stage, params, dtype, strategy, world_size), 1)
        if isinstance(stage, GRPOStage) and stage.rollout.engine == "vllm":
            plan["vLLM share of GPU"] = stage.rollout.gpu_memory_utilization
    return plan


def print_plan(recipe: Recipe, world_size: int | None = None) -> list[dict]:
    from rich.console import Console
    from rich.table import Table

    config = model_config(recipe)
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1" if config is None else "8"))
    console = Console()
    params = None
    if config is not None:
        total, active = count_parameters(config)
        params = total
        console.print(f"model: {config.model_type}, {total / 1e9:.2f}B parameters in total, "
                      f"{active / 1e9:.2f}B active per token; world size {world_size} "
                      "(set WORLD_SIZE to change)")
    else:
        console.print("model: tiny model built by the recipe (a few million parameters)")
    produced = {str(Path(s.out)): s.n for s in recipe.synth}
    plans = [stage_plan(s, world_size, params, produced, recipe.model.dtype, recipe.distributed.strategy)
             for s in recipe.stages]
    table = Table(title=f"dry run: {recipe.name}", header_style="bold")
    table.add_column("")
    for p in plans:
        table.add_column(f"{p['stage']} ({p['kind']})", justify="right")
    for key in dict.fromkeys(k for p in plans for k in p if k not in ("stage", "kind")):
        table.add_row(key, *[_cell(p.get(key)) for p in plans])
    console.print(table)
    return plans


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, int) else str(value)
