"""Checkpoints that are never half-written and resume a run exactly.

Layout of `<stage_dir>/checkpoint-<step>/`:
  - the model as a Hugging Face directory (safetensors + config + tokenizer; a LoRA run keeps
    its adapter here), loadable by transformers and vLLM as is;
  - `optimizer.safetensors` + `trainer_state.json`: optimizer tensors, scheduler, step counters,
    data position and any extra state (reward normaliser, rollout seeds) — JSON and safetensors
    only, no pickle anywhere, so loading a checkpoint never executes code;
  - `rng_rank<r>.safetensors` + `rng_rank<r>.json`: every RNG of every rank.
A checkpoint is written into a temporary directory, fsynced, then renamed; `<stage_dir>/latest`
is replaced atomically afterwards, so it only ever names a complete checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from align.errors import AlignError
from align.train_utils import base_of
from align.sharding import DEFAULT_GROUP_BYTES, gather_full, gathered_weights, hf_name, is_sharded

LATEST = "latest"
PREFIX = "checkpoint-"
TRASH = ".trash-"
WRITE_ERRORS = (OSError, SafetensorError)  # safetensors reports I/O failures as its own type


# ------------------------------------------------------------------------------ filesystem


def _fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def commit_dir(tmp: Path, final: Path) -> None:
    """fsync `tmp` and rename it to `final`. An older copy of `final` is first renamed to
    `.trash-<name>`, which `restore_replaced` puts back if the process dies between the renames."""
    _fsync_tree(tmp)
    if final.exists():
        trash = final.with_name(f"{TRASH}{final.name}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def restore_replaced(final: Path) -> None:
    """Undo a `commit_dir` cut off between its two renames: the old complete copy comes back."""
    trash = final.with_name(f"{TRASH}{final.name}")
    if not final.exists() and trash.is_dir():
        try:
            os.replace(trash, final)
        except FileNotFoundError:  # another rank restored it first
            return
        _fsync_dir(final.parent)


def write_error(exc: BaseException) -> str:
    """Why a write failed, in words: a full disk and a file-size limit get named as such."""
    text = str(getattr(exc, "strerror", None) or exc)
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or "os error 28" in text or "os error 122" in text:
        return f"the disk is full ({text})"
    if code == errno.EFBIG or "os error 27" in text:
        return f"a file size limit was hit ({text}; see `ulimit -f`)"
    return text


# ------------------------------------------------------------------------------ state pieces


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (safetensors) and the JSON-able rest."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    np_state = np.random.get_state()
    meta = {"python": _jsonable(random.getstate()),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, *rest = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


# ------------------------------------------------------------------------------ public API


def save_model_dir(out: Path, model: torch.nn.Module, tokenizer, state_dict: dict | None = None) -> None:
    """Write `model` (already unwrapped) as a Hugging Face directory with safetensors."""
    model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def _rank(accelerator) -> tuple[int, bool]:
    """(rank, is main) from the accelerator, or from torch.distributed when a sharded run has none."""
    if accelerator is not None:
        return accelerator.process_index, accelerator.is_main_process
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, rank == 0


def _barrier(accelerator) -> None:
    if accelerator is not None:
        accelerator.wait_for_everyone()
    elif dist.is_initialized():
        dist.barrier()


def save_checkpoint(stage_dir: str | Path, step: int, *, model: torch.nn.Module, tokenizer,
                    optimizer: torch.optim.Optimizer | None, scheduler, state: dict,
                    accelerator=None, keep_last: int = 2) -> Path:
    """Atomically write checkpoint-<step> and point `latest` at it; prune to `keep_last`.
    A model sharded with `align.sharding.shard_model` is saved shard by shard (`save_shards`):
    every rank writes its own model and optimizer shards; call it on every rank."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    rank, is_main = _rank(accelerator)
    name = f"{PREFIX}{step}"
    final = stage_dir / name
    tmp = stage_dir / f".tmp-{name}"
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    sharded = is_sharded(unwrapped)
    sd = accelerator.get_state_dict(model) if accelerator is not None and not sharded else None
    try:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier(accelerator)
        meta: dict[str, Any] = {"step": step, "state": state}
        if sharded:
            meta.update(save_shards(tmp / SHARDS, unwrapped, optimizer))
        elif is_main:
            save_model_dir(tmp, unwrapped, tokenizer, sd)
            if optimizer is not None:
                tensors, meta["optimizer"] = optimizer_to_files(optimizer)
                save_file(tensors, tmp / "optimizer.safetensors")
        if is_main:
            if scheduler is not None:
                meta["scheduler"] = scheduler.state_dict()
            (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=1, default=_json_default))
        rng_t, rng_m = rng_state()
        save_file(rng_t, tmp / f"rng_rank{rank}.safetensors")
        (tmp / f"rng_rank{rank}.json").write_text(json.dumps(rng_m))
        _barrier(accelerator)
        if is_main:
            commit_dir(tmp, final)
            write_text_atomic(stage_dir / LATEST, name + "\n")
            prune(stage_dir, keep_last)
    except WRITE_ERRORS as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AlignError(f"could not write checkpoint {final}: {write_error(exc)}. The previous "
                         f"checkpoint ({latest_checkpoint(stage_dir)}) is intact; free disk space "
                         "and resume with the same command.") from None
    _barrier(accelerator)
    return final


# ------------------------------------------------------------------------------ sharded state
#
# Format: torch.distributed.checkpoint (DCP) with its Hugging Face storage writer, so that no
# pickle is written: DCP's default FileSystemWriter stores `.distcp` files plus a pickled
# `.metadata`; `HuggingFaceStorageWriter(save_distributed=True)` writes one safetensors file per
# rank (`shard-0000<r>-model-00001-of-00001.safetensors`) whose header holds each tensor's offset
# in the full tensor, and `HuggingFaceStorageReader` rebuilds the metadata from those headers.
# Only tensors go there; optimizer hyper-parameters and scalars go to trainer_state.json. DCP
# reshards on load, so a checkpoint can be resumed on a different number of ranks.

SHARDS = "shards"
_MODEL, _OPTIM = "model::", "optimizer::"


def _sharded_state(model: torch.nn.Module, optimizer) -> tuple[dict, dict | None]:
    """The DCP state dicts of a sharded model (trainable parameters only: a LoRA run's frozen
    base comes from the init model) and of its optimizer (keyed by parameter name)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(ignore_frozen_params=True)
    msd = get_model_state_dict(model, options=options)
    osd = get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
    return msd, osd


def _flat_tensors(msd: dict, osd: dict | None, aliases: set[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """One flat name -> tensor dict for DCP (a tied head, stored under `aliases`, left out: it is
    the embedding), and the JSON-able rest of the optimizer state. DCP loads into these tensors."""
    flat = {_MODEL + k: v for k, v in msd.items() if k not in aliases}
    scalars: dict[str, dict[str, Any]] = {}
    for fqn, entry in (osd or {}).get("state", {}).items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                flat[f"{_OPTIM}{fqn}::{key}"] = value
            else:
                scalars.setdefault(fqn, {})[key] = value
    return flat, {"param_groups": osd["param_groups"], "scalars": scalars} if osd is not None else {}


def save_shards(path: Path, model: torch.nn.Module, optimizer) -> dict:
    """Every rank writes its model and optimizer shards under `path` (a collective). Returns the
    entries for trainer_state.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    msd, osd = _sharded_state(model, optimizer)
    flat, opt_meta = _flat_tensors(msd, osd, tied_aliases(model))
    dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(path), save_distributed=True))
    out: dict[str, Any] = {"sharded": {"format": "dcp-safetensors", "world_size": dist.get_world_size()}}
    if opt_meta:
        out["optimizer"] = opt_meta
    return out


def load_shards(path: Path, model: torch.nn.Module, optimizer, opt_meta: dict | None) -> None:
    """Load the shards `save_shards` wrote into an already sharded `model` (and `optimizer`),
    bitwise, on any number of ranks (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    msd, osd = _sharded_state(model, optimizer)  # templates; an empty optimizer state is initialised
    flat, _ = _flat_tensors(msd, osd, tied_aliases(model))
    dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(path)))  # into msd's / osd's tensors
    options = StateDictOptions(ignore_frozen_params=True)
    set_model_state_dict(model, msd, options=options)
    if optimizer is not None:
        for fqn, entry in opt_meta["scalars"].items():
            osd["state"].setdefault(fqn, {}).update(entry)
        set_optimizer_state_dict(model, optimizer, {"state": osd["state"], "param_groups": opt_meta["param_groups"]},
                                 options=options)


def is_sharded_checkpoint(path: str | Path) -> bool:
    """True for a checkpoint written from a sharded model: its weights are in `shards/`, so a
    resume builds the model from the stage's init weights, shards it, then `load_checkpoint`s."""
    return (Path(path) / SHARDS).is_dir()


def _json_default(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.tolist()
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in trainer_state.json")


def prune(stage_dir: Path, keep_last: int) -> None:
    """Keep the checkpoint `latest` names and the `keep_last - 1` before it. Checkpoints with a
    later step belong to an abandoned run (one restarted from scratch), so they go too; so do
    leftovers of writes that a killed process never finished."""
    current = latest_checkpoint(stage_dir)
    if current is None:
        return
    newest = int(current.name[len(PREFIX):])
    steps = sorted(checkpoint_steps(stage_dir))
    keep = set([s for s in steps if s <= newest][-max(keep_last, 1):])
    for step in steps:
        if step not in keep:
            shutil.rmtree(stage_dir / f"{PREFIX}{step}", ignore_errors=True)
    for junk in [*stage_dir.glob(".tmp-*"), *stage_dir.glob(TRASH + "*"), *stage_dir.glob(f".{LATEST}.tmp-*")]:
        if junk.is_dir():
            shutil.rmtree(junk, ignore_errors=True)
        else:
            junk.unlink(missing_ok=True)


def checkpoint_steps(stage_dir: Path) -> list[int]:
    return [int(p.name[len(PREFIX):]) for p in stage_dir.glob(f"{PREFIX}*")
            if p.name[len(PREFIX):].isdigit() and (p / "trainer_state.json").exists()]


def latest_checkpoint(stage_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names, or None. Never guesses from directory names."""
    marker = Path(stage_dir) / LATEST
    if not marker.exists():
        return None
    name = marker.read_text().strip()
    if not (name.startswith(PREFIX) and name[len(PREFIX):].isdigit()):
        raise AlignError(f"{marker}: names {name!r}, not a checkpoint-<step> directory; delete the "
                         "file to start this stage over")
    path = Path(stage_dir) / name
    restore_replaced(path)
    return path if (path / "trainer_state.json").exists() else None


def forget_latest(stage_dir: str | Path) -> None:
    """Drop the `latest` pointer of a stage that starts over, so that a run killed before its
    first save cannot resume from the abandoned run's checkpoint."""
    (Path(stage_dir) / LATEST).unlink(missing_ok=True)


def load_checkpoint(path: str | Path, *, optimizer=None, scheduler=None, rank: int = 0, model=None) -> dict:
    """Restore optimizer, scheduler and RNG from `path` (model weights are loaded by the caller
    through from_pretrained); returns the saved `state` dict (step counters, data position...).
    A sharded checkpoint also restores the weights: pass the sharded `model` (every rank calls it)."""
    path = Path(path)
    meta = json.loads((path / "trainer_state.json").read_text())
    if "sharded" in meta:
        if model is None or not is_sharded(model):
            raise AlignError(f"{path} holds sharded weights (written under distributed.strategy: fsdp2); "
                             "resume it with strategy fsdp2 (any number of ranks)")
        load_shards(path / SHARDS, model, optimizer, meta.get("optimizer"))
    elif optimizer is not None:
        optimizer_from_files(optimizer, load_file(path / "optimizer.safetensors"), meta["optimizer"])
    if scheduler is not None and "scheduler" in meta:
        scheduler.load_state_dict(meta["scheduler"])
    rng_file = path / f"rng_rank{rank}.safetensors"
    if rng_file.exists():
        set_rng_state(load_file(rng_file), json.loads((path / f"rng_rank{rank}.json").read_text()))
    return {"step": meta["step"], **meta["state"]}


def save_final(stage_dir: str | Path, *, model: torch.nn.Module, tokenizer, accelerator=None,
               merge_lora: bool = True) -> Path:
    """Atomically write `<stage_dir>/final/`: a plain Hugging Face model directory. A LoRA model
    is merged first when `merge_lora` (so transformers, vLLM and lm-eval load it as is). A sharded
    model is assembled from its shards group by group (`save_gathered`); call it on every rank."""
    stage_dir = Path(stage_dir)
    final = stage_dir / "final"
    tmp = stage_dir / ".tmp-final"
    _, is_main = _rank(accelerator)
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    sharded = is_sharded(unwrapped)
    sd = accelerator.get_state_dict(model) if accelerator is not None and not sharded else None
    try:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if sharded:
            save_gathered(tmp, unwrapped, tokenizer, merge_lora=merge_lora)
        elif is_main:
            if merge_lora and hasattr(unwrapped, "merge_and_unload"):
                unwrapped, sd = unwrapped.merge_and_unload(), None
            save_model_dir(tmp, unwrapped, tokenizer, sd)
        if is_main:
            commit_dir(tmp, final)
    except WRITE_ERRORS as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AlignError(f"could not write {final}: {write_error(exc)}; free disk space and "
                         "rerun the same command (it resumes from the last checkpoint)") from None
    _barrier(accelerator)
    return final


def save_gathered(out: Path, model: torch.nn.Module, tokenizer, *, merge_lora: bool = True,
                  group_bytes: int = DEFAULT_GROUP_BYTES) -> None:
    """Write a sharded model as a Hugging Face directory from rank 0, one safetensors file per
    gathered group (`model-0000i-of-0000n.safetensors` + index, or `model.safetensors`), so rank 0
    never holds more than one group. A collective: every rank calls it; only rank 0 writes. A
    write error on rank 0 is raised after the gathering ends, so the other ranks never hang.
    With `merge_lora=False` a peft model is saved as its adapter only."""
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    if not merge_lora and hasattr(model, "peft_config"):
        adapter = {k: gather_full(v) for k, v in model.state_dict().items() if "lora_" in k
                   or "modules_to_save" in k}
        if is_main:
            model.save_pretrained(out, state_dict={k: v.cpu() for k, v in adapter.items()})
            if tokenizer is not None:
                tokenizer.save_pretrained(out)
        return
    base = base_of(model)
    aliases = {hf_name(n) for n in tied_aliases(base)}
    files: list[list[str]] = []  # tensor names of each written part
    error: BaseException | None = None
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    for group in gathered_weights(model, group_bytes):
        tensors = {n: t.detach().cpu().contiguous() for n, t in group if n not in aliases}
        if not is_main or error is not None or not tensors:
            continue
        try:
            save_file(tensors, out / f".part-{len(files)}.safetensors", metadata={"format": "pt"})
            files.append(list(tensors))
        except WRITE_ERRORS as exc:
            error = exc
    if not is_main:
        return
    if error is not None:
        raise error
    _name_parts(out, files)
    base.config.save_pretrained(out)
    if getattr(base, "generation_config", None) is not None and base.can_generate():
        base.generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def tied_aliases(model: torch.nn.Module) -> set[str]:
    """Names of parameters that are another parameter under a second name (a tied LM head):
    `save_pretrained` leaves them out and transformers ties them again at load."""
    seen: set[int] = set()
    aliases = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            aliases.add(name)
        seen.add(id(p))
    return aliases


def _name_parts(out: Path, names: list[list[str]]) -> None:
    """Give the `.part-<i>` files Hugging Face's names, with an index when there are several."""
    if len(names) == 1:
        os.replace(out / ".part-0.safetensors", out / "model.safetensors")
        return
    weight_map = {}
    for i, part in enumerate(names):
        file = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        os.replace(out / f".part-{i}.safetensors", out / file)
        weight_map.update(dict.fromkeys(part, file))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
