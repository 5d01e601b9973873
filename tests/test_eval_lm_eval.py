"""Interoperability: lm-evaluation-harness's `hf` backend reads an align model directory as is.

A local task (tests/fixtures/eval/lm_eval/align_tiny_qa.yaml over a JSONL, no hub access) is run
through `lm_eval.simple_evaluate`; its perplexity must equal the one computed here with plain
transformers on the same model, so lm-eval sees exactly the model align wrote.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="needs lm-evaluation-harness: pip install lm-eval==0.4.13")

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "tests" / "fixtures" / "eval" / "lm_eval"


@pytest.mark.slow
def test_lm_eval_hf_backend_on_local_task(tmp_path_factory, monkeypatch):
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    from align.models.load import load_causal_lm, load_tokenizer
    from align.models.tiny import build_tiny

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(ROOT)  # the task's data_files path is relative to the repository root
    model_dir = build_tiny(tmp_path_factory.mktemp("lm_eval") / "model", "nano")
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32",
                                  tasks=["align_tiny_qa"], task_manager=TaskManager(include_path=str(TASK_DIR)),
                                  device="cpu", batch_size=2, bootstrap_iters=0)
    result = out["results"]["align_tiny_qa"]

    # The same loglikelihoods by hand: log p(" answer" | "Question: ...\nAnswer:"), no special tokens.
    tokenizer, model = load_tokenizer(model_dir), load_causal_lm(model_dir).eval()
    docs = [json.loads(line) for line in (TASK_DIR / "tiny_qa.jsonl").read_text().splitlines()]
    lls = []
    for doc in docs:
        context, target = f"Question: {doc['question']}\nAnswer:", f" {doc['answer']}"
        whole = tokenizer(context + target, add_special_tokens=False)["input_ids"]
        n_ctx = len(tokenizer(context, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
        lls.append(sum(float(logp[i - 1, whole[i]]) for i in range(n_ctx, len(whole))))
    assert result["perplexity,none"] == pytest.approx(math.exp(-sum(lls) / len(lls)), rel=1e-4)
    assert 0.0 <= result["acc,none"] <= 1.0
