"""Differential test: align's GRPO maths equals TRL 1.16's on a real model, loss and gradients.

TRL side: a real `GRPOTrainer` (built from a `GRPOConfig`) on a tiny Qwen2, whose own
`compute_loss` scores a hand-built `inputs` dict (the keys `_generate_and_score_completions`
produces). align side: `completion_logprobs` on a second copy of the same weights, then
`policy_loss`. Same prompts, completions, masks, advantages, old/ref/rollout log-probs; the loss
and every parameter's gradient must agree to 1e-5, for every loss type both have, on-policy and
off-policy (ratios outside the clip range on both sides), with and without KL, with gradient
accumulation, with TRL's bias-corrected KL + two-sided clip, and with truncated IS.
"""

from __future__ import annotations

import math

import pytest
import torch

from align.grpo.advantages import ADVANTAGES
from align.grpo.logprobs import completion_logprobs, token_logprobs
from align.grpo.loss import policy_loss

trl = pytest.importorskip("trl")
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.trainer.utils import entropy_from_logits, nanstd, selective_log_softmax  # noqa: E402

N, G, P, T = 8, 4, 5, 6  # completions, group size, prompt length, completion length
TEMPERATURE = 0.7
EPS_LOW, EPS_HIGH = 0.2, 0.28
TOL = dict(rtol=1e-5, atol=1e-5)

# scenario -> (beta, off_policy, grad_accum, bias_corrected_kl, delta, is_cap)
SCENARIOS = {
    "on_policy": (0.0, False, 1, False, None, None),
    "off_policy_kl": (0.04, True, 1, False, None, None),
    "off_policy_kl_accum2": (0.04, True, 2, False, None, None),
    "bias_corrected_kl_delta": (0.1, True, 1, True, 1.5, None),
    "truncated_is": (0.0, True, 1, False, None, 1.2),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from align.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("nano"), size="nano", corpus_texts=2000)


@pytest.fixture(scope="module")
def batch(model_dir):
    """Left-padded prompts, right-padded completions of mixed lengths, log-probs of other policies."""
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    vocab = model.config.vocab_size
    plen = torch.tensor([5, 2, 3, 5, 4, 1, 5, 3])
    prompt_mask = (torch.arange(P)[None] >= P - plen[:, None]).long()
    prompt_ids = torch.randint(3, vocab, (N, P), generator=g) * prompt_mask
    clen = torch.tensor([6, 1, 3, 6, 2, 5, 4, 6])
    completion_mask = (torch.arange(T)[None] < clen[:, None]).long()
    completion_ids = torch.randint(3, vocab, (N, T), generator=g) * completion_mask
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 2.0, -1.0, 0.3, 1.0])
    advantages, _ = ADVANTAGES.get("group")(rewards, group_size=G)
    ids = torch.cat([prompt_ids, completion_ids], 1)
    am = torch.cat([prompt_mask, completion_mask], 1)
    with torch.no_grad():
        current, _ = completion_logprobs(model, ids, am, completion_length=T, temperature=TEMPERATURE)
        # old policy: current ± up to 0.6 nats per token, so ratios span ~[0.55, 1.8] and both clips bite
        old = (current + (torch.rand(N, T, generator=g) - 0.5) * 1.2) * completion_mask
        # rollout engine: old ± up to 0.4 nats (so exp(old - rollout) crosses the IS cap of 1.2)
        rollout = (old + (torch.rand(N, T, generator=g) - 0.5) * 0.8) * completion_mask
        for p in model.parameters():  # reference: a visibly different model
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        ref, _ = completion_logprobs(model, ids, am, completion_length=T, temperature=TEMPERATURE)
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                completion_mask=completion_mask, advantages=advantages, old=old, ref=ref, rollout=rollout)


def _trl_loss_and_grads(model_dir, tmp_path, batch, loss_type, scenario):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    beta, off_policy, accum, bias_kl, delta, is_cap = SCENARIOS[scenario]
    args = GRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=N, num_generations=G,
        max_completion_length=T, beta=beta, loss_type=loss_type, epsilon=EPS_LOW, epsilon_high=EPS_HIGH,
        delta=delta, use_bias_correction_kl=bias_kl, temperature=TEMPERATURE,
        gradient_accumulation_steps=accum, use_cpu=True, bf16=False, report_to=[])
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
        train_dataset=Dataset.from_dict({"prompt": ["x"] * N}),
        processing_class=AutoTokenizer.from_pretrained(model_dir))
    trainer.current_gradient_accumulation_steps = accum  # what Trainer's loop sets per window
    trainer.model.train()
    mask = batch["completion_mask"]
    inputs = {k: batch[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask",
                                    "advantages")}
    # the optimizer step holds `accum` micro-batches like this one
    inputs["num_items_in_batch"] = mask.sum() * accum
    if off_policy:
        inputs["old_per_token_logps"] = batch["old"]
    if beta:
        inputs["ref_per_token_logps"] = batch["ref"]
    if is_cap is not None:
        # TRL computes this in _generate_and_score_completions (mode "token_truncate"); its
        # _compute_loss multiplies it in when vLLM IS correction is on, so switch that on here.
        inputs["importance_sampling_ratio"] = torch.exp((batch["old"] - batch["rollout"]) * mask).clamp(max=is_cap)
        trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


def _align_loss_and_grads(model_dir, batch, loss_type, scenario):
    from transformers import AutoModelForCausalLM

    beta, off_policy, accum, bias_kl, delta, is_cap = SCENARIOS[scenario]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    mask = batch["completion_mask"]
    logp, entropy = completion_logprobs(
        model, torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
        torch.cat([batch["prompt_mask"], mask], 1), completion_length=T, temperature=TEMPERATURE)
    loss, metrics = policy_loss(
        logp, batch["old"] if off_policy else None, batch["advantages"], mask,
        ref_logp=batch["ref"] if beta else None, rollout_logp=batch["rollout"], entropy=entropy,
        aggregation=loss_type, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, delta=delta, beta=beta,
        kl_ratio_correction=bias_kl, is_cap=is_cap, max_completion_length=T,
        num_items_in_batch=mask.sum() * accum, num_micro_batches=accum)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, metrics


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_loss_and_gradients_equal_trl(model_dir, batch, tmp_path, loss_type, scenario):
    trl_loss, trl_grads, trl_metrics = _trl_loss_and_grads(model_dir, tmp_path, batch, loss_type, scenario)
    loss, grads, metrics = _align_loss_and_grads(model_dir, batch, loss_type, scenario)

    torch.testing.assert_close(loss, trl_loss, **TOL)
    assert grads.keys() == trl_grads.keys()
    assert any(g.abs().max() > 1e-3 for g in grads.values())  # a real gradient, not zeros on both sides
    for name, grad in grads.items():
        torch.testing.assert_close(grad, trl_grads[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")

    # same clip accounting and metrics
    pairs = {"actor/clip_frac_low": "clip_ratio/low_mean", "actor/clip_frac_high": "clip_ratio/high_mean",
             "actor/clip_frac_region": "clip_ratio/region_mean", "actor/entropy": "entropy"}
    if SCENARIOS[scenario][0]:
        pairs["actor/kl"] = "kl"
    for ours, theirs in pairs.items():
        assert math.isclose(metrics[ours].item(), trl_metrics[theirs], rel_tol=1e-5, abs_tol=1e-6), ours
    if SCENARIOS[scenario][1]:  # off-policy: the clip was actually exercised, on both sides
        assert metrics["actor/clip_frac_low"] > 0 and metrics["actor/clip_frac_high"] > 0
    if SCENARIOS[scenario][5] is not None:
        assert 0 < metrics["rollout_is/truncated_frac"] < 1


def test_token_logprobs_equal_trl_selective_log_softmax():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 7, 50, generator=g) * 4
    targets = torch.randint(0, 50, (3, 7), generator=g)
    for temperature in (1.0, 0.6):
        logp, entropy = token_logprobs(logits, targets, temperature=temperature)
        torch.testing.assert_close(logp, selective_log_softmax(logits, targets, temperature=temperature))
        torch.testing.assert_close(entropy, entropy_from_logits(logits / temperature))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_trl_formula(scale):
    """TRL 1.16 `_generate_and_score_completions` ("sum_then_normalize"), with TRL's own nanstd."""
    g = torch.Generator().manual_seed(2)
    rewards = torch.randint(0, 4, (6 * G,), generator=g).float() / 2
    rewards[5] = float("nan")  # one unscorable completion
    rewards[2 * G:3 * G] = 1.5  # one group with no signal
    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G)
    std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G) if scale == "group" else nanstd(rewards)
    expected = rewards - mean
    if scale != "none":
        expected = expected / (std + 1e-4)
    expected = torch.nan_to_num(expected, nan=0.0)
    ours, metrics = ADVANTAGES.get(scale)(rewards, group_size=G)
    # (rewards are multiples of 0.5, so TRL's (r - mean) of an all-equal group is exactly 0 as ours is)
    torch.testing.assert_close(ours, expected, **TOL)
    zero_std = torch.isclose(nanstd(rewards.view(-1, G), dim=1), torch.zeros(()))
    assert zero_std.any()
    assert metrics["advantage/zero_std_frac"].item() == pytest.approx(zero_std.float().mean().item())
