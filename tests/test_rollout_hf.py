"""HF rollout engine on a real tiny Qwen2 + tokenizer: group prefill, logprobs, seeds, stops."""

from __future__ import annotations

import pytest
import torch

from align.errors import AlignError
from rollout.base import RolloutEngine, SamplingParams
from rollout.config import RolloutConfig
from rollout.factory import build_engine
from rollout.hf import HFEngine, cut_completion, sampled_logprobs
from helpers.workers import chat_ids


@pytest.fixture(scope="module")
def engine(model_dir):
    return HFEngine.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def prompts(engine):
    texts = ["What is 3 + 4?", "hi", "Tell me a long story about a dragon and a castle."]
    return chat_ids(engine.tokenizer, texts)


def teacher_forced(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    """What the trainer computes: one unpadded forward over prompt + completion."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[:, len(prompt) - 1:-1]
    return sampled_logprobs(logits, torch.tensor([completion]), temperature)[0]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_equal_trainer_forward_despite_padding_and_shared_prefill(engine, prompts, temperature):
    """Left padding, the once-encoded prompt cache expanded to the group, and the position ids all
    feed the logits; any mistake there moves these logprobs away from an unpadded forward."""
    groups = engine.generate(prompts, 3, SamplingParams(temperature=temperature, max_new_tokens=12, seed=1))
    assert [len(g) for g in groups] == [3, 3, 3]
    for prompt, group in zip(prompts, groups):
        for sample in group:
            assert sample.finish_reason == "length" and len(sample.completion_ids) == 12
            want = teacher_forced(engine.model, prompt, sample.completion_ids, temperature)
            assert torch.allclose(torch.tensor(sample.logprobs), want, atol=1e-5)


def test_seeded_distinct_and_leaves_global_rng_alone(engine, prompts):
    sampling = SamplingParams(temperature=1.0, max_new_tokens=6, seed=3)
    torch.manual_seed(123)
    first = engine.generate([prompts[1]] * 2, 4, sampling)
    after = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(1))  # the trainer's RNG stream is untouched
    assert engine.generate([prompts[1]] * 2, 4, sampling) == first
    ids = [tuple(s.completion_ids) for g in first for s in g]
    assert len(set(ids)) == len(ids)
    assert engine.generate([prompts[1]] * 2, 4, SamplingParams(temperature=1.0, max_new_tokens=6, seed=4)) != first


def test_batching_by_groups_gives_the_same_samples(engine, prompts):
    """Splitting a batch into generate calls (whole groups) changes nothing but float rounding."""
    one_by_one = HFEngine(engine.model, engine.tokenizer, batch_size=1)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=5)
    got, want = one_by_one.generate(prompts, 2, sampling), engine.generate(prompts, 2, sampling)
    for g, w in zip([s for grp in got for s in grp], [s for grp in want for s in grp]):
        assert g.completion_ids == w.completion_ids
        assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-5)


def test_stop_strings_cut_after_the_completing_token(engine, prompts):
    decode = engine.tokenizer.decode
    groups = engine.generate(prompts, 4, SamplingParams(temperature=1.0, max_new_tokens=40, seed=0,
                                                        stop=("e",)))
    stopped = [s for g in groups for s in g if s.finish_reason == "stop"]
    assert stopped  # 'e' is common in a tokenizer trained on English text
    for s in stopped:
        assert "e" in decode(s.completion_ids) and "e" not in decode(s.completion_ids[:-1])
        assert len(s.logprobs) == len(s.completion_ids)


def test_cut_completion_keeps_eos_and_drops_padding(engine):
    tok = engine.tokenizer
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id
    a, b = tok.encode("ab")[:1] * 2
    assert cut_completion([a, b, eos, pad, pad], {eos}, (), tok.decode) == ([a, b, eos], "stop")
    assert cut_completion([a, pad, b], {eos}, (), tok.decode) == ([a, pad, b], "length")


def test_update_weights_copies_foreign_tensors_and_bumps_version(model_dir, prompts):
    engine = HFEngine.from_pretrained(model_dir)
    assert isinstance(engine, RolloutEngine)
    engine.update_weights(engine.model.state_dict().items())  # the engine's own tensors: no copy
    assert engine.weight_version == 1
    new = {k: v + 0.05 * torch.randn_like(v) for k, v in engine.model.state_dict().items()}
    engine.update_weights(new.items())
    assert torch.equal(engine.model.state_dict()["model.norm.weight"], new["model.norm.weight"])
    assert all(s.weight_version == 2 for g in engine.generate(prompts[:1], 2, SamplingParams(max_new_tokens=2))
               for s in g)
    with pytest.raises(AlignError, match="merge LoRA"):
        engine.update_weights([("base_model.model.lora_A.weight", torch.zeros(1))])


def test_build_engine_from_directory_and_from_memory(model_dir, engine):
    cfg = RolloutConfig(engine="hf", batch_size=2)
    from_dir = build_engine(cfg, model_dir)
    shared = build_engine(cfg, engine.model, engine.tokenizer)
    assert isinstance(from_dir, HFEngine) and shared.model is engine.model and from_dir.batch_size == 2
    greedy = SamplingParams(temperature=0.0, max_new_tokens=4)
    assert from_dir.generate([[5, 6, 7]], 1, greedy) == shared.generate([[5, 6, 7]], 1, greedy)


def test_model_generation_config_does_not_change_sampling(model_dir, prompts):
    """A checkpoint's generation_config.json (Qwen ships top_k/top_p/repetition_penalty) must not
    reshape rollouts: only SamplingParams does, or logprobs stop matching the trainer's."""
    engine = HFEngine.from_pretrained(model_dir)
    engine.model.generation_config.update(top_k=1, repetition_penalty=3.0, min_p=0.9)
    group = engine.generate(prompts[:1], 4, SamplingParams(temperature=1.0, max_new_tokens=6, seed=2))[0]
    assert len({tuple(s.completion_ids) for s in group}) == 4  # top_k=1 would make them identical
    for s in group:
        want = teacher_forced(engine.model, prompts[0], s.completion_ids, 1.0)
        assert torch.allclose(torch.tensor(s.logprobs), want, atol=1e-5)
