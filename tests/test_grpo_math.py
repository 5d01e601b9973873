"""GRPO maths against numbers worked out by hand on tiny tensors (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from align.errors import AlignError
from align.grpo.advantages import ADVANTAGES, weight_negatives
from align.grpo.batch import build_batch
from align.grpo.kl import KL_ESTIMATORS, kl_penalized_rewards
from align.grpo.logprobs import completion_logprobs, lm_head_in_fp32, token_logprobs
from align.grpo.loss import (IS_LEVELS, IS_MODES, LOSS_AGGREGATIONS, POLICY_OBJECTIVES, RATIO_LEVELS,
                             mismatch_metrics, policy_loss, rollout_is_weights)
from align.grpo.metrics import completion_metrics
from rollout.base import Sample
from align.grpo.registry import Registry

LN2 = math.log(2.0)

# ----------------------------------------------------------------------------------- advantages

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two groups of G = 4


def test_group_advantages_by_hand():
    # group 1: mean 0.5, deviations ±0.5, unbiased var = 4·0.25/3 = 1/3, std = 0.577350
    #   A = ±0.5 / (0.577350 + 1e-4) = ±0.865875
    # group 2: all 2.0 -> std 0 -> A exactly 0, and it counts as a zero-std group (1 of 2)
    adv, metrics = ADVANTAGES.get("group")(REWARDS, group_size=4)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([a, -a, -a, a, 0, 0, 0, 0]))
    assert torch.equal(adv[4:], torch.zeros(4))
    assert metrics["advantage/zero_std_frac"].item() == 0.5
    assert metrics["advantage/unscored_frac"].item() == 0.0


def test_batch_and_none_advantages_by_hand():
    # batch std of all 8: mean 1.25; squared deviations .0625+1.5625+1.5625+.0625+4·.5625 = 5.5;
    #   unbiased var 5.5/7 = 0.785714, std 0.886405 -> A = ±0.5 / (0.886405 + 1e-4) = ±0.564010
    adv, _ = ADVANTAGES.get("batch")(REWARDS, group_size=4)
    a = 0.5 / (math.sqrt(5.5 / 7) + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([a, -a, -a, a, 0, 0, 0, 0]))
    # none (Dr. GRPO): r - group mean, no division
    adv, _ = ADVANTAGES.get("none")(REWARDS, group_size=4)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))


def test_negative_advantages_weighted_by_hand():
    # group 1's A = ±0.865875 (above); λ = 0.1 leaves the positives and scales the negatives to ∓0.0865875
    adv, _ = ADVANTAGES.get("group")(REWARDS, group_size=4)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    torch.testing.assert_close(weight_negatives(adv, 0.1), torch.tensor([a, -0.1 * a, -0.1 * a, a, 0, 0, 0, 0]))
    torch.testing.assert_close(weight_negatives(adv, 0.0), torch.tensor([a, 0, 0, a, 0, 0, 0, 0]))
    assert weight_negatives(adv, 1.0) is adv  # plain GRPO: untouched


def test_nan_reward_is_excluded_and_gets_zero_advantage():
    # group 1 scored [1, 0, 0]: mean 1/3, deviations 2/3, -1/3, -1/3, squares sum 6/9,
    #   unbiased var (6/9)/2 = 1/3, std 0.577350 -> A = (2/3)/(std+1e-4), (-1/3)/(std+1e-4); NaN -> 0
    rewards = torch.tensor([1.0, float("nan"), 0.0, 0.0, 3.0, 3.0, 3.0, 3.0])
    adv, metrics = ADVANTAGES.get("group")(rewards, group_size=4)
    s = math.sqrt(1 / 3) + 1e-4
    torch.testing.assert_close(adv, torch.tensor([2 / 3 / s, 0, -1 / 3 / s, -1 / 3 / s, 0, 0, 0, 0]))
    assert metrics["advantage/unscored_frac"].item() == 1 / 8


def test_group_of_one_and_all_nan_group_have_zero_advantage():
    adv, metrics = ADVANTAGES.get("group")(torch.tensor([1.0, 5.0, -2.0]), group_size=1)
    assert torch.equal(adv, torch.zeros(3)) and metrics["advantage/zero_std_frac"].item() == 1.0
    adv, _ = ADVANTAGES.get("none")(torch.tensor([float("nan")] * 2 + [0.0, 1.0]), group_size=2)
    torch.testing.assert_close(adv, torch.tensor([0.0, 0.0, -0.5, 0.5]))


def test_group_size_must_divide_and_rewards_must_be_flat():
    with pytest.raises(AlignError, match="groups of group_size=3"):
        ADVANTAGES.get("group")(REWARDS, group_size=3)
    with pytest.raises(AlignError, match=r"flat \[B\*G\]"):
        ADVANTAGES.get("group")(REWARDS.view(2, 4), group_size=4)


def test_registries_list_known_names_and_refuse_duplicates():
    with pytest.raises(AlignError, match="known: batch, group, none"):
        ADVANTAGES.get("gae")
    with pytest.raises(AlignError, match="known: bnpo, dapo, dr_grpo, grpo"):
        LOSS_AGGREGATIONS.get("token-mean")
    with pytest.raises(AlignError, match="known: k1, k2, k3"):
        KL_ESTIMATORS.get("low_var_kl")
    assert (POLICY_OBJECTIVES.names(), RATIO_LEVELS.names()) == (["cispo", "clip"], ["sequence", "token"])
    assert (IS_LEVELS.names(), IS_MODES.names()) == (["sequence", "token"], ["mask", "truncate"])
    with pytest.raises(AlignError, match="unknown policy objective 'sapo'; known: cispo, clip"):
        policy_loss(torch.zeros(1, 1), None, torch.ones(1), torch.ones(1, 1), objective="sapo")
    table = Registry("thing")
    table.register("a")(len)
    with pytest.raises(AlignError, match="already registered"):
        table.register("a")(abs)


# ------------------------------------------------------------------------------------------- KL

def test_kl_estimators_by_hand():
    # π_θ = 0.5, π_ref = 0.25: d = log π_ref − log π_θ = −ln 2
    #   k1 = ln 2 = 0.693147; k2 = (ln 2)²/2 = 0.240227; k3 = e^{−ln 2} + ln 2 − 1 = 0.193147
    logp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    assert KL_ESTIMATORS.get("k1")(logp, ref).item() == pytest.approx(LN2)
    assert KL_ESTIMATORS.get("k2")(logp, ref).item() == pytest.approx(LN2**2 / 2)
    assert KL_ESTIMATORS.get("k3")(logp, ref).item() == pytest.approx(0.5 + LN2 - 1)
    assert KL_ESTIMATORS.get("k3")(ref, ref).item() == 0.0  # identical policies: exactly zero


# ------------------------------------------------------------------------------------- log-probs

def test_token_logprobs_and_entropy_by_hand():
    # logits [0, 0, ln 2] -> p = [1/4, 1/4, 1/2]: log p(2) = ln 0.5; H = 2·(1/4)·ln 4 + (1/2)·ln 2 = 1.039721
    # at temperature 0.5: logits [0, 0, 2 ln 2] -> e^x = [1, 1, 4] -> p(2) = 2/3
    logits = torch.tensor([[[0.0, 0.0, LN2]]])
    target = torch.tensor([[2]])
    logp, ent = token_logprobs(logits, target)
    assert logp.item() == pytest.approx(math.log(0.5))
    assert ent.item() == pytest.approx(0.5 * math.log(4) + 0.5 * LN2)
    logp, ent = token_logprobs(logits, target, temperature=0.5, with_entropy=False)
    assert logp.item() == pytest.approx(math.log(2 / 3)) and ent is None
    # bf16 logits are scored in float32
    logp, _ = token_logprobs(logits.bfloat16(), target)
    assert logp.dtype == torch.float32 and logp.item() == pytest.approx(math.log(0.5), abs=1e-2)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, target, temperature=0.0)


@pytest.fixture(scope="module")
def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return Qwen2ForCausalLM(config).eval()


def test_completion_logprobs_match_a_full_forward(qwen2):
    ids = torch.randint(0, 64, (3, 9))
    am = torch.ones_like(ids)
    am[0, -2:] = 0  # completion of row 0 is 2 tokens shorter (right padding)
    logp, ent = completion_logprobs(qwen2, ids, am, completion_length=4, temperature=0.8, micro_batch_size=2)
    full = qwen2(input_ids=ids, attention_mask=am).logits[:, -5:-1]  # logits at t predict token t+1
    ref_logp, ref_ent = token_logprobs(full, ids[:, -4:], temperature=0.8)
    torch.testing.assert_close(logp[1:], ref_logp[1:])
    torch.testing.assert_close(logp[0, :2], ref_logp[0, :2])
    assert torch.equal(logp[0, 2:], torch.zeros(2)) and torch.equal(ent[0, 2:], torch.zeros(2))
    torch.testing.assert_close(ent[1:], ref_ent[1:])


def test_fp32_lm_head_computes_the_logits_in_float32(qwen2):
    import copy

    model = copy.deepcopy(qwen2).to(torch.bfloat16)
    ids = torch.randint(0, 64, (2, 9))
    am = torch.ones_like(ids)
    logp, _ = completion_logprobs(model, ids, am, completion_length=4, fp32_lm_head=True)
    # by hand: the bf16 body's last hidden states times the head's weight, in float32
    hidden = model.model(input_ids=ids, attention_mask=am).last_hidden_state[:, -5:-1]
    logits = F.linear(hidden.float(), model.lm_head.weight.float())
    expected = torch.log_softmax(logits, -1).gather(-1, ids[:, -4:, None]).squeeze(-1)
    torch.testing.assert_close(logp, expected)
    plain, _ = completion_logprobs(model, ids, am, completion_length=4)
    assert (plain - expected).abs().max() > 1e-4  # bf16 logits really lose digits
    assert "forward" not in model.lm_head.__dict__  # the head is itself again
    # the gradient reaches the bf16 head weight through the float32 matmul
    logp, _ = completion_logprobs(model, ids, am, completion_length=4, fp32_lm_head=True, with_entropy=False)
    logp.sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_fp32_lm_head_refuses_a_lora_head(qwen2):
    import copy

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(qwen2), LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(AlignError, match="LoRA adapter"), lm_head_in_fp32(peft_model):
        pass


# ------------------------------------------------------------------------------------------ loss

def test_clip_regions_losses_and_gradients_by_hand():
    # old = 0, so ratio ρ = exp(logp). ε_low = ε_high = 0.2 -> clip range [0.8, 1.2].
    # seq 0, A = +1: ρ = 1.5 -> −min(1.5, 1.2) = −1.2 (high-clipped, no gradient)
    #                ρ = 0.5 -> −min(0.5, 0.8) = −0.5 (not clipped: the clip never limits a push the other way)
    # seq 1, A = −1: ρ = 0.5 -> −min(−0.5, −0.8) = 0.8 (low-clipped, no gradient)
    #                ρ = 1.5 -> −min(−1.5, −1.2) = 1.5 (not clipped)
    # grpo: mean(−1.7/2, 2.3/2) = 0.15; d/dlogp of an unclipped token = −A·ρ / (2 seqs · 2 tokens)
    logp = torch.log(torch.tensor([[1.5, 0.5], [0.5, 1.5]])).requires_grad_()
    loss, m = policy_loss(logp, torch.zeros(2, 2), torch.tensor([1.0, -1.0]), torch.ones(2, 2),
                          epsilon_low=0.2, epsilon_high=0.2)
    assert loss.item() == pytest.approx(0.15)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.5 / 4], [0.0, 1.5 / 4]]))
    assert m["actor/clip_frac_high"].item() == 0.25 and m["actor/clip_frac_low"].item() == 0.25
    assert m["actor/clip_frac_region"].item() == 0.5
    assert m["actor/ratio_min"].item() == pytest.approx(0.5) and m["actor/ratio_max"].item() == pytest.approx(1.5)
    assert m["actor/ratio_mean"].item() == pytest.approx(1.0)
    assert "actor/kl" not in m


def test_asymmetric_clip():
    # ε_high = 0.28: ρ = 1.25 with A = +1 is inside [0.8, 1.28] -> loss −1.25, not clipped
    logp = torch.log(torch.tensor([[1.25]]))
    loss, m = policy_loss(logp, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1),
                          epsilon_low=0.2, epsilon_high=0.28)
    assert loss.item() == pytest.approx(-1.25) and m["actor/clip_frac_high"].item() == 0.0


def test_dual_clip_by_hand():
    # clip range [0.8, 1.2], c = 2. Tokens (old = 0, so ρ = exp(logp)), bnpo mean over 4 tokens:
    #   A = −1, ρ = 3:   clipped loss −min(−3, −1.2) = 3, dual-clip min(3, −A·c = 2) = 2 (constant: no grad)
    #   A = −1, ρ = 1.5: −min(−1.5, −1.2) = 1.5 < 2, unchanged; d/dlogp = −A·ρ / 4 = 0.375
    #   A = +1, ρ = 3:   −min(3, 1.2) = −1.2 (high-clipped; dual-clip never touches A > 0)
    #   A = +1, ρ = 0.5: −0.5; d/dlogp = −A·ρ / 4 = −0.125
    # loss = (2 + 1.5 − 1.2 − 0.5) / 4 = 0.45
    logp = torch.log(torch.tensor([[3.0, 1.5], [3.0, 0.5]])).requires_grad_()
    loss, m = policy_loss(logp, torch.zeros(2, 2), torch.tensor([-1.0, 1.0]), torch.ones(2, 2),
                          aggregation="bnpo", clip_ratio_c=2.0)
    assert loss.item() == pytest.approx(0.45)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.375], [0.0, -0.125]]))
    assert m["actor/dual_clip_frac"].item() == 0.25  # 1 of 4 tokens: ρ > c with A < 0
    # without it the first token's loss is 3: the clip alone does not bound a negative advantage
    loss, m = policy_loss(logp.detach(), torch.zeros(2, 2), torch.tensor([-1.0, 1.0]), torch.ones(2, 2),
                          aggregation="bnpo")
    assert loss.item() == pytest.approx(0.7) and "actor/dual_clip_frac" not in m


def test_gspo_sequence_ratio_by_hand():
    # sequence 0: log ρ = [ln 2, 0] -> s = exp(ln 2 / 2) = √2 ≈ 1.414 > 1.2 with A = +1: clipped, no grad
    # sequence 1: log ρ = [0.1, −0.1, (pad 5.0)] -> s = exp(0) = 1; A = +1 -> loss −1 on each token;
    #   grpo: d/dlogp_t = −A·s·(1/2 tokens) / (2 sequences) = −0.25 for both real tokens, 0 for the pad
    logp = torch.tensor([[LN2, 0.0, 0.0], [0.1, -0.1, 5.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    loss, m = policy_loss(logp, torch.zeros(2, 3), torch.ones(2), mask, ratio_level="sequence")
    assert loss.item() == pytest.approx((-1.2 - 1.0) / 2)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, 0.0], [-0.25, -0.25, 0.0]]))
    # statistics count sequences, not tokens
    assert m["actor/clip_frac_high"].item() == 0.5
    assert m["actor/ratio_max"].item() == pytest.approx(math.sqrt(2))
    assert m["actor/ratio_mean"].item() == pytest.approx((math.sqrt(2) + 1) / 2)


def test_cispo_by_hand():
    # ρ = [1.5, 0.5] (old = 0), A = +1, cap 1.2: w = sg(min(ρ, 1.2)) = [1.2, 0.5]
    #   ℓ = −w·A·log π = [−1.2 ln 1.5, −0.5 ln 0.5]; bnpo mean over 2 tokens
    #   d/dlogp = −w·A / 2 = [−0.6, −0.25]: the capped token keeps a gradient (PPO's clip would drop it)
    logp = torch.log(torch.tensor([[1.5, 0.5]])).requires_grad_()
    loss, m = policy_loss(logp, torch.zeros(1, 2), torch.ones(1), torch.ones(1, 2), objective="cispo",
                          cispo_cap=1.2, aggregation="bnpo")
    assert loss.item() == pytest.approx(-(1.2 * math.log(1.5) + 0.5 * math.log(0.5)) / 2)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.6, -0.25]]))
    assert m["actor/clip_frac_high"].item() == 0.5 and m["actor/clip_frac_low"].item() == 0.0


def test_kl_term_value_and_gradient():
    # A = 0 kills the policy term; on-policy (old = None) ratio 1. π_θ = 0.5, π_ref = 0.25:
    #   loss = β·k3 = 0.04 · 0.193147; d k3 / d logp = 1 − exp(ref − logp) = 1 − 0.5 = 0.5 -> grad 0.04·0.5
    logp = torch.full((1, 1), math.log(0.5), requires_grad=True)
    loss, m = policy_loss(logp, None, torch.zeros(1), torch.ones(1, 1), ref_logp=torch.full((1, 1), math.log(0.25)),
                          beta=0.04)
    assert loss.item() == pytest.approx(0.04 * (0.5 + LN2 - 1))
    assert m["actor/kl"].item() == pytest.approx(0.5 + LN2 - 1)
    loss.backward()
    assert logp.grad.item() == pytest.approx(0.04 * 0.5)


@pytest.mark.parametrize(("estimator", "value", "grad"), [
    # π_θ = 0.5, π_ref = 0.25. k1 = log π_θ − log π_ref = ln 2, d/dlogp = 1
    ("k1", LN2, 1.0),
    # k2 = (ln 2)² / 2, d/dlogp = log π_θ − log π_ref = ln 2
    ("k2", LN2**2 / 2, LN2),
])
def test_k1_and_k2_in_the_loss(estimator, value, grad):
    logp = torch.full((1, 1), math.log(0.5), requires_grad=True)
    loss, m = policy_loss(logp, None, torch.zeros(1), torch.ones(1, 1), ref_logp=torch.full((1, 1), math.log(0.25)),
                          beta=0.1, kl_estimator=estimator)
    assert loss.item() == pytest.approx(0.1 * value) and m["actor/kl"].item() == pytest.approx(value)
    loss.backward()
    assert logp.grad.item() == pytest.approx(0.1 * grad)


def test_kl_in_the_reward_by_hand():
    # completion 0: log π_old − log π_ref = [ln 2, ln 2, (pad)] -> k1 sum 2 ln 2; β = 0.5 -> r = 1 − ln 2
    # completion 1: [−ln 2] -> k1 sum −ln 2 -> r = 0 + 0.5 ln 2; completion 2 unscorable: stays NaN
    # k3 of completion 0: per token e^{−ln 2} + ln 2 − 1 = ln 2 − 0.5, two of them
    logp = torch.tensor([[LN2, LN2, 9.0], [-LN2, 0.0, 0.0], [0.0, 0.0, 0.0]])
    ref = torch.zeros(3, 3)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 0, 0]])
    rewards = torch.tensor([1.0, 0.0, float("nan")])
    shaped, m = kl_penalized_rewards(rewards, logp, ref, mask, beta=0.5, estimator="k1")
    torch.testing.assert_close(shaped[:2], torch.tensor([1 - LN2, 0.5 * LN2]))
    assert math.isnan(shaped[2].item())
    assert m["kl_reward/kl_mean"].item() == pytest.approx(LN2 / 3)  # (2 ln 2 − ln 2 + 0) / 3
    assert m["kl_reward/penalty_mean"].item() == pytest.approx(0.5 * LN2 / 3)
    shaped, _ = kl_penalized_rewards(rewards, logp, ref, mask, beta=0.5, estimator="k3")
    assert shaped[0].item() == pytest.approx(1 - 0.5 * 2 * (LN2 - 0.5))
    # the shaped rewards give the advantages: in a group of 2, A = ±(difference)/(std) with the sign
    # of r'; with β large the KL outweighs the reward and flips which completion is preferred
    flipped, _ = kl_penalized_rewards(torch.tensor([1.0, 0.0]), logp[:2], ref[:2], mask[:2], beta=2.0, estimator="k1")
    adv, _ = ADVANTAGES.get("group")(flipped, group_size=2)
    assert adv[0] < 0 < adv[1]


def test_beta_zero_needs_no_reference_but_beta_positive_does():
    loss, _ = policy_loss(torch.zeros(1, 2), None, torch.ones(1), torch.ones(1, 2), beta=0.0)
    assert loss.item() == pytest.approx(-1.0)  # on-policy: ρ = 1, −A = −1
    with pytest.raises(AlignError, match="ref_logp"):
        policy_loss(torch.zeros(1, 2), None, torch.ones(1), torch.ones(1, 2), beta=0.04)


PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize(("name", "kwargs", "expected"), [
    # grpo: seq means (1+2)/2 = 1.5 and 4/1 = 4 -> 2.75; one of 2 micro-batches -> 1.375
    ("grpo", {}, 2.75), ("grpo", {"num_micro_batches": 2}, 1.375),
    # bnpo: (1+2+4) / 3 tokens
    ("bnpo", {}, 7 / 3), ("bnpo", {"num_micro_batches": 2}, 7 / 6),
    # dr_grpo: 7 / (2 seqs · max_completion_length 4)
    ("dr_grpo", {"max_completion_length": 4}, 7 / 8),
    # dapo: 7 / (10 tokens in the step over 2 ranks = 5 per rank); micro-batch count not used
    ("dapo", {"num_items_in_batch": 10, "world_size": 2, "num_micro_batches": 3}, 7 / 5),
])
def test_aggregation_normalisers(name, kwargs, expected):
    args = {"max_completion_length": None, "num_items_in_batch": None, **kwargs}
    assert LOSS_AGGREGATIONS.get(name)(PER_TOKEN, MASK, **args).item() == pytest.approx(expected)


def test_aggregations_that_need_a_normaliser_say_so():
    with pytest.raises(AlignError, match="max_completion_length"):
        LOSS_AGGREGATIONS.get("dr_grpo")(PER_TOKEN, MASK, max_completion_length=None, num_items_in_batch=None)
    with pytest.raises(AlignError, match="num_items_in_batch"):
        LOSS_AGGREGATIONS.get("dapo")(PER_TOKEN, MASK, max_completion_length=None, num_items_in_batch=None)


def test_micro_batch_sums_equal_the_full_batch():
    """dapo: Σ over micro-batches = global token mean for any split; grpo: equal splits = full batch."""
    g = torch.Generator().manual_seed(0)
    per_token = torch.randn(4, 5, generator=g)
    mask = (torch.rand(4, 5, generator=g) > 0.4).float()
    mask[:, 0] = 1
    common = {"max_completion_length": 5, "num_items_in_batch": mask.sum()}
    dapo, grpo = LOSS_AGGREGATIONS.get("dapo"), LOSS_AGGREGATIONS.get("grpo")
    parts = [(per_token[:1], mask[:1]), (per_token[1:], mask[1:])]  # unequal on purpose
    torch.testing.assert_close(sum(dapo(p, m, **common) for p, m in parts), (per_token * mask).sum() / mask.sum())
    halves = [(per_token[:2], mask[:2]), (per_token[2:], mask[2:])]
    torch.testing.assert_close(sum(grpo(p, m, **common, num_micro_batches=2) for p, m in halves),
                               grpo(per_token, mask, **common))


def test_truncated_importance_weights_by_hand():
    # old − rollout = [ln 2, ln 4, −ln 2, NaN (engine gave no logprob), masked]
    #   w = min(e^d, 3) = [2, 3, 0.5, 1, 1]; truncated: 1 of 4 unmasked tokens
    old = torch.zeros(1, 5)
    rollout = torch.tensor([[-LN2, -2 * LN2, LN2, float("nan"), 7.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    w, m = rollout_is_weights(old, rollout, mask, cap=3.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 3.0, 0.5, 1.0, 1.0]]))
    assert m["rollout_is/truncated_frac"].item() == 0.25
    assert m["rollout_is/weight_mean"].item() == pytest.approx(6.5 / 4)
    assert m["rollout_is/weight_max"].item() == pytest.approx(3.0)
    # in the loss: on-policy, A = 1 -> per-token −1·w, bnpo mean over 4 tokens = −6.5/4
    loss, m = policy_loss(torch.zeros(1, 5), None, torch.ones(1), mask, rollout_logp=rollout, is_cap=3.0,
                          aggregation="bnpo")
    assert loss.item() == pytest.approx(-6.5 / 4)
    assert m["mismatch/logp_diff_max"].item() == pytest.approx(2 * LN2)
    with pytest.raises(AlignError, match="rollout log-probs"):
        policy_loss(torch.zeros(1, 5), None, torch.ones(1), mask, is_cap=3.0)


def test_masked_importance_weights_by_hand():
    # same tokens, mask mode: e^d = [2, 4, 0.5, 1] -> 4 > 3 is dropped: w = [2, 0, 0.5, 1]
    rollout = torch.tensor([[-LN2, -2 * LN2, LN2, float("nan"), 7.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    w, m = rollout_is_weights(torch.zeros(1, 5), rollout, mask, cap=3.0, mode="mask")
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.0, 0.5, 1.0, 1.0]]))
    assert m["rollout_is/masked_frac"].item() == 0.25 and "rollout_is/truncated_frac" not in m
    assert m["rollout_is/weight_min"].item() == 0.0
    # on-policy, A = 1: bnpo = −(2 + 0 + 0.5 + 1) / 4; the dropped token still counts in the denominator (TRL)
    loss, _ = policy_loss(torch.zeros(1, 5), None, torch.ones(1), mask, rollout_logp=rollout, is_cap=3.0,
                          is_mode="mask", aggregation="bnpo")
    assert loss.item() == pytest.approx(-3.5 / 4)


def test_sequence_level_importance_weights_by_hand():
    # sequence 0: old − rollout = [ln 2, ln 2] -> w = Π = 4 (a product, not a mean); sequence 1: [−ln 2] -> 0.5
    #   truncate at 3: [3, 0.5]; mask above 3: [0, 0.5]; fractions are over the 2 sequences
    old = torch.zeros(2, 2)
    rollout = torch.tensor([[-LN2, -LN2], [LN2, 5.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    w, m = rollout_is_weights(old, rollout, mask, cap=3.0, level="sequence")
    torch.testing.assert_close(w, torch.tensor([[3.0], [0.5]]))
    assert m["rollout_is/truncated_frac"].item() == 0.5 and m["rollout_is/weight_mean"].item() == pytest.approx(1.75)
    w, m = rollout_is_weights(old, rollout, mask, cap=3.0, level="sequence", mode="mask")
    torch.testing.assert_close(w, torch.tensor([[0.0], [0.5]]))
    assert m["rollout_is/masked_frac"].item() == 0.5
    # in the loss (on-policy, A = 1, bnpo over 3 tokens): −(0·2 tokens + 0.5·1) / 3
    loss, _ = policy_loss(torch.zeros(2, 2), None, torch.ones(2), mask, rollout_logp=rollout, is_cap=3.0,
                          is_level="sequence", is_mode="mask", aggregation="bnpo")
    assert loss.item() == pytest.approx(-0.5 / 3)


def test_mismatch_metrics_by_hand():
    # d = log π_old − log π_rollout = [ln 2, −ln 2, NaN (unknown: left out), masked]
    #   gap |d| = ln 2 for both; ratio e^d = [2, 0.5]: mean 1.25
    #   KL(π_rollout ‖ π_old) by k3, e^d − d − 1: [1 − ln 2, ln 2 − 0.5] -> mean 0.25
    old = torch.tensor([[LN2, 0.0, 0.0, 3.0]])
    rollout = torch.tensor([[0.0, LN2, float("nan"), 0.0]])
    m = mismatch_metrics(old, rollout, torch.tensor([[1, 1, 1, 0]]))
    assert m["mismatch/logp_diff_mean"].item() == pytest.approx(LN2)
    assert m["mismatch/logp_diff_max"].item() == pytest.approx(LN2)
    assert m["mismatch/kl"].item() == pytest.approx(0.25)
    assert m["mismatch/ratio_mean"].item() == pytest.approx(1.25)
    assert (m["mismatch/ratio_min"].item(), m["mismatch/ratio_max"].item()) == pytest.approx((0.5, 2.0))
    # identical log-probs: no gap, KL exactly 0
    same = mismatch_metrics(old, old, torch.ones(1, 4))
    assert same["mismatch/kl"].item() == 0.0 and same["mismatch/logp_diff_max"].item() == 0.0


def test_padding_cannot_produce_nan():
    # a padded position with logp −inf (and old 0) would give exp(−inf)·0 or inf·0 without masking
    logp = torch.tensor([[-0.1, float("-inf")]], requires_grad=True)
    loss, m = policy_loss(logp, torch.tensor([[0.0, 50.0]]), torch.ones(1), torch.tensor([[1, 0]]),
                          ref_logp=torch.tensor([[0.0, -80.0]]), beta=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(v) for v in m.values())


# ----------------------------------------------------------------------------------------- batch

def test_build_batch_layout_by_hand():
    """Prompts left-padded to P = 3, completions right-padded to T = 2; the truncated sample's
    mask is zeroed only with mask_truncated; missing engine logprobs stay NaN."""
    samples = [Sample([7, 8], [-0.5, -0.25], "stop"), Sample([9], None, "length")]
    for masked in (False, True):
        b = build_batch([[1, 2, 3], [4]], samples, pad_id=0, mask_truncated=masked)
        assert b["input_ids"].tolist() == [[1, 2, 3, 7, 8], [0, 0, 4, 9, 0]]
        assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 0]]
        assert b["completion_mask"].tolist() == [[1, 1], [0, 0] if masked else [1, 0]]
        assert b["rollout_logp"][0].tolist() == [-0.5, -0.25] and b["rollout_logp"][1].isnan().all()
        assert b["truncated"].tolist() == [False, True]


# --------------------------------------------------------------------------------------- metrics

def test_completion_metrics_by_hand():
    # lengths 3, 1, 4 (the 4 was truncated): mean 8/3, terminated mean (3+1)/2
    cm = completion_metrics(torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]),
                            torch.tensor([False, False, True]))
    assert cm["completions/length_mean"].item() == pytest.approx(8 / 3)
    assert (cm["completions/length_min"].item(), cm["completions/length_max"].item()) == (1.0, 4.0)
    assert cm["completions/truncated_frac"].item() == pytest.approx(1 / 3)
    assert cm["completions/terminated_length_mean"].item() == 2.0
