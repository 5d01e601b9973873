"""Colocated vLLM on two training ranks (gloo, torchrun): one engine per rank, built with vLLM's
`external_launcher` inside the trainer's process group, generating that rank's prompts and
loading that rank's weights at every sync (DDP: its own copy; FSDP2: gathered from the shards onto
every rank). After the last sync each rank's engine gives the trainer's greedy tokens, and the
weights equal one process's at the same global batch (per-sample seeds by global position); lr
1e-2 makes a stale engine on one rank visible (a rank-0-only sync: 8.7e-3 instead of ~2e-6).
What is still refused (tensor parallelism inside a rank's engine) is refused before vLLM starts."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from align.data.io import write_jsonl
from align.data.synth import generate
from helpers.launch import ROOT, train

REWARD = f"{ROOT}/tests/fixtures/user_rewards.py:recorded_ids"
EVAL_PROMPTS = 4


def _recipe(tmp: Path, model: Path, prompts: Path, name: str, world: int, strategy: str) -> Path:
    stage = {"name": "rl", "kind": "grpo", "prompts": str(prompts), "eval_prompts": str(prompts),
             "eval_max_prompts": EVAL_PROMPTS, "rewards": [{"name": REWARD}], "group_size": 4,
             "prompts_per_step": 4, "per_device_batch_size": 4, "gradient_accumulation_steps": 1,
             "max_steps": 2, "lr": 1e-2, "beta": 0.0, "sampling": {"max_new_tokens": 8}, "save_steps": None,
             "rollout": {"engine": "vllm", "mode": "colocate", "dtype": "float32", "kv_cache_gb": 0.25,
                         "enforce_eager": True}}  # no torch.compile: minutes less at start on 2 cores
    path = tmp / f"{name}.json"
    path.write_text(json.dumps({"output_dir": str(tmp / name), "seed": 1, "model": {"path": str(model)},
                                "logging": {"report_to": ["none"]}, "distributed": {"strategy": strategy},
                                "stages": [stage]}))
    return path


def _train(recipe: Path, world: int) -> list[dict]:
    """Run `align train` on `world` ranks; the rewards' records (rank, completion ids) in order."""
    record = recipe.with_suffix(".generated.jsonl")
    done = train(recipe, world, timeout_s=1500, ALIGN_TEST_RECORD=str(record))
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(line) for line in record.read_text().splitlines()]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, model_dir):
    tmp = tmp_path_factory.mktemp("vllm_ranks")
    prompts = tmp / "prompts.jsonl"
    write_jsonl(generate("math", 16, seed=4, form="prompts"), prompts)
    one = tmp / "one"
    _train(_recipe(tmp, model_dir, prompts, "one", 1, "ddp"), 1)
    return tmp, prompts, load_file(one / "rl/final/model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_each_with_its_engine_equal_one_process(inputs, model_dir, strategy):
    from align.data.prompts import load_prompts
    from align.recipe.schema import DataSource
    from rollout.base import SamplingParams
    from rollout.hf import HFEngine

    tmp, prompts, one = inputs
    records = _train(_recipe(tmp, model_dir, prompts, strategy, 2, strategy), 2)
    final = tmp / strategy / "rl/final"
    two = load_file(final / "model.safetensors")
    base = load_file(model_dir / "model.safetensors")
    assert any(not torch.equal(two[k], base[k]) for k in two), "training must move the weights"
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    print(f"{strategy}: max |Δw| one process vs 2 ranks, colocated vLLM on each = {worst:.2e}")
    assert worst < 1e-5, f"1 process vs 2 {strategy} ranks with colocated vLLM differ by {worst}"
    # the evaluation after the last sync, on each rank's own engine: the trained policy's greedy tokens
    trained = HFEngine.from_pretrained(final)
    ids = load_prompts([DataSource(path=str(prompts))], trained.tokenizer, 512).ids[:EVAL_PROMPTS]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    for rank in (0, 1):
        mine = ids[rank::2]
        want = [g[0].completion_ids for g in trained.generate(mine, 1, greedy)]
        last = [r["ids"] for r in records if r["rank"] == rank][-1]
        assert last == want, f"rank {rank}'s engine after the last sync"
    rows = [json.loads(line) for line in (tmp / strategy / "rl/metrics.jsonl").read_text().splitlines()]
    assert all(r["rollout/sync_check_gap"] < 1e-5 for r in rows if "loss" in r)


def _rank(rank: int, port: int, model_dir: str, errors) -> None:
    from align.errors import AlignError
    from rollout.vllm_engine import VLLMEngine

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        VLLMEngine(model_dir, tensor_parallel_size=2)
    except AlignError as exc:
        errors.put(str(exc))
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_engines_on_several_ranks_are_refused_before_vllm_starts(model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    errors = mp.get_context("spawn").Queue()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank, args=(port, str(model_dir), errors), nprocs=2, join=True)
    got = [errors.get(timeout=30) for _ in range(2)]
    assert all("tensor_parallel_size > 1" in e and "use rollout.mode: server" in e for e in got), got
