"""Differential test: align's DPO stage maths equals TRL 1.16's DPOTrainer on a real model.

TRL side: a real `DPOTrainer` (built from a `DPOConfig`) on the nano Qwen2, with a visibly
different reference model; its own dataset preparation (chat template, prompt/answer split) and
collator build the batch, and its own `compute_loss` scores it. align side: `encode_pair`,
`collate`, `sequence_logps` and `dpo_loss` on a second copy of the same weights. The token split,
the loss, every parameter's gradient and the rewards/* metrics must agree to 1e-5, for sigmoid and
IPO, with one pair cut by `max_length`.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from align.data.synth import generate
from align.dpo import Pairs, collate, dpo_loss, encode_pair, sequence_logps

trl = pytest.importorskip("trl")
from trl import DPOConfig, DPOTrainer  # noqa: E402

BETA, MAX_LEN, N = 0.1, 40, 4
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def rows():
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in generate("preference", N, seed=1)]


@pytest.fixture(scope="module")
def models(model_dir):
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = copy.deepcopy(policy).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():  # a reference visibly different from the policy
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return policy, ref


def _trl(model_dir, models, rows, loss_type, tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer

    policy, ref = (copy.deepcopy(m) for m in models)
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=N, beta=BETA, loss_type=[loss_type],
                     max_length=MAX_LEN, use_cpu=True, bf16=False, report_to=[], dataset_num_proc=None)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(model_dir))
    trainer.model.train()
    data = trainer.train_dataset
    tokens = [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in data]
    inputs = trainer.data_collator([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in data])
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics, tokens, inputs


def _align(model_dir, models, rows):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy, ref = (copy.deepcopy(m) for m in models)
    policy.train()
    encoded = [encode_pair(tokenizer, r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    batch = collate(Pairs(*map(list, zip(*encoded))), tokenizer.pad_token_id, MAX_LEN)
    with torch.no_grad():
        ref_logps, _ = sequence_logps(ref, batch)
    return policy, encoded, batch, ref_logps


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_gradients_and_metrics_equal_trl(model_dir, models, rows, loss_type, tmp_path):
    trl_loss, trl_grads, trl_metrics, trl_tokens, trl_inputs = _trl(model_dir, models, rows, loss_type, tmp_path)
    policy, encoded, batch, ref_logps = _align(model_dir, models, rows)

    assert [tuple(map(list, t)) for t in trl_tokens] == [tuple(e) for e in encoded]  # same prompt/answer split
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(batch[key], trl_inputs[key]), key
    assert (batch["attention_mask"].sum(-1) == MAX_LEN).any()  # one sequence was cut (keep_start)

    logps, lengths = sequence_logps(policy, batch)
    per_pair, r_chosen, r_rejected = dpo_loss(logps, ref_logps, lengths, BETA, loss_type)
    loss = per_pair.mean()
    loss.backward()

    torch.testing.assert_close(loss.detach(), trl_loss, **TOL)
    grads = {n: p.grad for n, p in policy.named_parameters()}
    assert grads.keys() == trl_grads.keys()
    assert any(g.abs().max() > 1e-3 for g in grads.values())  # a real gradient, not zeros on both sides
    for name, grad in grads.items():
        torch.testing.assert_close(grad, trl_grads[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")
    ours = {"rewards/chosen": r_chosen.mean(), "rewards/rejected": r_rejected.mean(),
            "rewards/margins": (r_chosen - r_rejected).mean(),
            "rewards/accuracies": (r_chosen > r_rejected).float().mean()}
    for key, value in ours.items():
        assert math.isclose(float(value), trl_metrics[key], rel_tol=1e-5, abs_tol=1e-6), key


def test_dpo_loss_by_hand():
    """Hand-computed: one pair, log-ratios chosen +1, rejected −1, β 0.5, answers of 2 and 4 tokens."""
    logps = torch.tensor([-3.0, -6.0])  # chosen, rejected
    ref = torch.tensor([-4.0, -5.0])
    lengths = torch.tensor([2, 4])
    loss, rc, rr = dpo_loss(logps, ref, lengths, 0.5, "sigmoid")
    assert float(loss) == pytest.approx(math.log1p(math.exp(-1.0)))  # −log σ(0.5 · (1 − (−1)))
    assert (float(rc), float(rr)) == (0.5, -0.5)
    loss, _, _ = dpo_loss(logps, ref, lengths, 0.5, "ipo")
    assert float(loss) == pytest.approx((1 / 2 - (-1) / 4 - 1.0) ** 2)  # (Δ/len − 1/(2β))²
