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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from align.errors import AlignError

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


def save_checkpoint(stage_dir: str | Path, step: int, *, model: torch.nn.Module, tokenizer,
                    optimizer: torch.optim.Optimizer | None, scheduler, state: dict,
                    accelerator=None, keep_last: int = 2) -> Path:
    """Atomically write checkpoint-<step> and point `latest` at it; prune to `keep_last`."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    rank = accelerator.process_index if accelerator is not None else 0
    is_main = accelerator is None or accelerator.is_main_process
    name = f"{PREFIX}{step}"
    final = stage_dir / name
    tmp = stage_dir / f".tmp-{name}"
    if accelerator is not None:
        sd = accelerator.get_state_dict(model)  # collective under ZeRO-3/FSDP: all ranks call it
        unwrapped = accelerator.unwrap_model(model)
    else:
        sd, unwrapped = None, model
    try:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        if accelerator is not None:
            accelerator.wait_for_everyone()
        if is_main:
            save_model_dir(tmp, unwrapped, tokenizer, sd)
            meta: dict[str, Any] = {"step": step, "state": state}
            if optimizer is not None:
                tensors, opt_meta = optimizer_to_files(optimizer)
                save_file(tensors, tmp / "optimizer.safetensors")
                meta["optimizer"] = opt_meta
            if scheduler is not None:
                meta["scheduler"] = scheduler.state_dict()
            (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=1, default=_json_default))
        rng_t, rng_m = rng_state()
        save_file(rng_t, tmp / f"rng_rank{rank}.safetensors")
        (tmp / f"rng_rank{rank}.json").write_text(json.dumps(rng_m))
        if accelerator is not None:
            accelerator.wait_for_everyone()
        if is_main:
            commit_dir(tmp, final)
            write_text_atomic(stage_dir / LATEST, name + "\n")
            prune(stage_dir, keep_last)
    except WRITE_ERRORS as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AlignError(f"could not write checkpoint {final}: {write_error(exc)}. The previous "
                         f"checkpoint ({latest_checkpoint(stage_dir)}) is intact; free disk space "
                         "and resume with the same command.") from None
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return final


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


def load_checkpoint(path: str | Path, *, optimizer=None, scheduler=None, rank: int = 0) -> dict:
    """Restore optimizer, scheduler and RNG from `path` (model weights are loaded by the caller
    through from_pretrained); returns the saved `state` dict (step counters, data position...)."""
    path = Path(path)
    meta = json.loads((path / "trainer_state.json").read_text())
    if optimizer is not None:
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
    is merged first when `merge_lora` (so transformers, vLLM and lm-eval load it as is)."""
    stage_dir = Path(stage_dir)
    final = stage_dir / "final"
    is_main = accelerator is None or accelerator.is_main_process
    sd = accelerator.get_state_dict(model) if accelerator is not None else None
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    if is_main:
        tmp = stage_dir / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        if merge_lora and hasattr(unwrapped, "merge_and_unload"):
            unwrapped, sd = unwrapped.merge_and_unload(), None
        try:
            save_model_dir(tmp, unwrapped, tokenizer, sd)
            commit_dir(tmp, final)
        except WRITE_ERRORS as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise AlignError(f"could not write {final}: {write_error(exc)}; free disk space and "
                             "rerun the same command (it resumes from the last checkpoint)") from None
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return final
