"""Shared pieces of the rollout tests (imported by tests/test_rollout_*.py; holds no tests)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A real tiny Qwen2 + byte-level BPE tokenizer directory (safetensors)."""
    from align.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("rollout_nano"), size="nano", seed=0)


def chat_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of one-turn chat prompts, ready for the assistant's reply."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                          return_dict=False) for t in texts]
