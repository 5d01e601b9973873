"""Colocated vLLM refuses a multi-rank training run (it hung under a 2-rank torchrun, and an
in-process engine tears down torch's process group): two real gloo ranks get the AlignError
before vLLM is imported."""

from __future__ import annotations

import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank: int, port: int, model_dir: str, errors) -> None:
    from align.errors import AlignError
    from rollout.vllm_engine import VLLMEngine

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        VLLMEngine(model_dir)
    except AlignError as exc:
        errors.put(str(exc))
    finally:
        dist.destroy_process_group()


def test_colocated_vllm_refuses_several_ranks(model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    errors = mp.get_context("spawn").Queue()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank, args=(port, str(model_dir), errors), nprocs=2, join=True)
    got = [errors.get(timeout=30) for _ in range(2)]
    assert all("has 2 ranks); use rollout.mode: server" in e for e in got), got
