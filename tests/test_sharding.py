"""FSDP2 sharding (align/sharding.py) on CPU: two real gloo ranks started by torchrun against one
process, on the nano Qwen2 (tied embeddings), the nano DeepSeek-V2 (MLA + MoE) and a LoRA model.

The multi-process checks run inside the ranks (tests/helpers/sharded.py) and report as JSON:
offload/reload of the local shards is bitwise, `gathered_weights` equals the trainer's
`policy_weights` of an unsharded copy exactly. Here: the weights after sharded steps equal one
process within 1e-5, final/ loads in transformers, and a run SIGKILLed after a sharded checkpoint
and resumed ends bitwise where the uninterrupted run ends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from align.recipe.schema import DistributedConfig, GRPOStage, SFTStage
from align.recipe.dry_run import GIB, memory_per_rank
from align.sharding import decoder_layers, gathered_weights
from helpers import sharded as worker

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"dense": ("model_dir", False), "moe": ("moe_dir", False), "dense_lora": ("model_dir", True)}


def torchrun(args: dict, timeout: float = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "tests/helpers/sharded.py"), json.dumps(args)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def sharded_run(request, tmp_path_factory):
    """variant -> (out dir of the 2-rank run with all checks, model dir, lora); each run once."""
    @cache
    def go(variant: str) -> tuple[Path, Path, bool]:
        fixture, lora = VARIANTS[variant]
        model_dir = request.getfixturevalue(fixture)
        out = tmp_path_factory.mktemp(f"fsdp-{variant}")
        done = torchrun({"model_dir": str(model_dir), "lora": lora, "out": str(out), "checks": True})
        assert done.returncode == 0, done.stderr[-4000:]
        return out, model_dir, lora
    return go


def reports(out: Path) -> tuple[dict, dict]:
    return tuple(json.loads((out / f"report{r}.json").read_text()) for r in (0, 1))


# ----------------------------------------------------------------------- two ranks vs one


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_sharded_ranks_equal_one_process(variant, sharded_run, tmp_path):
    from align.weights import policy_weights
    from transformers import AutoModelForCausalLM

    out, model_dir, lora = sharded_run(variant)
    single = worker.run({"model_dir": str(model_dir), "lora": lora, "out": str(tmp_path)})
    one, two = load_file(tmp_path / "weights.safetensors"), load_file(out / "weights.safetensors")
    init = worker.build(str(model_dir), lora).state_dict()
    assert one.keys() == two.keys() == init.keys()
    assert any(not torch.equal(one[k], init[k]) for k in one), "training must move the weights"
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert worst < 1e-5, f"1 process vs 2 FSDP2 ranks differ by {worst}"

    rank0, rank1 = reports(out)
    for r in (rank0, rank1):  # local shards out and back, bitwise, storage really released
        assert r["offload"]["bitwise"] and r["offload"]["released"] and r["offload"]["empty"], r["offload"]
        assert r["offload"]["moved"] > 0 and r["offload"]["keys"] > 3 * len(init) // 2  # params+grads+moments
    g0, g1 = rank0["gathered"], rank1["gathered"]
    assert g0["same_names"] and g0["mismatch"] == [], g0  # bitwise the unsharded policy_weights
    assert g0["groups"] == g1["groups"] > 2 and not g0["empty"] and g1["empty"]  # streamed; rank 1 keeps nothing
    largest = max(t.numel() * t.element_size() for t in init.values())
    assert all(size < worker.SMALL_GROUP + largest for size in g0["sizes"])

    final = AutoModelForCausalLM.from_pretrained(out / "stage/final", dtype=torch.float32)
    want = dict(policy_weights(single))  # the one-process model, merged and named as HF checkpoints
    got = dict(policy_weights(final))
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert float((got[name] - tensor).abs().max()) < 1e-5, name
    if final.config.tie_word_embeddings:
        assert final.lm_head.weight.data_ptr() == final.model.embed_tokens.weight.data_ptr()
    if lora:  # the adapter saved alone from the shards loads with peft and equals one process
        from peft import PeftModel

        adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                            out / "adapter/final")
        assert not list((out / "adapter/final").glob("model*.safetensors"))
        mine, theirs = adapter.state_dict(), single.state_dict()
        assert mine.keys() == theirs.keys()
        assert max(float((mine[k] - theirs[k]).abs().max()) for k in mine) < 1e-5


@pytest.mark.slow
def test_sharded_checkpoint_sigkill_resume_equals_uninterrupted(sharded_run, model_dir, tmp_path):
    uninterrupted, _, _ = sharded_run("dense")
    args = {"model_dir": str(model_dir), "lora": False, "out": str(tmp_path)}
    killed = torchrun({**args, "kill_after": 2})
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr, killed.stderr[-2000:]
    ckpt = tmp_path / "stage/checkpoint-2"
    assert (tmp_path / "stage/latest").read_text().strip() == "checkpoint-2"
    files = sorted(p.name for p in ckpt.rglob("*") if p.is_file())
    shards = sorted((ckpt / "shards").iterdir())
    assert [p.name for p in shards] == ["shard-00001-model-00001-of-00001.safetensors",
                                        "shard-00002-model-00001-of-00001.safetensors"], files
    assert not [f for f in files if f.endswith((".distcp", ".metadata", ".pt", ".bin", ".pkl"))], files
    names = set()
    for shard in shards:  # plain safetensors: model and optimizer shards of each rank
        with safe_open(shard, framework="pt") as f:
            names |= set(f.keys())
    assert any(n.startswith("model::") for n in names) and any(n.endswith("::exp_avg_sq") for n in names)
    assert "model::lm_head.weight" not in names  # tied to the embedding: stored once
    assert json.loads((ckpt / "trainer_state.json").read_text())["sharded"]["world_size"] == 2

    resumed = torchrun({**args, "resume": True})
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert reports(tmp_path)[0]["start"] == 2
    a, b = load_file(tmp_path / "weights.safetensors"), load_file(uninterrupted / "weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ one process, no ranks


@pytest.mark.parametrize("arch", ["model_dir", "moe_dir"])
@pytest.mark.parametrize("lora", [False, True])
def test_gathered_weights_unsharded_equal_policy_weights(arch, lora, request):
    """Without sharding `gathered_weights` is the trainer's weight sync: LoRA merged with peft's
    maths (a nano DeepSeek-V2 LoRA wraps its expert tensors too), experts unfused, in groups."""
    from align.weights import policy_weights
    from align.train_utils import build_optimizer

    model = worker.build(str(request.getfixturevalue(arch)), lora)
    opt = build_optimizer(model, worker.STAGE)
    for ids in worker.batches(model.config.vocab_size)[:2]:  # adapters leave zero
        worker.backward(model, ids, 0, 1)
        opt.step()
        opt.zero_grad()
    groups = list(gathered_weights(model, group_bytes=worker.SMALL_GROUP))
    got = dict(pair for g in groups for pair in g)
    want = dict(policy_weights(model))
    assert len(groups) > 2 and sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_gathered_weights_of_lora_reward_model_equal_merge_and_unload(model_dir):
    """A LoRA sequence-classification model trains its score head as `modules_to_save`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    def fresh():
        torch.manual_seed(0)
        base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(0.01 * torch.randn_like(p))  # a trained adapter and head
        return model

    got = dict(pair for g in gathered_weights(fresh()) for pair in g)
    want = fresh().merge_and_unload().state_dict()
    assert sorted(got) == sorted(want) and "score.weight" in got
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_decoder_layers_dense_moe_and_lora(model_dir, moe_dir):
    dense, moe = worker.build(str(model_dir), False), worker.build(str(moe_dir), False)
    assert [type(m).__name__ for m in decoder_layers(dense)] == ["Qwen2DecoderLayer"] * 2
    layers = decoder_layers(moe)
    assert [type(m).__name__ for m in layers] == ["DeepseekV2DecoderLayer"] * 2
    assert any("experts" in n for n, _ in layers[1].named_parameters())  # the MoE layer is a unit too
    assert len(decoder_layers(worker.build(str(model_dir), True))) == 2  # found through peft's wrapper


# ---------------------------------------------------------------------------- dry-run plan


def _sft(**kw):
    return SFTStage(name="s", kind="sft", data="x.jsonl", **kw)


def test_memory_estimate_follows_placement():
    """Hand-computed: 1e9 float32 parameters, AdamW = weights + grads + 2 moments = 16 bytes each."""
    p, w = 10**9, 8
    assert memory_per_rank(_sft(), p, "float32", "ddp", w) == pytest.approx(16e9 / GIB)
    assert memory_per_rank(_sft(), p, "float32", "fsdp2", w) == pytest.approx(2e9 / GIB)
    assert memory_per_rank(_sft(), p, "bfloat16", "fsdp2", w) == pytest.approx(1e9 / GIB)
    grpo = GRPOStage(name="g", kind="grpo", prompts="p.jsonl", rewards=[{"name": "accuracy"}], beta=0.04)
    assert memory_per_rank(grpo, p, "float32", "ddp", w) == pytest.approx(20e9 / GIB)  # + full reference per rank
    assert memory_per_rank(grpo, p, "float32", "fsdp2", w) == pytest.approx(2.5e9 / GIB)  # reference sharded too
    lora = {"lora": {"r": 8}}
    assert memory_per_rank(_sft(**lora), p, "bfloat16", "ddp", w) == pytest.approx(2e9 / GIB)
    no_ref = GRPOStage(name="g", kind="grpo", prompts="p.jsonl", rewards=[{"name": "accuracy"}], beta=0.04,
                       reference="lora_disabled", **lora)
    assert memory_per_rank(no_ref, p, "bfloat16", "fsdp2", w) == pytest.approx(2e9 / 8 / GIB)


def test_distributed_keys_are_documented_and_checked():
    for name, field in DistributedConfig.model_fields.items():
        assert field.description, name
    with pytest.raises(ValueError, match="strategy"):
        DistributedConfig(strategy="zero3")
