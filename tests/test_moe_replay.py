"""Rollout Routing Replay on a real DeepSeek-V2 (MLA + DeepSeekMoE) model: recording, forced
selection with live combine weights, router gradients, HF-engine routes aligned with GRPO batches."""

from __future__ import annotations

import copy

import pytest
import torch

from align.errors import AlignError
from align.grpo.logprobs import completion_logprobs
from align.grpo.batch import build_batch
from align.moe.gates import moe_gates
from align.moe.metrics import route_mismatch
from align.moe.replay import (SENTINEL, RouteRecorder, RouteReplay, ensure_replay_supported,
                              routes_to_batch)
from rollout.base import SamplingParams
from rollout.hf import HFEngine


@pytest.fixture(scope="module")
def engine(moe_dir):
    return HFEngine.from_pretrained(moe_dir, record_routes=True)


@pytest.fixture()
def model(engine):
    return copy.deepcopy(engine.model)


def perturb_routers(model, scale: float = 0.5, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, gate in moe_gates(model):  # also under a peft wrapper (`...gate.base_layer`)
            gate.weight.add_(torch.randn(gate.weight.shape, generator=gen) * scale)


def record(model, ids) -> torch.Tensor:
    with torch.no_grad(), RouteRecorder(model) as rec:
        model(input_ids=ids)
    return rec.routes()


IDS = torch.randint(3, 500, (4, 12), generator=torch.Generator().manual_seed(0))


def test_recorded_routes_are_the_routers_top_k(model):
    with torch.no_grad(), RouteRecorder(model) as rec:
        out = model(input_ids=IDS, output_router_logits=True)
    routes = rec.routes()
    k = model.config.num_experts_per_tok
    assert routes.shape == (4, 12, len(out.router_logits), k)
    top = out.router_logits[0].topk(k).indices.reshape(4, 12, k)
    assert float(route_mismatch(routes[:, :, 0], top)) == 0.0


def test_replay_forces_recorded_experts_after_router_update(model):
    routes = record(model, IDS)
    perturb_routers(model)
    drifted = record(model, IDS)
    assert float(route_mismatch(routes, drifted)) > 0.2  # without replay the choices move
    with torch.no_grad(), RouteReplay(model, routes) as replay, RouteRecorder(model) as rec:
        model(input_ids=IDS)
    assert torch.equal(rec.routes(), routes)  # the trainer-side selection is the recorded one
    assert replay.mismatch() == pytest.approx(float(route_mismatch(routes, drifted)), abs=1e-6)


def test_router_gets_gradient_under_replay(model):
    routes = record(model, IDS)
    perturb_routers(model)
    model.train()
    with RouteReplay(model, routes):
        model(input_ids=IDS, labels=IDS).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_unchanged_weights_replay_is_the_plain_forward_and_sentinels_route_live(model):
    routes = record(model, IDS)
    with torch.no_grad():
        plain = model(input_ids=IDS).logits
        with RouteReplay(model, routes):
            replayed = model(input_ids=IDS).logits
    torch.testing.assert_close(replayed, plain)
    perturb_routers(model)
    with torch.no_grad():
        live = model(input_ids=IDS).logits
        with RouteReplay(model, torch.full_like(routes, SENTINEL)):
            all_sentinel = model(input_ids=IDS).logits
        partial = routes.clone()
        partial[:, :6] = SENTINEL  # first half live, second half replayed
        with RouteReplay(model, partial), RouteRecorder(model) as rec:
            model(input_ids=IDS)
    torch.testing.assert_close(all_sentinel, live)
    assert torch.equal(rec.routes()[:, 6:], routes[:, 6:])
    assert torch.equal(rec.routes()[:, :6], record(model, IDS)[:, :6])


def test_micro_batched_passes_consume_routes_in_row_order(model):
    routes = record(model, IDS)
    perturb_routers(model)
    mask = torch.ones_like(IDS)
    with torch.no_grad():
        with RouteReplay(model, routes):
            whole, _ = completion_logprobs(model, IDS, mask, completion_length=5, with_entropy=False)
        with RouteReplay(model, routes):  # two rows per call, twice over (epochs wrap)
            parts, _ = completion_logprobs(model, IDS, mask, completion_length=5, micro_batch_size=2,
                                           with_entropy=False)
            again, _ = completion_logprobs(model, IDS, mask, completion_length=5, micro_batch_size=2,
                                           with_entropy=False)
    torch.testing.assert_close(parts, whole)
    torch.testing.assert_close(again, whole)


def test_shape_mistakes_are_align_errors(model):
    routes = record(model, IDS)
    with pytest.raises(AlignError, match="MoE layers"):
        RouteReplay(model, routes[:, :, :0])
    with pytest.raises(AlignError, match="positions"), torch.no_grad(), RouteReplay(model, routes):
        model(input_ids=IDS[:, :5])


def test_hf_engine_routes_align_with_grpo_batch(engine):
    tok = engine.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)
               for t in ["What is 2 + 2?", "hi"]]
    groups = engine.generate(prompts, 2, SamplingParams(temperature=1.0, max_new_tokens=10, seed=3))
    samples = [s for g in groups for s in g]
    prompt_ids = [p for p in prompts for _ in range(2)]
    layers, k = 1, engine.model.config.num_experts_per_tok
    for s in samples:
        assert s.routes.shape == (len(s.completion_ids), layers, k) and s.routes.dtype == torch.long
    batch = build_batch(prompt_ids, samples, tok.pad_token_id, mask_truncated=False)
    p_len = max(map(len, prompt_ids))
    t_len = batch["completion_mask"].shape[1]
    routes = routes_to_batch([len(p) for p in prompt_ids], [s.routes for s in samples], p_len, t_len)
    assert routes.shape == (4, p_len + t_len, layers, k)
    assert (routes[:, :p_len - 1] == SENTINEL).all()
    # teacher forcing the batch routes token P-1+t as generation did when it produced token t
    with torch.no_grad(), RouteRecorder(engine.model) as rec:
        engine.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    replayed = routes[..., 0, 0] >= 0
    assert float(route_mismatch(routes, rec.routes(), replayed[..., None])) < 0.02
    # and the replayed trainer log-probs are the engine's
    with torch.no_grad(), RouteReplay(engine.model, routes):
        logp, _ = completion_logprobs(engine.model, batch["input_ids"], batch["attention_mask"],
                                      completion_length=t_len, with_entropy=False)
    mask = batch["completion_mask"].bool()
    assert (logp[mask] - batch["rollout_logp"][mask]).abs().max() < 1e-4


def test_a_lora_policy_records_and_replays_routes(model, engine):
    """peft's generate calls the base model, never the wrapper's forward: routes must still be
    recorded per call, and replay must force them on the wrapped model's training forward."""
    from align.recipe.schema import LoraConfig
    from align.train_utils import apply_lora

    policy = apply_lora(model, LoraConfig(r=4, alpha=8))
    lora_engine = HFEngine(policy, engine.tokenizer, record_routes=True)
    groups = lora_engine.generate([[5, 6, 7], [8, 9]], 2, SamplingParams(temperature=1.0, max_new_tokens=6, seed=1))
    samples = [s for g in groups for s in g]
    assert all(s.routes is not None and s.routes.shape[0] == len(s.completion_ids) for s in samples)
    routes = record(policy, IDS)
    perturb_routers(policy)
    with torch.no_grad(), RouteReplay(policy, routes) as replay, RouteRecorder(policy) as rec:
        policy(input_ids=IDS)
    assert torch.equal(rec.routes(), routes) and replay.mismatch() > 0.2


def test_replay_support_by_engine():
    ensure_replay_supported("hf", "colocate")
    ensure_replay_supported("hf", "server")  # the workers check (tests/test_rollout_server.py)
    with pytest.raises(AlignError, match="rollout.engine: hf"):
        ensure_replay_supported("vllm", "colocate")


def test_routes_to_batch_needs_routes():
    with pytest.raises(AlignError, match="record_routes"):
        routes_to_batch([3], [None], 3, 2)
