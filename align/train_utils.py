"""Training-step pieces every align stage shares (SFT, reward model, GRPO): accelerator, model, optimizer,
schedule, gradient step. Each takes a stage config (`align.recipe.schema.StageBase`) so a recipe key means
the same thing in every stage.

Why not accelerate's own gradient accumulation: align normalises a loss by the number of target
tokens of the *whole* accumulated global batch (see `global_counts`), which needs the
micro-batches of one optimizer step in hand before the first backward. The accelerator is therefore
created with `gradient_accumulation_steps=1` and the trainers call `no_sync` themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from align.errors import AlignError


# ----------------------------------------------------------------------------- accelerator


def resolve_mixed_precision(bf16: bool | str) -> str:
    """accelerate's `mixed_precision` for a stage's `bf16` key: "auto" means bf16 autocast on a GPU
    that supports it and float32 otherwise (CPU bf16 autocast is slower than float32 there)."""
    if bf16 == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return "bf16" if bf16 else "no"


def make_accelerator(stage, log_dir: str | Path | None = None, report_to: list[str] | None = None):
    """An Accelerator for `stage`. With no GPU it is created with `cpu=True`, so that
    `accelerate launch --multi_gpu --num_processes 2` gives two gloo ranks on a CPU machine
    (without it each process believes it is alone; see recipes/accelerate/cpu_ddp2.yaml)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    trackers = [t for t in (report_to or []) if t != "none"]
    precision = resolve_mixed_precision(stage.bf16)
    if AcceleratorState._shared_state.get("_mixed_precision", precision) != precision:
        # accelerate keeps one state per process and refuses a new precision; stages of one recipe
        # may differ (an SFT stage in bf16 after one in float32): start the state over, keeping
        # the process group (PartialState)
        AcceleratorState._reset_state()
    return Accelerator(cpu=not torch.cuda.is_available(),
                       mixed_precision=precision,
                       gradient_accumulation_steps=1,
                       log_with=trackers or None, project_dir=str(log_dir) if log_dir else None)


def reduce_sum(accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over all ranks (a collective: every rank must call it); as is on one."""
    if accelerator is None or accelerator.num_processes == 1:
        return tensor
    return accelerator.reduce(tensor, reduction="sum")


def global_counts(accelerator, *local_counts: int) -> list[int]:
    """Each of `local_counts` summed over all ranks, in one collective (every rank must call it)."""
    device = accelerator.device if accelerator is not None else "cpu"
    return reduce_sum(accelerator, torch.tensor(local_counts, dtype=torch.long, device=device)).tolist()


def even_batches(n: int, batch_size: int, rank: int, world: int) -> list[range | None]:
    """This rank's share of `n` eval rows in batches, as ranges of row indices, padded with None
    so that every rank gets the same number of entries: under FSDP2 every forward is a collective,
    so a rank with no rows left still runs one (on a stand-in batch, its result discarded)."""
    per_rank = [range(start, min(start + batch_size, n)) for start in range(rank * batch_size, n, world * batch_size)]
    most = -(-n // (world * batch_size))
    return per_rank + [None] * (most - len(per_rank))


def mean_over_ranks(accelerator, values: torch.Tensor, select: torch.Tensor) -> float:
    """Mean of the selected finite `values` over all ranks (shares may differ in length); NaN if
    none. Every rank must call it with the same `select` pattern of calls."""
    keep = select & values.isfinite()
    totals = reduce_sum(accelerator, torch.stack([torch.where(keep, values, 0.0).sum(), keep.sum().double()]))
    return float(totals[0] / totals[1]) if totals[1] > 0 else math.nan


# ------------------------------------------------------------------------------------ model


def apply_lora(model, lora, adapter_dir: str | Path | None = None, task_type: str = "CAUSAL_LM"):
    """Wrap `model` with a peft LoRA adapter built from a recipe `lora:` section, or load the
    trainable adapter saved in `adapter_dir` (a LoRA checkpoint being resumed). For `SEQ_CLS`
    peft also trains and saves the new score head (`modules_to_save`)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_dir is not None:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, task_type=task_type)
    return get_peft_model(model, config)


def base_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (the model itself when unwrapped): what holds
    the HF parameter names, and what peft's `generate` calls directly, skipping the wrapper's forward."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def load_trainable_model(recipe, stage, init_model: str | Path, resume_from: str | Path | None = None,
                         loader: Callable[[Path], torch.nn.Module] | None = None, task_type: str = "CAUSAL_LM"):
    """The model a stage trains: `init_model` (or the full weights of a checkpoint being resumed),
    with LoRA and gradient checkpointing as the stage asks. A LoRA checkpoint holds only the
    adapter (and, for a reward model, its score head), so the base comes from `init_model` and
    the adapter from `resume_from`. `loader` reads a directory (default: a causal LM)."""
    from align.models.load import load_causal_lm

    lora = stage.lora
    weights = Path(resume_from if resume_from is not None and lora is None else init_model)
    model = (loader or (lambda path: load_causal_lm(path, dtype=recipe.model.dtype,
                                                   trust_remote_code=recipe.model.trust_remote_code,
                                                   allow_pickle=recipe.model.allow_pickle_weights)))(weights)
    if stage.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        if lora is not None:
            model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    if lora is not None:
        model = apply_lora(model, lora, adapter_dir=resume_from, task_type=task_type)
    return model


def load_frozen_copy(recipe, init_model: str | Path, device) -> torch.nn.Module:
    """A frozen copy of a stage's starting model on `device`, in eval mode (a KL reference)."""
    from align.models.load import load_causal_lm

    model = load_causal_lm(init_model, dtype=recipe.model.dtype, trust_remote_code=recipe.model.trust_remote_code,
                           allow_pickle=recipe.model.allow_pickle_weights).eval()
    return model.requires_grad_(False).to(device)


# ------------------------------------------------------------------------ optimizer + schedule


def build_optimizer(model, stage) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; biases and norm weights (1-D tensors) get no weight
    decay, as in TRL/transformers' Trainer."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": stage.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=stage.lr, fused=fusable(decay + no_decay))


def fusable(params: list[torch.Tensor]) -> bool:
    """torch's fused AdamW (one kernel over all tensors; transformers' default `adamw_torch_fused`):
    on CPU, one step over SmolLM2-135M took 0.16 s fused and 0.8-6 s with torch's default for-loop
    AdamW (1 thread, shared machine; docs/benchmarks.md). Same update rule, one kernel.
    Plain float tensors on CPU or CUDA only: sharded (DTensor) parameters keep the default."""
    from torch.distributed.tensor import DTensor

    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                                and not isinstance(p, DTensor) for p in params)


def build_scheduler(optimizer, stage, total_steps: int):
    """Warmup for `warmup_ratio` of the steps, then `scheduler` (constant | linear | cosine) decay."""
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[stage.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=math.ceil(stage.warmup_ratio * total_steps),
                         num_training_steps=total_steps)


def step_plan(stage, rows: int, world: int, unit: str) -> tuple[int, int, int]:
    """(global batch, optimizer steps per epoch, total steps) of a stage training on `rows` rows
    (`unit` names them in the error raised when they do not fill one global batch)."""
    global_batch = stage.per_device_batch_size * stage.gradient_accumulation_steps * world
    per_epoch = rows // global_batch
    if per_epoch == 0:
        raise AlignError(f"stage {stage.name!r}: {rows} {unit} are fewer than one global batch "
                         f"({stage.per_device_batch_size} per device × {world} processes × "
                         f"{stage.gradient_accumulation_steps} accumulation); lower them or add data")
    return global_batch, per_epoch, total_optimizer_steps(stage, per_epoch)


def load_for_training(accelerator, recipe, stage, init_model, resume_from, **load: Any):
    """The trainable model (`load_trainable_model`, `load` passed on), sharded by align itself
    under fsdp2 (FSDP2, never wrapped by accelerate); a sharded checkpoint's weights come later,
    from its shards (`load_checkpoint(model=...)`), onto the init model."""
    from align.checkpoint import is_sharded_checkpoint
    from align.sharding import resolve_strategy, shard_for_stage

    sharded = resolve_strategy(recipe.distributed, accelerator) == "fsdp2"
    if sharded and resume_from is not None and is_sharded_checkpoint(resume_from):
        resume_from = None
    model = load_trainable_model(recipe, stage, init_model, resume_from, **load)
    return shard_for_stage(model, recipe.distributed, stage, accelerator) if sharded else model


def accelerate_unsharded(accelerator, model, stage, total_steps: int):
    """(model, optimizer, schedule) over `model`'s trainable parameters: AdamW and the schedule
    over `total_steps`, prepared by accelerate unless the model is sharded (FSDP2)."""
    from align.sharding import is_sharded

    optimizer = build_optimizer(model, stage)
    scheduler = build_scheduler(optimizer, stage, total_steps)
    if not is_sharded(model):
        model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, scheduler


def prepare_training(accelerator, recipe, stage, init_model, resume_from, total_steps: int, **load: Any):
    """(model, optimizer, schedule) of a stage: `load_for_training` then `accelerate_unsharded`."""
    model = load_for_training(accelerator, recipe, stage, init_model, resume_from, **load)
    return accelerate_unsharded(accelerator, model, stage, total_steps)


def total_optimizer_steps(stage, steps_per_epoch: int) -> int:
    """`max_steps` when set, otherwise ceil(epochs × steps_per_epoch)."""
    if stage.max_steps is not None:
        return stage.max_steps
    if steps_per_epoch <= 0:
        raise AlignError(f"stage {stage.name!r}: not enough data for one optimizer step; lower "
                         "per_device_batch_size or gradient_accumulation_steps, or add data")
    return max(1, math.ceil(stage.epochs * steps_per_epoch))


# ------------------------------------------------------------------------------- one step


@contextmanager
def maybe_no_sync(accelerator, model, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP2) on all but the last
    micro-batch of an optimizer step."""
    from align.sharding import gradient_sync, is_sharded

    if is_sharded(model):
        with gradient_sync(model, sync):
            yield
        return
    with (nullcontext() if sync or accelerator is None else accelerator.no_sync(model)):
        yield


def backward(accelerator, loss: torch.Tensor) -> None:
    """`loss.backward()` through accelerate (mixed precision, DeepSpeed), undoing accelerate's
    own division by `gradient_accumulation_steps`: align's losses are already normalised."""
    accelerator.backward(loss * accelerator.gradient_accumulation_steps)


class NonFiniteGuard:
    """Skips optimizer steps whose gradient norm is NaN/inf and fails after `patience` in a row,
    so one bad batch does not poison the weights and a diverged run does not burn its budget."""

    def __init__(self, patience: int = 5):
        self.patience, self.consecutive, self.skipped = patience, 0, 0

    def ok(self, grad_norm: float, step: int) -> bool:
        if math.isfinite(grad_norm):
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.skipped += 1
        if self.consecutive >= self.patience:
            raise AlignError(f"gradient norm was non-finite for {self.consecutive} steps in a row "
                             f"(last at step {step}); lower `lr`, set `max_grad_norm`, or check the data")
        return False


def clip_grad_norm(accelerator, model, max_grad_norm: float | None) -> float:
    """Clip to `max_grad_norm` (None: only measure) and return the pre-clip global norm."""
    from align.sharding import clip_grad_norm as clip_sharded, is_sharded

    if is_sharded(model):
        return clip_sharded(model, max_grad_norm)
    params = [p for p in model.parameters() if p.requires_grad]
    norm = accelerator.clip_grad_norm_(params, max_grad_norm if max_grad_norm is not None else float("inf"))
    return float(norm)


def optimizer_step(accelerator, model, optimizer, scheduler, stage, guard: NonFiniteGuard, step: int) -> float:
    """Clip, step (unless the norm is non-finite), advance the schedule, zero grads; returns the norm."""
    norm = clip_grad_norm(accelerator, model, stage.max_grad_norm)
    if guard.ok(norm, step):
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def model_summary(model) -> dict[str, Any]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"params": total, "trainable_params": trainable}
