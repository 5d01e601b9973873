"""Run `align train` as a real subprocess, interrupt it at a chosen step, and compare runs.

Shared by the reliability tests (tests/test_reliability_*.py): they need a separate process
because SIGKILL and SIGTERM must hit a real `align train`, not the test runner.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
# keys that measure wall time, so they differ between any two runs
TIMING_KEYS = ("time/", "tokens_per_s")


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def env() -> dict[str, str]:
    """One thread per run: the same reduction order in every run, and gentle on a shared machine."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1"}


def train_cmd(recipe: Path, args: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "align", "train", str(recipe), *args]


def train(recipe: Path, timeout: float = 300, args: Sequence[str] = (), cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run `align train RECIPE [ARGS]` to its end (or to an error); relative paths resolve in `cwd`."""
    return subprocess.run(train_cmd(recipe, args), cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def metric_steps(stage_dir: Path) -> list[int]:
    path = stage_dir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):  # a line being written right now
            pass
    return steps


def interrupt_at(recipe: Path, stage_dir: Path, step: int, sig: int, timeout: float = 300,
                 args: Sequence[str] = (), cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Start `align train RECIPE [ARGS]`, send `sig` as soon as step `step` is logged and a
    checkpoint exists, and wait for the process to end."""
    proc = subprocess.Popen(train_cmd(recipe, args), cwd=cwd, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if (stage_dir / "latest").exists() and max(metric_steps(stage_dir), default=-1) >= step:
                proc.send_signal(sig)
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"step {step} never logged in {stage_dir}")
            time.sleep(0.02)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def comparable_metrics(stage_dir: Path) -> list[dict]:
    """metrics.jsonl rows without their wall-time keys."""
    from align.tracking import read_metrics

    return [{k: v for k, v in row.items() if not k.startswith(TIMING_KEYS)} for row in read_metrics(stage_dir)]


def max_abs_diff(a: Path, b: Path) -> float:
    """Largest absolute difference between the tensors of two safetensors files (same names required)."""
    from safetensors.torch import load_file

    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys(), (sorted(ta.keys() ^ tb.keys()))
    return max(float((ta[k].double() - tb[k].double()).abs().max()) if ta[k].numel() else 0.0 for k in ta)


def manifest_status(output_dir: Path, stage: str) -> str:
    return json.loads((output_dir / "manifest.json").read_text())["stages"][stage]["status"]
