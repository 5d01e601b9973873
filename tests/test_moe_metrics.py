"""MoE router metrics: hand-computed numbers on tiny tensors, and the collector on a real
DeepSeek-V2 (MLA + DeepSeekMoE) model built by `build_tiny`."""

from __future__ import annotations

import math

import pytest
import torch

from align.errors import AlignError
from align.moe.metrics import (RouterStats, coefficient_of_variation, expert_load,
                               metrics_from_router_logits, route_mismatch, router_entropy)


@pytest.fixture(scope="module")
def moe_model(moe_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(moe_dir).eval()


def test_expert_load_counts_slots_of_real_tokens():
    indices = torch.tensor([[0, 1], [0, 2], [3, 0]])
    assert expert_load(indices, 4).tolist() == pytest.approx([3 / 6, 1 / 6, 1 / 6, 1 / 6])
    masked = expert_load(indices, 4, torch.tensor([1, 1, 0]))  # the padding token's slots vanish
    assert masked.tolist() == pytest.approx([2 / 4, 1 / 4, 1 / 4, 0])


def test_cv_is_zero_when_balanced_and_maximal_on_collapse():
    assert float(coefficient_of_variation(torch.full((8,), 1 / 8))) == pytest.approx(0.0)
    collapsed = torch.tensor([1.0, 0, 0, 0])
    assert float(coefficient_of_variation(collapsed)) == pytest.approx(math.sqrt(3))
    # [0.5, 0.5, 0, 0]: mean 0.25, population std 0.25
    assert float(coefficient_of_variation(torch.tensor([0.5, 0.5, 0, 0]))) == pytest.approx(1.0)


def test_router_entropy_uniform_and_masked():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
    assert float(router_entropy(logits)) == pytest.approx(math.log(4) / 2, abs=1e-6)
    assert float(router_entropy(logits, torch.tensor([1, 0]))) == pytest.approx(math.log(4))


def test_route_mismatch_compares_sets():
    a = torch.tensor([[0, 1], [2, 3], [4, 5]])
    b = torch.tensor([[1, 0], [2, 7], [6, 7]])  # same set, one differs, both differ
    assert float(route_mismatch(a, b)) == pytest.approx(3 / 6)
    assert float(route_mismatch(a, b, torch.tensor([1, 1, 0]))) == pytest.approx(1 / 4)


def test_collector_matches_output_router_logits_on_real_model(moe_model):
    ids = torch.randint(3, 500, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding must not count
    with torch.no_grad(), RouterStats(moe_model) as stats:
        out = moe_model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    got = stats.metrics()
    labels = [1]  # nano: 2 layers, the first dense -> one MoE layer, decoder layer 1
    want = metrics_from_router_logits(out.router_logits, moe_model.config.num_experts_per_tok,
                                      mask, labels)
    assert set(got) == set(want) >= {"moe/layer1/load_cv", "moe/load_cv_mean",
                                     "moe/router_entropy_mean", "moe/load_max"}
    assert got == pytest.approx(want)
    # padding excluded: recomputing by hand on the real rows only
    real = mask.reshape(-1).bool()
    logits = out.router_logits[0][real]
    load = expert_load(logits.topk(2).indices, logits.shape[-1])
    assert got["moe/layer1/load_cv"] == pytest.approx(float(coefficient_of_variation(load)))
    assert 0 < got["moe/router_entropy_mean"] <= math.log(moe_model.config.n_routed_experts)


def test_collector_accumulates_micro_batches(moe_model):
    ids = torch.randint(3, 500, (4, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), RouterStats(moe_model) as whole:
        moe_model(input_ids=ids)
    with torch.no_grad(), RouterStats(moe_model) as parts:
        moe_model(input_ids=ids[:2])
        moe_model(input_ids=ids[2:])
    assert parts.metrics() == pytest.approx(whole.metrics(), rel=1e-5)


def test_dense_model_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2Config

    dense = AutoModelForCausalLM.from_config(Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(AlignError, match="no MoE router"):
        RouterStats(dense)
