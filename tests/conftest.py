"""Fixtures shared across test modules: real tiny models built once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A real nano Qwen2 + byte-level BPE tokenizer directory (safetensors)."""
    from align.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("nano"), size="nano", seed=0)


@pytest.fixture(scope="session")
def moe_dir(tmp_path_factory):
    """A real nano DeepSeek-V2 (MLA + DeepSeekMoE) directory, same tokenizer recipe."""
    from align.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("moe") / "model", "nano", arch="deepseek_v2",
                      corpus_texts=2000)
