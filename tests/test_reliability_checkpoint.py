"""Checkpoints survive SIGKILL at any moment, a full disk, and pruning.

The kill test forks a child that saves checkpoints of a small model in a loop and SIGKILLs it at
seeded random moments; after every kill, `latest` must name a checkpoint that loads completely
(optimizer + RNG through `load_checkpoint`, weights through `from_pretrained`) and whose weights
are the ones saved for its step.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from align.checkpoint import TRASH, checkpoint_steps, forget_latest, latest_checkpoint, load_checkpoint
from align.errors import AlignError
from helpers.save_loop import save_forever, save_marked, save_under_fsize_limit, small_model, stepped_optimizer

KILLS = 12  # each kill starts a process that imports torch (~8 s)


@pytest.fixture(scope="module")
def mp_ctx():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["helpers.save_loop"])
    return ctx


def _wait_for_a_save_after(stage_dir: Path, step: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (found := latest_checkpoint(stage_dir)) is None or int(found.name.split("-")[-1]) <= step:
        assert time.monotonic() < deadline, f"no checkpoint after step {step} within {timeout_s} s"
        time.sleep(0.01)


def _verify(stage_dir: Path) -> int:
    """Load what `latest` names the way a resuming run does; returns its step."""
    from transformers import AutoModelForCausalLM

    path = latest_checkpoint(stage_dir)
    assert path is not None, f"no usable checkpoint under {stage_dir}: {sorted(os.listdir(stage_dir))}"
    model = AutoModelForCausalLM.from_pretrained(path)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = load_checkpoint(path, optimizer=opt)
    step = state["step"]
    assert path.name == f"checkpoint-{step}" and state["marker"] == step
    assert all(torch.all(p == step) for p in model.parameters())
    assert len(opt.state) == len(list(model.parameters()))
    newer = [s for s in checkpoint_steps(stage_dir) if s > step]
    assert newer in ([], [step + 1])  # at most the one committed just before `latest` moved
    return step


@pytest.mark.slow
def test_sigkill_during_saves_never_leaves_latest_unloadable(tmp_path, mp_ctx):
    ctx = mp_ctx
    rng = random.Random(7)
    stage_dir = tmp_path / "stage"
    # one complete checkpoint first, so that every kill has something to protect; its duration
    # scales the kill moments, so they land mid-write whatever the machine's speed
    model = small_model()
    started = time.monotonic()
    save_marked(stage_dir, 1, model, stepped_optimizer(model))
    save_s = time.monotonic() - started
    mid_write, steps = 0, []
    for i in range(KILLS):
        ready = ctx.Event()
        child = ctx.Process(target=save_forever, args=(stage_dir, ready), daemon=True)
        child.start()
        assert ready.wait(60), "save loop did not start"
        if i % 4 == 3:  # every fourth child first completes a save: progress is checked, not hoped for
            _wait_for_a_save_after(stage_dir, steps[-1])
        os.kill(child.pid, signal.SIGKILL) if child.join(rng.uniform(0.0, 2 * save_s)) is None else None
        child.join()
        assert child.exitcode == -signal.SIGKILL
        leftovers = [p.name for p in stage_dir.iterdir() if p.name.startswith((".tmp-", TRASH, ".latest.tmp"))]
        mid_write += bool(leftovers)
        steps.append(_verify(stage_dir))
    print(f"{KILLS} kills survived; {mid_write} landed mid-write; latest steps {steps}")
    assert steps == sorted(steps) and steps[-1] > 1  # progress is never lost
    assert mid_write > 0  # the kills did hit writes in progress


def test_a_kill_between_the_two_renames_of_a_resave_is_undone(tmp_path):
    model = small_model()
    opt = stepped_optimizer(model)
    path = save_marked(tmp_path, 3, model, opt)
    os.replace(path, tmp_path / f"{TRASH}{path.name}")  # what commit_dir leaves if killed mid-replace
    assert latest_checkpoint(tmp_path) == path and _verify(tmp_path) == 3


def _assert_previous_intact(stage_dir: Path, message: str) -> None:
    assert "checkpoint-2" in message and "checkpoint-1 is intact" in message.replace(")", "").replace(
        str(stage_dir) + "/", "") or f"({stage_dir / 'checkpoint-1'}) is intact" in message
    assert latest_checkpoint(stage_dir) == stage_dir / "checkpoint-1"
    assert _verify(stage_dir) == 1
    assert not [p for p in stage_dir.iterdir() if p.name.startswith(".tmp-")]


def test_file_size_limit_fails_cleanly_and_keeps_the_previous_checkpoint(tmp_path, mp_ctx):
    ctx = mp_ctx
    parent, child_end = ctx.Pipe()
    child = ctx.Process(target=save_under_fsize_limit, args=(tmp_path, 16_384, child_end))
    child.start()
    kind, message = parent.recv()
    child.join()
    assert kind == "AlignError", message
    assert "file size limit" in message and "resume with the same command" in message
    _assert_previous_intact(tmp_path, message)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (root only): a real ENOSPC."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_fails_cleanly_and_keeps_the_previous_checkpoint(small_tmpfs):
    # ~75k parameters: one checkpoint (weights + Adam moments) is ~0.9 MiB of the 1 MiB disk
    model = small_model(vocab=512, hidden=64, layers=1, tied=True)
    opt = stepped_optimizer(model)
    stage_dir = small_tmpfs / "stage"
    save_marked(stage_dir, 1, model, opt)
    with pytest.raises(AlignError) as err:
        save_marked(stage_dir, 2, model, opt)
    message = str(err.value)
    assert "disk is full" in message
    _assert_previous_intact(stage_dir, message)


@pytest.mark.parametrize("keep_last", [1, 2, 3])
def test_pruning_keeps_latest_and_drops_an_abandoned_runs_checkpoints(tmp_path, keep_last):
    model = small_model()
    opt = stepped_optimizer(model)
    for step in (7, 8, 9):  # an earlier run of the stage
        save_marked(tmp_path, step, model, opt, keep_last)
    forget_latest(tmp_path)  # the pipeline starts the stage over
    for step in range(1, 5):
        path = save_marked(tmp_path, step, model, opt, keep_last)
        assert latest_checkpoint(tmp_path) == path
        assert sorted(checkpoint_steps(tmp_path)) == list(range(max(1, step - keep_last + 1), step + 1))
    assert _verify(tmp_path) == 4


def test_a_latest_file_naming_anything_else_is_refused(tmp_path):
    (tmp_path / "latest").write_text("../../etc\n")
    with pytest.raises(AlignError, match="not a checkpoint-<step> directory"):
        latest_checkpoint(tmp_path)
