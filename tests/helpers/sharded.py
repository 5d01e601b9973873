"""Child program of tests/test_sharding.py: a few AdamW steps on a nano model, sharded with FSDP2
over the gloo ranks that torchrun started, or in one process (`run` called without a process
group). The checks that need the live sharded model run here and report as JSON in `out`.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/helpers/sharded.py ARGS_JSON
"""

from __future__ import annotations

import json
import os
import signal
import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file

from align.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_final
from align.offload import Offloader
from align.recipe.schema import DistributedConfig
from align.sharding import clip_grad_norm, gathered_weights, gradient_sync, resolve_strategy, shard_for_stage
from align.train_utils import apply_lora, build_optimizer, build_scheduler, make_accelerator

GLOBAL_BATCH, SEQ, STEPS = 4, 16, 3
STAGE = SimpleNamespace(lr=1e-3, weight_decay=0.1, warmup_ratio=0.0, scheduler="linear", max_grad_norm=1.0,
                        bf16=False)
DISTRIBUTED = DistributedConfig(strategy="fsdp2")
LORA = SimpleNamespace(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
SMALL_GROUP = 64 * 1024  # bytes: forces many groups out of a 0.2M-parameter model


def build(model_dir: str, lora: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if lora:
        torch.manual_seed(0)
        model = apply_lora(model, LORA)
    return model


def batches(vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(STEPS)]


def backward(model, ids: torch.Tensor, rank: int, world: int) -> None:
    """This rank's share of the global batch, one row per micro-batch (sharded: the gradient
    reduce-scatter skipped until the last one); the loss is normalised by the global token count
    and scaled by `world`, so FSDP's gradient average is the single-process mean."""
    rows = ids.chunk(world)[rank].split(1)
    for i, row in enumerate(rows):
        with gradient_sync(model, i == len(rows) - 1) if world > 1 else nullcontext():
            logits = model(input_ids=row).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), row[:, 1:].reshape(-1),
                                   reduction="sum")
            (loss * world / (ids.shape[0] * (SEQ - 1))).backward()


def local_bits(model, opt) -> dict[str, torch.Tensor]:
    """Raw bytes of this rank's local shards: parameters, gradients, optimizer state."""
    def bits(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.detach().reshape(-1).contiguous().view(torch.uint8).clone()

    out = {}
    for name, p in model.named_parameters():
        out[name] = bits(p)
        if p.grad is not None:
            out[name + ".grad"] = bits(p.grad)
        for k, v in opt.state.get(p, {}).items():
            out[f"{name}.{k}"] = bits(v)
    return out


def offload_roundtrip(model, opt) -> dict:
    """Offload and reload the local shards; report what moved and whether every byte came back."""
    import gc
    import weakref

    before = local_bits(model, opt)
    locals_ = [p.to_local() for p in model.parameters()]
    storages = [weakref.ref(t.untyped_storage()) for t in locals_ if t.numel()]
    del locals_
    off = Offloader(model, opt)
    moved = off.offload().bytes_moved
    gc.collect()
    report = {"moved": moved, "released": all(r() is None for r in storages),
              "empty": all(p.to_local().numel() == 0 for p in model.parameters())}
    off.reload()
    after = local_bits(model, opt)
    report["bitwise"] = after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    report["keys"] = len(before)
    return report


def gathered_check(model, model_dir: str, lora: bool, full: dict | None) -> dict:
    """gathered_weights of the sharded model against the unsharded reference: a fresh model given
    torch's own full state dict, named and merged by the trainer's `policy_weights`."""
    groups = list(gathered_weights(model, SMALL_GROUP))
    report = {"groups": len(groups), "empty": all(not g for g in groups)}
    if full is None:
        return report
    from align.weights import policy_weights

    plain = build(model_dir, lora)
    plain.load_state_dict(full)
    want = dict(policy_weights(plain))
    got = dict(pair for g in groups for pair in g)
    report["sizes"] = [sum(t.numel() * t.element_size() for _, t in g) for g in groups]
    report["same_names"] = sorted(got) == sorted(want)
    report["mismatch"] = [k for k in want if k not in got or not torch.equal(got[k], want[k])]
    return report


def run(args: dict, acc=None):
    """Train; `acc` is the accelerator of a torchrun child (None: one process, unsharded)."""
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    sharded = acc is not None and resolve_strategy(DISTRIBUTED, acc) == "fsdp2"
    rank, world = (acc.process_index, acc.num_processes) if sharded else (0, 1)
    out = Path(args["out"])
    model = build(args["model_dir"], args["lora"])
    if sharded:
        shard_for_stage(model, DISTRIBUTED, STAGE, acc)
    opt = build_optimizer(model, STAGE)
    sched = build_scheduler(opt, STAGE, STEPS)
    data = batches(model.config.vocab_size)
    start = 0
    if args.get("resume"):
        start = load_checkpoint(latest_checkpoint(out / "stage"), optimizer=opt, scheduler=sched, rank=rank,
                                model=model)["step"]
    report: dict = {"start": start}
    for step in range(start, STEPS):
        backward(model, data[step], rank, world)
        if args.get("checks") and step == 1:  # optimizer state and fresh gradients both present
            report["offload"] = offload_roundtrip(model, opt)
        clip_grad_norm(model, STAGE.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if args.get("kill_after") == step + 1:
            save_checkpoint(out / "stage", step + 1, model=model, tokenizer=None, optimizer=opt, scheduler=sched,
                            state={"marker": step + 1}, accelerator=acc)
            os.kill(os.getpid(), signal.SIGKILL)
    full = full_state(model) if sharded else {k: v.detach() for k, v in model.state_dict().items()}
    if rank == 0:
        save_file({k: v.clone().contiguous() for k, v in full.items()}, out / "weights.safetensors")
    if args.get("checks"):
        report["gathered"] = gathered_check(model, args["model_dir"], args["lora"], full if rank == 0 else None)
        tokenizer = AutoTokenizer.from_pretrained(args["model_dir"])
        save_final(out / "stage", model=model, tokenizer=tokenizer, accelerator=acc)
        if args["lora"]:  # lora.merge_on_save: false keeps the adapter alone
            save_final(out / "adapter", model=model, tokenizer=tokenizer, accelerator=acc, merge_lora=False)
    (out / f"report{rank}.json").write_text(json.dumps(report))
    return model


def full_state(model) -> dict | None:
    """torch's own gathering (rank 0 gets the full tensors), the reference for ours."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return full if dist.get_rank() == 0 else None


if __name__ == "__main__":
    torch.set_num_threads(1)
    accelerator = make_accelerator(STAGE)  # what the stages do: cpu=True, so torchrun's ranks form a gloo group
    assert accelerator.num_processes == 2, accelerator.state
    try:
        run(json.loads(sys.argv[1]), accelerator)
    finally:
        dist.destroy_process_group()
