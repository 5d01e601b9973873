"""MoE router metrics: hand-computed numbers on tiny tensors, and the collector on a real
DeepSeek-V2 (MLA + DeepSeekMoE) model built by `build_tiny`."""

from __future__ import annotations

import math

import pytest
import torch

from align.errors import AlignError
from align.moe.metrics import (RouterStats, coefficient_of_variation, expert_load, layer_metrics,
                               route_mismatch, router_entropy, summarise)


def metrics_from_router_logits(router_logits: tuple[torch.Tensor, ...], top_k: int,
                               attention_mask: torch.Tensor | None = None,
                               labels: list[int] | None = None) -> dict[str, float]:
    """The oracle for `RouterStats`: metrics from a forward's `output_router_logits=True` result
    (one [B*S, E] per MoE layer), choices re-derived as top-k of the logits (exact for the plain
    top-k router of the nano DeepSeek-V2)."""
    mask = None if attention_mask is None else attention_mask.reshape(-1)
    per_layer: dict[str, float] = {}
    for i, logits in enumerate(router_logits):
        indices = logits.topk(top_k, dim=-1).indices
        per_layer |= layer_metrics(labels[i] if labels else i, logits.detach(), indices, mask)
    return summarise(per_layer)


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


# ------------------------------------------------------------------ SFT and reward-model stages


def _layer_keys(row: dict) -> set[str]:
    return {k.split("/")[1] for k in row if k.startswith("moe/layer")}


def _run_stages(tmp_path, model_dir, stages: list[dict]) -> None:
    """A real pipeline run of `stages` on `model_dir` with small synthetic data."""
    from align.recipe.schema import Recipe
    from align.data.io import write_jsonl
    from align.data.synth import generate
    from align.pipeline import run_pipeline

    write_jsonl(generate("math", 64, seed=0, form="conversations"), tmp_path / "sft.jsonl")
    write_jsonl(generate("preference", 40, seed=1), tmp_path / "prefs.jsonl")
    recipe = Recipe.model_validate({"output_dir": str(tmp_path / "run"), "model": {"path": str(model_dir)},
                                    "stages": stages})
    run_pipeline(recipe)


def _sft(tmp_path, **extra) -> dict:
    return {"name": "sft", "kind": "sft", "data": str(tmp_path / "sft.jsonl"), "eval_split": 0.0,
            "max_seq_len": 96, "max_steps": 3, "per_device_batch_size": 2, "gradient_accumulation_steps": 2,
            "logging_steps": 2, **extra}


@pytest.fixture(scope="module")
def moe_run(moe_dir, tmp_path_factory):
    """SFT (packed, so the padding fill must be masked by length) then a reward model, both MoE."""
    tmp = tmp_path_factory.mktemp("moe_run")
    rm = {"name": "rm", "kind": "reward_model", "init": "sft", "data": str(tmp / "prefs.jsonl"),
          "eval_split": 0.0, "max_seq_len": 96, "max_steps": 2, "per_device_batch_size": 4,
          "logging_steps": 1}
    _run_stages(tmp, moe_dir, [_sft(tmp, packing=True), rm])
    return tmp / "run"


@pytest.mark.parametrize("stage, logged_steps", [("sft", [2, 3]), ("rm", [1, 2])])
def test_moe_stage_logs_router_metrics_each_logged_step(moe_run, stage, logged_steps):
    from align.run_summary import panel_of
    from align.tracking import read_metrics

    train_rows = [r for r in read_metrics(moe_run / stage) if "loss" in r]
    assert [r["step"] for r in train_rows] == logged_steps
    for row in train_rows:
        assert _layer_keys(row) == {"layer1"}  # nano: layer 0 is dense, layer 1 is the only MoE layer
        assert {"moe/layer1/load_cv", "moe/layer1/load_max", "moe/layer1/router_entropy",
                "moe/load_cv_max", "moe/load_max", "moe/router_entropy_mean"} < set(row)
        assert math.isfinite(row["moe/load_cv_mean"]) and row["moe/load_cv_mean"] >= 0
        assert 1 / 8 <= row["moe/load_max"] <= 1  # 8 routed experts
        assert 0 < row["moe/router_entropy_mean"] <= math.log(8)
    # the plot groups the router metrics into their own few panels
    assert (moe_run / stage / "metrics.png").stat().st_size > 0
    assert {panel_of(k) for k in train_rows[0] if k.startswith("moe/")} == \
        {"moe/load_cv", "moe/router_entropy", "moe/shares"}


def test_dense_sft_logs_no_router_metrics(model_dir, tmp_path):
    from align.tracking import read_metrics

    _run_stages(tmp_path, model_dir, [_sft(tmp_path, max_steps=2)])
    rows = read_metrics(tmp_path / "run" / "sft")
    assert any("loss" in r for r in rows)
    assert not [k for r in rows for k in r if k.startswith("moe/")]


def test_packed_sft_batch_counts_only_real_tokens(moe_model):
    """A packed batch has no attention mask: the SFT collector must drop each row's padding fill,
    matching the router logits of the real tokens only."""
    from align.data.batching import collate_packed
    from align.moe import RouterStats
    from align.sft import _real_mask

    rows = [{"input_ids": list(range(5, 25)), "assistant_mask": [1] * 20, "seq_lengths": [12, 8]},
            {"input_ids": list(range(40, 51)), "assistant_mask": [1] * 11, "seq_lengths": [11]}]
    batch = collate_packed(rows, pad_id=0)
    batch.pop("labels")
    real = _real_mask(batch, [20, 11])
    assert real.sum() == 31 and not real[1, 11:].any()
    with torch.no_grad(), RouterStats(moe_model) as stats:
        stats.token_mask = real
        out = moe_model(**batch, output_router_logits=True)
    want = metrics_from_router_logits(out.router_logits, moe_model.config.num_experts_per_tok, real, [1])
    assert stats.metrics() == pytest.approx(want)
    unmasked = metrics_from_router_logits(out.router_logits, moe_model.config.num_experts_per_tok, None, [1])
    assert stats.metrics()["moe/layer1/router_entropy"] != pytest.approx(unmasked["moe/layer1/router_entropy"])


@pytest.mark.parametrize("key, panel", [
    ("moe/layer7/load_cv", "moe/load_cv"), ("moe/load_cv_mean", "moe/load_cv"), ("moe/load_cv_max", "moe/load_cv"),
    ("moe/layer7/router_entropy", "moe/router_entropy"), ("moe/router_entropy_mean", "moe/router_entropy"),
    ("moe/layer7/load_max", "moe/shares"), ("moe/load_max", "moe/shares"), ("moe/route_mismatch", "moe/shares"),
    ("loss", "loss"), ("rewards/total/mean", "rewards"), ("time/reward", "reward"), ("actor/kl", "kl")])
def test_plot_panels(key, panel):
    from align.run_summary import panel_of

    assert panel_of(key) == panel


def _many_layer_rows(layers: int = 60) -> list[dict]:
    return [{"step": step, "loss": 1.0 / step, "lr": 1e-3, "moe/load_cv_mean": 0.5, "moe/load_max": 0.4,
             **{f"moe/layer{i}/{m}": 0.01 * i + step for i in range(1, layers + 1)
                for m in ("load_cv", "load_max", "router_entropy")}}
            for step in range(1, 4)]


def test_many_layer_moe_takes_three_panels_with_readable_legends():
    """A 60-layer MoE adds three panels (not 60), and their legends list the summaries only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from align.run_summary import _draw, stage_panels

    panels = stage_panels(_many_layer_rows())
    assert list(panels) == ["loss", "lr", "moe/load_cv", "moe/router_entropy", "moe/shares"]
    assert len(panels["moe/load_cv"]) == 61 and len(panels["moe/load_cv"]["moe/layer60/load_cv"]) == 3
    fig, ax = plt.subplots()
    _draw(ax, panels["moe/load_cv"])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["moe/load_cv_mean"]
    assert len(ax.get_lines()) == 61
    plt.close(fig)
    few = stage_panels(_many_layer_rows(layers=3))
    fig, ax = plt.subplots()
    _draw(ax, few["moe/router_entropy"])  # few layers: each is labelled
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {f"moe/layer{i}/router_entropy" for i in (1, 2, 3)}
    plt.close(fig)


def test_panel_limit_keeps_the_priority_families(tmp_path):
    from align.run_summary import MAX_PANELS, plot_stage, stage_panels
    from align.tracking import MetricsLog

    rows = [{**row, **{f"extra{j}/x": float(j) for j in range(20)}} for row in _many_layer_rows(4)]
    panels = stage_panels(rows)
    assert len(panels) == MAX_PANELS and list(panels)[:2] == ["loss", "lr"]
    log = MetricsLog(tmp_path)
    for row in rows:
        log.log(row["step"], {k: v for k, v in row.items() if k != "step"})
    log.close()
    assert plot_stage(tmp_path).stat().st_size > 0
