"""Differential test: align's GRPO maths equals TRL 1.16's on a real model, loss and gradients.

TRL side: a real `GRPOTrainer` (built from a `GRPOConfig`) on a tiny Qwen2, whose own
`compute_loss` scores a hand-built `inputs` dict (the keys `_generate_and_score_completions`
produces). align side: `completion_logprobs` on a second copy of the same weights, then
`policy_loss`. Same prompts, completions, masks, advantages, old/ref/rollout log-probs; the loss
and every parameter's gradient must agree to 1e-5, for every loss type both have, on-policy and
off-policy (ratios outside the clip range on both sides), with and without KL, with gradient
accumulation, with TRL's bias-corrected KL + two-sided clip (= align's dual-clip), and for every
variant both toolkits have: GSPO's sequence-level ratio, CISPO, and the four train–rollout
corrections (token/sequence × truncate/mask).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
GSPO_EPS = (3e-4, 4e-4)  # the GSPO paper's clip range for its sequence-level ratio
TOL = dict(rtol=1e-5, atol=1e-5)



@dataclass(frozen=True)
class Scenario:
    beta: float = 0.0
    off_policy: bool = True
    accum: int = 1
    bias_kl: bool = False
    clip_c: float | None = None  # align's dual-clip c = TRL's two-sided clip delta (c > 1 + ε_high)
    level: str = "token"  # importance_sampling_level (sequence = GSPO)
    eps: tuple[float, float] = (EPS_LOW, EPS_HIGH)
    cispo_cap: float | None = None  # set: align objective cispo / TRL loss_type cispo (epsilon_high = cap)
    is_cap: float | None = None  # rollout correction (align importance_sampling, TRL vllm_importance_sampling_*)
    is_level: str = "token"
    is_mode: str = "truncate"


SCENARIOS = {
    "on_policy": Scenario(off_policy=False),
    "off_policy_kl": Scenario(beta=0.04),
    "off_policy_kl_accum2": Scenario(beta=0.04, accum=2),
    "bias_corrected_kl_dual_clip": Scenario(beta=0.1, bias_kl=True, clip_c=1.5),
    "truncated_is": Scenario(is_cap=1.2),
    "gspo_kl": Scenario(beta=0.04, level="sequence", eps=GSPO_EPS),
    "gspo_bias_corrected_kl_dual_clip": Scenario(beta=0.1, bias_kl=True, clip_c=1.05, level="sequence",
                                                 eps=GSPO_EPS),
    "cispo": Scenario(cispo_cap=1.3),
    "cispo_gspo_kl_accum2": Scenario(cispo_cap=1.0, beta=0.04, accum=2, level="sequence"),
    "token_mask_is": Scenario(is_cap=1.2, is_mode="mask"),
    "sequence_truncate_is": Scenario(is_cap=1.2, is_level="sequence"),
    "sequence_mask_is": Scenario(is_cap=1.2, is_level="sequence", is_mode="mask", beta=0.04),
    "gspo_token_mask_is": Scenario(is_cap=1.2, is_mode="mask", level="sequence", eps=GSPO_EPS),
}
AGGREGATIONS = ["grpo", "bnpo", "dr_grpo", "dapo"]
# (TRL loss_type, scenario): the token-level variants under every aggregation; GSPO's [N, 1] ratio under
# a per-sequence and a per-token normaliser; CISPO under TRL's one (dapo's); each further variant once
CASES = ([(agg, sc) for sc in ("on_policy", "off_policy_kl", "off_policy_kl_accum2", "bias_corrected_kl_dual_clip",
                               "truncated_is") for agg in AGGREGATIONS]
         + [("grpo", "gspo_kl"), ("dapo", "gspo_kl"), ("grpo", "gspo_bias_corrected_kl_dual_clip"), ("cispo", "cispo"), ("cispo", "cispo_gspo_kl_accum2"),
            ("dapo", "token_mask_is"), ("bnpo", "sequence_truncate_is"), ("dr_grpo", "sequence_mask_is"),
            ("grpo", "gspo_token_mask_is")])


def trl_importance_sampling_ratio(old, rollout, mask, sc: Scenario) -> torch.Tensor:
    """TRL 1.16 `_generate_and_score_completions`' `vllm_importance_sampling_ratio`, line for line
    (it is computed inline there, next to vLLM generation, so it cannot be called on its own)."""
    diff = torch.nan_to_num((old - rollout) * mask, nan=0.0)
    if sc.is_level == "sequence":  # modes sequence_truncate / sequence_mask
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if sc.is_mode == "truncate":
        return torch.clamp(ratio, min=None, max=sc.is_cap)
    return ratio.masked_fill((ratio < -math.inf) | (ratio > sc.is_cap), value=0.0)


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


def _trl_loss_and_grads(model_dir, tmp_path, batch, loss_type, sc: Scenario):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = GRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=N, num_generations=G,
        max_completion_length=T, beta=sc.beta, loss_type=loss_type, epsilon=sc.eps[0],
        epsilon_high=sc.eps[1] if sc.cispo_cap is None else sc.cispo_cap, delta=sc.clip_c,
        importance_sampling_level=sc.level, use_bias_correction_kl=sc.bias_kl, temperature=TEMPERATURE,
        gradient_accumulation_steps=sc.accum, use_cpu=True, bf16=False, report_to=[])
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
        train_dataset=Dataset.from_dict({"prompt": ["x"] * N}),
        processing_class=AutoTokenizer.from_pretrained(model_dir))
    trainer.current_gradient_accumulation_steps = sc.accum  # what Trainer's loop sets per window
    trainer.model.train()
    mask = batch["completion_mask"]
    inputs = {k: batch[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask",
                                    "advantages")}
    # the optimizer step holds `accum` micro-batches like this one
    inputs["num_items_in_batch"] = mask.sum() * sc.accum
    if sc.off_policy:
        inputs["old_per_token_logps"] = batch["old"]
    if sc.beta:
        inputs["ref_per_token_logps"] = batch["ref"]
    if sc.is_cap is not None:
        # TRL's _compute_loss multiplies this in when vLLM IS correction is on, so switch that on here
        inputs["importance_sampling_ratio"] = trl_importance_sampling_ratio(batch["old"], batch["rollout"], mask, sc)
        trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


def _align_loss_and_grads(model_dir, batch, loss_type, sc: Scenario):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    mask = batch["completion_mask"]
    logp, entropy = completion_logprobs(
        model, torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
        torch.cat([batch["prompt_mask"], mask], 1), completion_length=T, temperature=TEMPERATURE)
    cispo = sc.cispo_cap is not None
    loss, metrics = policy_loss(
        logp, batch["old"] if sc.off_policy else None, batch["advantages"], mask,
        ref_logp=batch["ref"] if sc.beta else None, rollout_logp=batch["rollout"], entropy=entropy,
        aggregation="dapo" if cispo else loss_type, objective="cispo" if cispo else "clip",
        ratio_level=sc.level, epsilon_low=sc.eps[0], epsilon_high=sc.eps[1], clip_ratio_c=sc.clip_c,
        cispo_cap=sc.cispo_cap or 5.0, beta=sc.beta, kl_ratio_correction=sc.bias_kl, is_cap=sc.is_cap,
        is_level=sc.is_level, is_mode=sc.is_mode, max_completion_length=T,
        num_items_in_batch=mask.sum() * sc.accum, num_micro_batches=sc.accum)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, metrics


@pytest.mark.parametrize(("loss_type", "scenario"), CASES)
def test_loss_and_gradients_equal_trl(model_dir, batch, tmp_path, loss_type, scenario):
    sc = SCENARIOS[scenario]
    trl_loss, trl_grads, trl_metrics = _trl_loss_and_grads(model_dir, tmp_path, batch, loss_type, sc)
    loss, grads, metrics = _align_loss_and_grads(model_dir, batch, loss_type, sc)

    torch.testing.assert_close(loss, trl_loss, **TOL)
    assert grads.keys() == trl_grads.keys()
    assert any(g.abs().max() > 1e-3 for g in grads.values())  # a real gradient, not zeros on both sides
    for name, grad in grads.items():
        torch.testing.assert_close(grad, trl_grads[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")

    # same clip accounting and metrics
    pairs = {"actor/entropy": "entropy"}
    if sc.cispo_cap is None:
        pairs.update({"actor/clip_frac_low": "clip_ratio/low_mean", "actor/clip_frac_high": "clip_ratio/high_mean",
                      "actor/clip_frac_region": "clip_ratio/region_mean"})
    else:
        pairs["actor/clip_frac_high"] = "cispo_clip_ratio"
    if sc.beta:
        pairs["actor/kl"] = "kl"
    for ours, theirs in pairs.items():
        assert math.isclose(metrics[ours].item(), trl_metrics[theirs], rel_tol=1e-5, abs_tol=1e-6), ours
    # the variant under test actually bit, so equality is not vacuous
    if sc.off_policy and sc.cispo_cap is None:  # both clips, on tokens (or on GSPO's sequences)
        assert metrics["actor/clip_frac_low"] > 0 and metrics["actor/clip_frac_high"] > 0
    if sc.cispo_cap is not None:
        assert metrics["actor/clip_frac_high"] > 0
    if sc.clip_c is not None:
        assert metrics["actor/dual_clip_frac"] > 0
    if sc.is_cap is not None:
        frac = metrics["rollout_is/truncated_frac" if sc.is_mode == "truncate" else "rollout_is/masked_frac"]
        assert 0 < frac < 1


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
