"""bench/grad_noise.py: the McCandlish noise-scale estimator by hand and on vectors with a known
mean and covariance, and the script end to end on a tiny model (real rollouts, real gradients)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align.data.io import write_jsonl
from align.data.synth import generate

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "grad_noise.py"
_spec = importlib.util.spec_from_file_location("grad_noise", SCRIPT)
grad_noise = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(grad_noise)


def test_noise_scale_by_hand():
    # |g_small|² = 5 at b = 1, |g_big|² = 2 at B = 4:
    # |G|² = (4·2 − 1·5) / 3 = 1, tr Σ = (5 − 2) / (1 − 1/4) = 4, B_simple = 4 / 1 = 4
    got = grad_noise.noise_scale(5.0, 2.0, 1, 4)
    assert got == pytest.approx({"true_grad_sq": 1.0, "trace_cov": 4.0, "b_simple": 4.0})
    assert grad_noise.noise_scale(1.0, 1.0, 1, 4)["b_simple"] == 0.0  # no spread: all signal
    assert grad_noise.noise_scale(0.0, 0.0, 1, 4)["b_simple"] == math.inf  # no signal at all


def test_measure_recovers_a_known_mean_and_covariance():
    # per-example gradients G + N(0, σ²I): |G|² = 4, tr Σ = σ²·d = 0.25·400 = 100, so B_simple = 25
    gen = torch.Generator().manual_seed(0)
    d, b, k = 400, 16, 64
    mean = torch.zeros(d)
    mean[:4] = 1.0
    batches = [(mean + 0.5 * torch.randn(b, d, generator=gen)).mean(0) for _ in range(k)]
    got = grad_noise.measure(batches, b)
    assert got["true_grad_sq"] == pytest.approx(4.0, rel=0.1)
    assert got["trace_cov"] == pytest.approx(100.0, rel=0.1)
    assert got["b_simple"] == pytest.approx(25.0, rel=0.15)
    # two batch means share |G|² = 4 of their |g|² ≈ 4 + 100/16: cosine ≈ 0.39
    assert got["cosine_between_batches"] == pytest.approx(4 / (4 + 100 / 16), abs=0.05)


def test_script_on_a_tiny_model(model_dir, tmp_path):
    prompts, convs, out = tmp_path / "p.jsonl", tmp_path / "c.jsonl", tmp_path / "report.json"
    write_jsonl(generate("math", 8, seed=1, form="prompts", max_operand=9), prompts)
    write_jsonl(generate("math", 8, seed=2, form="conversations", max_operand=9), convs)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(model_dir), "--prompts", str(prompts),
                           "--conversations", str(convs), "--heldout", str(prompts), "--batches", "2",
                           "--batch", "4", "--group-size", "2", "--max-new-tokens", "8", "--steps", "0.1",
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    # an untrained model answers nothing right: every group is all-zero, so GRPO has no gradient,
    # while the SFT loss has a large, consistent one
    assert report["sampled_reward"] == 0.0
    assert report["grpo"]["true_grad_sq"] == 0.0 and report["grpo"]["b_simple"] == math.inf
    assert report["sft"]["true_grad_sq"] > 0 and report["sft"]["cosine_between_batches"] > 0.5
    assert "gradient is zero" in proc.stdout and "greedy_along_grpo_gradient" not in report


def test_script_says_how_to_fix_too_few_rows(model_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    write_jsonl(generate("math", 3, seed=1, form="prompts", max_operand=9), prompts)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(model_dir), "--prompts", str(prompts),
                           "--conversations", str(prompts), "--batches", "2", "--batch", "4"],
                          capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0 and "need 8 prompts" in proc.stderr and "lower --batches" in proc.stderr
